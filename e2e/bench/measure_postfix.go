package main

import (
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

func (b *bench) postfixFigures() []figure {
	pl := b.plan
	return []figure{
		{ID: "3", Name: fmt.Sprintf("Time for %d messages to reach the sink, smtppool ÷ Postfix (N=%d, median of %d)", pl.pfMessages, pl.pfN, pl.pfRounds),
			Short:  "Time to sink, smtppool ÷ Postfix",
			Digits: 3, Target: 0.2, Dir: atMost},
		{ID: "4", Name: fmt.Sprintf("Upstream sessions per 1,000 messages (Postfix-comparison run, N=%d)", pl.pfN),
			Short:  fmt.Sprintf("Sessions per 1,000 msgs (N=%d)", pl.pfN),
			Digits: 1, Target: float64(pl.pfN) + 1000.0/100, Dir: atMost},
	}
}

// postfixSide is one side of measurement 3: a relay, Postfix or smtppool,
// in front of an smtp-sink of its own, and the times measured through it.
type postfixSide struct {
	name           string
	sink           *peers.Sink
	addr           string    // the relay's
	toSink, client []float64 // seconds per round: until the sink had all, until smtp-source was done
}

// postfixRun is measurement 3 under way.
type postfixRun struct {
	g                 *peers.Group
	pl                plan
	pf                *peers.Postfix
	px                *peers.Proxy
	postfix, smtppool postfixSide
	ratios            []float64
}

// measurePostfix is measurement 3: the same smtp-source load into a Postfix
// relay and into smtppool, each in front of its own smtp-sink, alternated.
// The time runs from smtp-source's start (its first connection) until the
// sink has counted the last message's final dot, read live from smtp-sink's
// counters. Both sides get an unmeasured warm-up of 500 messages: Postfix
// starts its daemons on demand, smtppool dials its sessions on demand.
func (b *bench) measurePostfix(g *peers.Group) error {
	pl := b.plan
	r, err := b.startPostfixRun(g)
	if err != nil {
		return err
	}
	warm := min(500, pl.pfMessages)
	for i, s := range []*postfixSide{&r.postfix, &r.smtppool} {
		if i > 0 {
			if err := r.pause(); err != nil {
				return err
			}
		}
		if _, _, err := r.timeToSink(s, warm); err != nil {
			return fmt.Errorf("warm-up: %w", err)
		}
	}
	for i := range pl.pfRounds {
		if err := r.round(i%2 == 1); err != nil {
			return err
		}
		b.logf("  round %d: Postfix %.3f s, smtppool %.3f s, ratio %.3f", i+1, r.postfix.toSink[i], r.smtppool.toSink[i], r.ratios[i])
	}
	total := warm + pl.pfRounds*pl.pfMessages
	// Stopping each relay ends its upstream sessions; the sinks then count them.
	if err := r.pf.Stop(g.Context()); err != nil {
		return err
	}
	pfc := r.postfix.sink.Settle(g.Context(), 500*time.Millisecond, 10*time.Second)
	if err := r.px.Shutdown(proxyShutdownTimeout); err != nil {
		return err
	}
	spc := r.smtppool.sink.Settle(g.Context(), 500*time.Millisecond, 10*time.Second)
	if spc.Mesg != total {
		return fmt.Errorf("smtppool's smtp-sink received %d messages, want %d", spc.Mesg, total)
	}
	b.postfixReport(r, pfc, spc, warm, total)
	return nil
}

// startPostfixRun starts both sides of measurement 3.
func (b *bench) startPostfixRun(g *peers.Group) (*postfixRun, error) {
	r := &postfixRun{g: g, pl: b.plan, postfix: postfixSide{name: "Postfix"}, smtppool: postfixSide{name: "smtppool"}}
	var err error
	if r.postfix.sink, err = b.startSink(g, 0); err != nil {
		return nil, err
	}
	if r.pf, err = peers.StartRelay(g, b.tmp, r.postfix.sink.Port, r.pl.pfN); err != nil {
		return nil, err
	}
	if r.smtppool.sink, err = b.startSink(g, 0); err != nil {
		return nil, err
	}
	r.px, err = b.startProxy(g, r.smtppool.sink.Addr, map[string]string{"SMTPPOOL_MAX_CONNS": strconv.Itoa(r.pl.pfN)})
	if err != nil {
		return nil, err
	}
	r.postfix.addr, r.smtppool.addr = r.pf.Addr, r.px.Addr
	return r, nil
}

// round runs both sides once, smtppool first if smtppoolFirst, each after
// a pause.
func (r *postfixRun) round(smtppoolFirst bool) error {
	sides := []*postfixSide{&r.postfix, &r.smtppool}
	if smtppoolFirst {
		sides[0], sides[1] = sides[1], sides[0]
	}
	for _, s := range sides {
		if err := r.pause(); err != nil {
			return err
		}
		toSink, client, err := r.timeToSink(s, r.pl.pfMessages)
		if err != nil {
			return err
		}
		s.toSink = append(s.toSink, toSink.Seconds())
		s.client = append(s.client, client.Seconds())
	}
	n := len(r.ratios)
	r.ratios = append(r.ratios, r.smtppool.toSink[n]/r.postfix.toSink[n])
	return nil
}

// pause waits, between runs, until Postfix's queue is empty and then a
// moment more, so that neither side runs into the other's tail (Postfix
// keeps deleting queue files and writing its log after the last delivery).
func (r *postfixRun) pause() error {
	if err := r.pf.WaitQueueEmpty(r.g.Context(), time.Minute); err != nil {
		return err
	}
	time.Sleep(time.Second)
	return nil
}

// timeToSink starts smtp-source with msgs messages into side s and returns
// the time from its start until s's sink has counted msgs more messages,
// and smtp-source's own run time.
func (r *postfixRun) timeToSink(s *postfixSide, msgs int) (toSink, client time.Duration, err error) {
	before := s.sink.Counters().Mesg
	timeout := time.Minute + time.Duration(r.pl.pfMessages)*50*time.Millisecond
	type result struct {
		res peers.SourceResult
		err error
	}
	done := make(chan result, 1)
	start := time.Now()
	go func() {
		res, err := peers.RunSource(r.g, s.addr, peers.SourceOptions{Sessions: 50, Messages: msgs, Bytes: 1000}, timeout)
		done <- result{res, err}
	}()
	at, err := s.sink.WaitCounters(r.g.Context(), timeout, func(c peers.SinkCounters) bool { return c.Mesg >= before+msgs })
	src := <-done
	if err = errors.Join(src.err, err); err == nil && s == &r.smtppool {
		err = r.px.Alive()
	}
	if err != nil && s == &r.postfix {
		err = fmt.Errorf("%w; Postfix log:\n%s", err, peers.Tail(r.pf.Log(), 30))
	}
	if err != nil {
		return 0, 0, fmt.Errorf("%s: %w", s.name, err)
	}
	return at.Sub(start), src.res.Wall, nil
}

// postfixReport adds the figures of measurement 3 and their details.
func (b *bench) postfixReport(r *postfixRun, pfc, spc peers.SinkCounters, warm, total int) {
	pl := b.plan
	figs := b.postfixFigures()
	figs[0].Value = median(r.ratios)
	figs[1].Value = float64(spc.Sess) / float64(spc.Mesg) * 1000
	sent, deferred := r.pf.LogCount("status=sent"), r.pf.LogCount("status=deferred")
	b.detail("3. Versus Postfix: smtp-source -s 50 -m %d -l 1000 (one connection per message) into a private Postfix relay (relayhost = the sink, default/smtp/relay_destination_concurrency_limit = %d, initial_destination_concurrency = %d, smtp_connection_cache_on_demand = yes, queue on %s) and into smtppool (SMTPPOOL_MAX_CONNS=%d), each in front of its own smtp-sink; %d rounds in alternating order after a %d-message warm-up each, with Postfix's queue empty and a 1 s pause before each run. Time = from smtp-source's start until smtp-sink counts the last final dot.",
		pl.pfMessages, pl.pfN, pl.pfN, fsType(b.tmp), pl.pfN, pl.pfRounds, warm)
	b.detail("   Postfix: %s s to reach the sink (median %.3f s); its smtpd had accepted (queued) them all after %s s.",
		fmtList(r.postfix.toSink, 3), median(r.postfix.toSink), fmtList(r.postfix.client, 3))
	b.detail("   smtppool: %s s to reach the sink (median %.3f s); smtp-source finished after %s s. Per-round ratios %s.",
		fmtList(r.smtppool.toSink, 3), median(r.smtppool.toSink), fmtList(r.smtppool.client, 3), fmtList(r.ratios, 3))
	b.detail("   Postfix logged %d status=sent and %d status=deferred for %d messages; it opened %d sessions to its sink (%.1f per 1,000 messages).",
		sent, deferred, total, pfc.Sess, float64(pfc.Sess)/float64(total)*1000)
	b.detail("4. Upstream sessions (same run): smtppool opened %d sessions for %d messages (%.1f per 1,000; target N + 1000/100 = %d + 10).",
		spc.Sess, spc.Mesg, figs[1].Value, pl.pfN)
	b.add(figs...)
}
