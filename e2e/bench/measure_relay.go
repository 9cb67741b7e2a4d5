package main

import (
	"fmt"
	"math"
	"strconv"
	"time"
)

// Figures of measurement 1, and of 4 and 5b which come from the same run.
func (b *bench) relayFigures() []figure {
	pl := b.plan
	n := pl.relayMaxConns
	return []figure{
		{ID: "1", Name: fmt.Sprintf("Throughput via smtppool ÷ direct (median of %d pairs, MAX_CONNS=%d)", pl.relayPairs, n),
			Short: "Throughput, smtppool ÷ direct", Digits: 2, Target: 0.6, Dir: atLeast},
		{ID: "1", Name: "smtppool CPU time per 1,000 messages (user+sys)", Unit: "s", Digits: 3},
		{ID: "4", Name: fmt.Sprintf("Upstream sessions per 1,000 messages (relay run, N=%d)", n),
			Short:  fmt.Sprintf("Sessions per 1,000 msgs (N=%d)", n),
			Digits: 1, Target: float64(n) + 1000.0/100, Dir: atMost},
		{ID: "5b", Name: "smtppool peak RSS (VmHWM) during the relay run", Unit: "MiB", Digits: 1},
	}
}

// measureRelay is measurement 1. One smtp-sink takes both the direct and
// the proxied runs of smtp-source; a fresh smtppool serves only this
// measurement, so that its VmHWM is this run's peak. Each pair runs direct
// and proxied back to back, in alternating order, and gives one ratio of
// throughputs (messages ÷ smtp-source's wall time); the figure is the
// median ratio.
func (b *bench) measureRelay() error {
	pl := b.plan
	figs := b.relayFigures()
	sk, err := startSink(b.tmp, 0)
	if err != nil {
		return err
	}
	defer sk.stop()
	px, err := startProxy(b.bin, sk.addr, map[string]string{
		"SMTPPOOL_MAX_CONNS": strconv.Itoa(pl.relayMaxConns),
	})
	if err != nil {
		return err
	}
	defer px.stop()

	timeout := 5*time.Minute + time.Duration(pl.relayMessages)*10*time.Millisecond
	directMsgs, proxiedMsgs := 0, 0
	// Warm-up, not measured: loads the programs, fills the pool.
	warm := min(500, pl.relayMessages)
	if _, err := runSource(pl.relaySessions, warm, pl.relayBytes, sk.addr, timeout); err != nil {
		return err
	}
	directMsgs += warm
	if _, err := runSource(pl.relaySessions, warm, pl.relayBytes, px.addr, timeout); err != nil {
		return err
	}
	proxiedMsgs += warm

	type side struct {
		rates                 []float64
		client, sinkCPU, prox cpuTimes
	}
	var direct, proxied side
	var ratios []float64
	run := func(s *side, addr string) (float64, error) {
		sk0, err := procCPU(sk.pid())
		if err != nil {
			return 0, err
		}
		px0, err := px.cpu()
		if err != nil {
			return 0, err
		}
		res, err := runSource(pl.relaySessions, pl.relayMessages, pl.relayBytes, addr, timeout)
		if err != nil {
			return 0, err
		}
		sk1, err := procCPU(sk.pid())
		if err != nil {
			return 0, err
		}
		px1, err := px.cpu()
		if err != nil {
			return 0, err
		}
		rate := float64(pl.relayMessages) / res.wall.Seconds()
		s.rates = append(s.rates, rate)
		s.client = s.client.add(res.cpu)
		s.sinkCPU = s.sinkCPU.add(sk1.sub(sk0))
		s.prox = s.prox.add(px1.sub(px0))
		return rate, px.alive()
	}
	for i := range pl.relayPairs {
		var d, p float64
		if i%2 == 0 {
			if d, err = run(&direct, sk.addr); err == nil {
				p, err = run(&proxied, px.addr)
			}
		} else {
			if p, err = run(&proxied, px.addr); err == nil {
				d, err = run(&direct, sk.addr)
			}
		}
		if err != nil {
			return err
		}
		directMsgs += pl.relayMessages
		proxiedMsgs += pl.relayMessages
		ratios = append(ratios, p/d)
		b.logf("  pair %d: direct %.0f msg/s, via smtppool %.0f msg/s, ratio %.3f", i+1, d, p, p/d)
	}

	hwm, err := px.kb("VmHWM")
	if err != nil {
		return err
	}
	cpuPerK := func(c cpuTimes) cpuTimes {
		k := float64(pl.relayPairs*pl.relayMessages) / 1000
		return cpuTimes{c.user / k, c.sys / k}
	}
	pc := cpuPerK(proxied.prox)
	figs[0].Value = median(ratios)
	figs[1].Value = pc.total()
	figs[3].Value = float64(hwm) / 1024

	// Sessions: smtp-sink counts a session when it ends. Stopping smtppool
	// ends its pooled sessions with QUIT; every direct message was its own
	// session; the rest were smtppool's.
	if err := px.shutdown(); err != nil {
		return err
	}
	c := sk.settle(500*time.Millisecond, 10*time.Second)
	upstream := c.sess - int64(directMsgs)
	figs[2].Value = float64(upstream) / float64(proxiedMsgs) * 1000
	if c.mesg != int64(directMsgs+proxiedMsgs) {
		return fmt.Errorf("smtp-sink received %d messages, want %d", c.mesg, directMsgs+proxiedMsgs)
	}

	b.detail("1. Relay cost: smtp-source -s %d -m %d -l %d (one connection per message), into smtp-sink directly and through smtppool (SMTPPOOL_MAX_CONNS=%d) into the same smtp-sink, %d pairs in alternating order after an unmeasured warm-up of %d messages each way. Throughput = messages ÷ smtp-source's wall time. Figure = median of the per-pair ratios %s.",
		pl.relaySessions, pl.relayMessages, pl.relayBytes, pl.relayMaxConns, pl.relayPairs, warm, fmtList(ratios, 3))
	b.detail("   direct: median %.0f msg/s (%s); via smtppool: median %.0f msg/s (%s).",
		median(direct.rates), fmtList(direct.rates, 0), median(proxied.rates), fmtList(proxied.rates, 0))
	dc, dsk := cpuPerK(direct.client), cpuPerK(direct.sinkCPU)
	pcl, psk := cpuPerK(proxied.client), cpuPerK(proxied.sinkCPU)
	b.detail("   CPU seconds per 1,000 messages (user + sys, from /proc/PID/stat and the client's rusage): smtppool %.3f (%.3f + %.3f); smtp-source %.3f direct, %.3f via smtppool; smtp-sink %.3f direct, %.3f via smtppool. All three share %d cores.",
		pc.total(), pc.user, pc.sys, dc.total(), pcl.total(), dsk.total(), psk.total(), numCPU())
	if sum := pcl.total() + psk.total() + pc.total(); sum > 0 {
		b.detail("   Of the CPU spent per proxied message, smtppool takes %.0f%%, the client %.0f%%, the sink %.0f%%.",
			100*pc.total()/sum, 100*pcl.total()/sum, 100*psk.total()/sum)
	}
	b.detail("4. Upstream sessions: smtp-sink counted %d sessions in all; %d were direct messages, so smtppool opened %d for %d relayed messages (%.1f per 1,000; target N + 1000/100 = %d + 10).",
		c.sess, directMsgs, upstream, proxiedMsgs, figs[2].Value, pl.relayMaxConns)
	b.detail("5b. VmHWM of the smtppool that served the whole relay run: %.1f MiB.", figs[3].Value)
	for _, f := range figs {
		if math.IsNaN(f.Value) {
			return fmt.Errorf("%s: no value", f.Name)
		}
		b.add(f)
	}
	return nil
}

func fmtList(xs []float64, digits int) string {
	s := "["
	for i, x := range xs {
		if i > 0 {
			s += " "
		}
		s += strconv.FormatFloat(x, 'f', digits, 64)
	}
	return s + "]"
}
