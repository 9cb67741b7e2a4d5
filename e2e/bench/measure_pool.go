package main

import (
	"fmt"
	"strconv"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

func (b *bench) poolFigures() []figure {
	var figs []figure
	for _, n := range b.plan.poolNs {
		figs = append(figs, figure{ID: "2", Name: fmt.Sprintf("Pool efficiency, achieved ÷ N/L, N=%d (L=%d s)", n, b.plan.poolDelay),
			Short:  fmt.Sprintf("Pool efficiency, N=%d", n),
			Digits: 3, Target: 0.95, Dir: atLeast})
	}
	return figs
}

// measurePool is measurement 2. For each N, a fresh smtp-sink that delays
// its reply to every final dot by L (smtp-sink -W .:L; it takes whole
// seconds only) and a fresh smtppool with N sessions; smtp-source keeps 2N
// clients in flight, one connection per message, so N wait at MAIL while N
// are relayed, and sends N × rounds messages. The pool's ramp-up (dialling
// N sessions at the first MAILs) is included, amortised over the rounds.
// Achieved = messages ÷ smtp-source's wall time; the limit is N/L.
func (b *bench) measurePool(g *peers.Group) error {
	pl := b.plan
	figs := b.poolFigures()
	L := float64(pl.poolDelay)
	for i, n := range pl.poolNs {
		ratio, wall, err := b.poolRun(g, n)
		if err != nil {
			return fmt.Errorf("N=%d: %w", n, err)
		}
		figs[i].Value = ratio
		msgs := n * pl.poolRounds
		b.detail("2. N=%d: %d messages from %d parallel clients in %.3f s: %.3f msg/s against a limit of %.0f msg/s (ideal time %.0f s).",
			n, msgs, 2*n, wall.Seconds(), float64(msgs)/wall.Seconds(), float64(n)/L, float64(pl.poolRounds)*L)
	}
	b.detail("2. Method: smtp-sink -W .:%d delays the reply to each final dot by L = %d s (it refuses fractions); a fresh smtp-sink and smtppool (SMTPPOOL_MAX_CONNS=N) per N; smtp-source -s 2N -m %d×N, one connection per message; the time includes the pool's ramp-up.",
		pl.poolDelay, pl.poolDelay, pl.poolRounds)
	b.add(figs...)
	return nil
}

// poolRun runs measurement 2 for n sessions and returns the achieved rate
// divided by the limit, and smtp-source's wall time.
func (b *bench) poolRun(g *peers.Group, n int) (ratio float64, wall time.Duration, err error) {
	pl := b.plan
	sk, err := b.startSink(g, pl.poolDelay)
	if err != nil {
		return 0, 0, err
	}
	defer sk.Stop()
	px, err := b.startProxy(g, sk.Addr, map[string]string{"SMTPPOOL_MAX_CONNS": strconv.Itoa(n)})
	if err != nil {
		return 0, 0, err
	}
	defer px.Stop()
	msgs := n * pl.poolRounds
	timeout := time.Duration(pl.poolRounds*pl.poolDelay)*time.Second*3 + 30*time.Second
	res, err := peers.RunSource(g, px.Addr, peers.SourceOptions{Sessions: 2 * n, Messages: msgs, Bytes: 1000}, timeout)
	if err != nil {
		return 0, 0, err
	}
	if err := px.Alive(); err != nil {
		return 0, 0, err
	}
	if c := sk.Counters(); c.Mesg != msgs {
		return 0, 0, fmt.Errorf("smtp-sink received %d messages, want %d", c.Mesg, msgs)
	}
	achieved := float64(msgs) / res.Wall.Seconds()
	limit := float64(n) / float64(pl.poolDelay)
	return achieved / limit, res.Wall, nil
}
