package main

import (
	"fmt"
	"strconv"
	"time"
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

// measurePostfix is measurement 3: the same smtp-source load into a Postfix
// relay and into smtppool, each in front of its own smtp-sink, alternated.
// The time runs from smtp-source's start (its first connection) until the
// sink has counted the last message's final dot, read live from smtp-sink's
// counters. Both sides get an unmeasured warm-up of 500 messages: Postfix
// starts its daemons on demand, smtppool dials its sessions on demand.
func (b *bench) measurePostfix() error {
	pl := b.plan
	figs := b.postfixFigures()
	pfSink, err := startSink(b.tmp, 0)
	if err != nil {
		return err
	}
	defer pfSink.stop()
	pf, err := startPostfixRelay(b.tmp, pfSink.port, pl.pfN)
	if err != nil {
		return err
	}
	defer pf.stop()
	spSink, err := startSink(b.tmp, 0)
	if err != nil {
		return err
	}
	defer spSink.stop()
	px, err := startProxy(b.bin, spSink.addr, map[string]string{"SMTPPOOL_MAX_CONNS": strconv.Itoa(pl.pfN)})
	if err != nil {
		return err
	}
	defer px.stop()

	// Between runs, Postfix's queue must be empty and the machine quiet for
	// a moment, so that neither side runs into the other's tail (Postfix
	// keeps deleting queue files and writing its log after the last
	// delivery).
	pause := func() error {
		if err := pf.waitQueueEmpty(time.Minute); err != nil {
			return err
		}
		time.Sleep(time.Second)
		return nil
	}
	warm := min(500, pl.pfMessages)
	if _, _, err := timeToSink(pfSink, pf.addr, warm, pl.pfMessages); err != nil {
		return fmt.Errorf("Postfix warm-up: %w; Postfix log:\n%s", err, indent(pf.logTail()))
	}
	if err := pause(); err != nil {
		return err
	}
	if _, _, err := timeToSink(spSink, px.addr, warm, pl.pfMessages); err != nil {
		return fmt.Errorf("smtppool warm-up: %w", err)
	}

	var pfTimes, spTimes, pfAccept, spAccept, ratios []float64
	for r := range pl.pfRounds {
		var pfT, spT, pfA, spA time.Duration
		runPF := func() (err error) {
			pfT, pfA, err = timeToSink(pfSink, pf.addr, pl.pfMessages, pl.pfMessages)
			if err != nil {
				err = fmt.Errorf("Postfix: %w; Postfix log:\n%s", err, indent(pf.logTail()))
			}
			return err
		}
		runSP := func() (err error) {
			spT, spA, err = timeToSink(spSink, px.addr, pl.pfMessages, pl.pfMessages)
			if err == nil {
				err = px.alive()
			}
			return err
		}
		first, second := runPF, runSP
		if r%2 == 1 {
			first, second = runSP, runPF
		}
		for _, run := range []func() error{first, second} {
			if err := pause(); err != nil {
				return err
			}
			if err := run(); err != nil {
				return err
			}
		}
		pfTimes = append(pfTimes, pfT.Seconds())
		spTimes = append(spTimes, spT.Seconds())
		pfAccept = append(pfAccept, pfA.Seconds())
		spAccept = append(spAccept, spA.Seconds())
		ratios = append(ratios, spT.Seconds()/pfT.Seconds())
		b.logf("  round %d: Postfix %.3f s, smtppool %.3f s, ratio %.3f", r+1, pfT.Seconds(), spT.Seconds(), spT.Seconds()/pfT.Seconds())
	}
	figs[0].Value = median(ratios)

	total := warm + pl.pfRounds*pl.pfMessages
	// Stopping each relay ends its upstream sessions; the sinks then count them.
	pf.stop()
	pfc := pfSink.settle(500*time.Millisecond, 10*time.Second)
	sent, deferred := pf.logCount("status=sent"), pf.logCount("status=deferred")
	if err := px.shutdown(); err != nil {
		return err
	}
	spc := spSink.settle(500*time.Millisecond, 10*time.Second)
	if spc.mesg != int64(total) {
		return fmt.Errorf("smtppool's smtp-sink received %d messages, want %d", spc.mesg, total)
	}
	figs[1].Value = float64(spc.sess) / float64(spc.mesg) * 1000

	b.detail("3. Versus Postfix: smtp-source -s 50 -m %d -l 1000 (one connection per message) into a private Postfix relay (relayhost = the sink, default/smtp/relay_destination_concurrency_limit = %d, initial_destination_concurrency = %d, smtp_connection_cache_on_demand = yes, queue on %s) and into smtppool (SMTPPOOL_MAX_CONNS=%d), each in front of its own smtp-sink; %d rounds in alternating order after a %d-message warm-up each, with Postfix's queue empty and a 1 s pause before each run. Time = from smtp-source's start until smtp-sink counts the last final dot.",
		pl.pfMessages, pl.pfN, pl.pfN, fsType(b.tmp), pl.pfN, pl.pfRounds, warm)
	b.detail("   Postfix: %s s to reach the sink (median %.3f s); its smtpd had accepted (queued) them all after %s s.",
		fmtList(pfTimes, 3), median(pfTimes), fmtList(pfAccept, 3))
	b.detail("   smtppool: %s s to reach the sink (median %.3f s); smtp-source finished after %s s. Per-round ratios %s.",
		fmtList(spTimes, 3), median(spTimes), fmtList(spAccept, 3), fmtList(ratios, 3))
	b.detail("   Postfix logged %d status=sent and %d status=deferred for %d messages; it opened %d sessions to its sink (%.1f per 1,000 messages).",
		sent, deferred, total, pfc.sess, float64(pfc.sess)/float64(total)*1000)
	b.detail("4. Upstream sessions (same run): smtppool opened %d sessions for %d messages (%.1f per 1,000; target N + 1000/100 = %d + 10).",
		spc.sess, spc.mesg, figs[1].Value, pl.pfN)
	for _, f := range figs {
		b.add(f)
	}
	return nil
}

// timeToSink starts smtp-source with msgs messages into addr and returns
// the time from its start until sk has counted msgs more messages, and
// smtp-source's own run time. timeoutMsgs sizes the time limit.
func timeToSink(sk *sink, addr string, msgs, timeoutMsgs int) (toSink, client time.Duration, err error) {
	before := sk.snapshot().mesg
	timeout := time.Minute + time.Duration(timeoutMsgs)*50*time.Millisecond
	type result struct {
		res sourceResult
		err error
	}
	done := make(chan result, 1)
	start := time.Now()
	go func() {
		res, err := runSource(50, msgs, 1000, addr, timeout)
		done <- result{res, err}
	}()
	at, err := sk.waitFor(func(c sinkCounts) bool { return c.mesg >= before+int64(msgs) }, timeout)
	r := <-done
	if r.err != nil {
		return 0, 0, r.err
	}
	if err != nil {
		return 0, 0, err
	}
	return at.Sub(start), r.res.wall, nil
}
