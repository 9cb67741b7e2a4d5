package main

import (
	"fmt"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

func (b *bench) latencyFigures() []figure {
	n := b.plan.latencyPairs
	return []figure{
		{ID: "6", Name: fmt.Sprintf("Added latency p50, smtppool − direct (%d pairs, 1 at a time)", n), Unit: "ms", Digits: 3},
		{ID: "6", Name: fmt.Sprintf("Added latency p99, smtppool − direct (%d pairs, 1 at a time)", n), Unit: "ms", Digits: 3,
			Short: "Added latency p99", Target: 2, Dir: atMost},
	}
}

// measureLatency is measurement 6. One message at a time, alternately
// straight to smtp-sink and through a warm smtppool (SMTPPOOL_MAX_CONNS=2)
// to the same smtp-sink, each on a fresh connection as the chat server
// sends. The time runs from just before the dial to the arrival of the
// reply to the final dot (greeting, EHLO, MAIL, RCPT, DATA and the message
// included; the QUIT after it is not). Each pair gives one difference,
// proxied minus direct; the figures are percentiles of the differences.
func (b *bench) measureLatency(g *peers.Group) error {
	pairs := b.plan.latencyPairs
	figs := b.latencyFigures()
	sk, err := b.startSink(g, 0)
	if err != nil {
		return err
	}
	px, err := b.startProxy(g, sk.Addr, map[string]string{"SMTPPOOL_MAX_CONNS": "2"})
	if err != nil {
		return err
	}
	msg := peers.NewMessages("latency", 1)[0].Padded(1000)
	for range 20 { // warm-up: programs, caches and the pool
		if _, _, err := timePair(sk.Addr, px.Addr, msg, false); err != nil {
			return err
		}
	}
	var direct, proxied, diffs []float64
	for i := range pairs {
		d, p, err := timePair(sk.Addr, px.Addr, msg, i%2 == 1)
		if err != nil {
			return err
		}
		dm, pm := ms(d), ms(p)
		direct, proxied, diffs = append(direct, dm), append(proxied, pm), append(diffs, pm-dm)
	}
	if err := px.Alive(); err != nil {
		return err
	}
	figs[0].Value = percentile(diffs, 50)
	figs[1].Value = percentile(diffs, 99)
	b.detail("6. Added latency: %d pairs, one message (%d bytes) at a time, alternating direct and through smtppool (SMTPPOOL_MAX_CONNS=2, warmed by 20 messages) into one smtp-sink, each on a fresh connection; timed from the dial to the reply to the final dot.",
		pairs, len(msg.Bytes()))
	b.detail("   direct p50 %.3f ms, p99 %.3f ms; through smtppool p50 %.3f ms, p99 %.3f ms; difference p50 %.3f ms, p90 %.3f ms, p99 %.3f ms, max %.3f ms.",
		percentile(direct, 50), percentile(direct, 99), percentile(proxied, 50), percentile(proxied, 99),
		figs[0].Value, percentile(diffs, 90), figs[1].Value, percentile(diffs, 100))
	b.detail("   About one proxied message in 100 (SMTPPOOL_MAX_MESSAGES_PER_CONN=100) also waits for a new upstream session to be set up (dial, greeting, EHLO); those messages are part of the sample.")
	b.add(figs...)
	return nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// timePair times one message to direct and one to proxied, in that order
// or, if proxiedFirst, the other.
func timePair(direct, proxied string, m peers.Message, proxiedFirst bool) (d, p time.Duration, err error) {
	if proxiedFirst {
		if p, err = timeOne(proxied, m); err == nil {
			d, err = timeOne(direct, m)
		}
	} else {
		if d, err = timeOne(direct, m); err == nil {
			p, err = timeOne(proxied, m)
		}
	}
	return d, p, err
}

// timeOne sends one message on a fresh connection and returns the time from
// the dial to the reply to the final dot; it then QUITs, untimed.
func timeOne(addr string, m peers.Message) (time.Duration, error) {
	start := time.Now()
	c, err := peers.Open(addr, 10*time.Second)
	if err != nil {
		return 0, err
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if err := c.Send(m); err != nil {
		c.Close()
		return 0, fmt.Errorf("%s: %w", addr, err)
	}
	d := time.Since(start)
	c.Quit()
	return d, nil
}
