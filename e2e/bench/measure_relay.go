package main

import (
	"fmt"
	"math"
	"runtime"
	"strconv"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
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

// relayBaselineFigure is measurement 1's figure for the baseline, if any.
func (b *bench) relayBaselineFigure() []figure {
	if b.baseline == "" {
		return nil
	}
	return []figure{{ID: "1", Name: fmt.Sprintf("Before (%s): Throughput via smtppool ÷ direct (median of %d rounds)", b.baselineRef, b.plan.relayPairs),
		Short: "Before: Throughput, smtppool ÷ direct", Digits: 2, Target: 0.6, Dir: atLeast},
		{ID: "1", Name: fmt.Sprintf("Before (%s): smtppool CPU time per 1,000 messages (user+sys)", b.baselineRef), Unit: "s", Digits: 3}}
}

// relaySide is what the runs of one side, direct or via smtppool, measured.
type relaySide struct {
	msgs                int // sent in all, warm-up included
	rates               []float64
	client, sink, proxy cpuTimes
}

// relayRun is measurement 1 under way.
type relayRun struct {
	g               *peers.Group
	pl              plan
	hz              float64 // clock ticks per second, for procCPU
	sk              *peers.Sink
	px              *peers.Proxy
	timeout         time.Duration
	direct, proxied relaySide
	ratios          []float64
	// The baseline, if any: its own smtp-sink and smtppool, measured
	// against the same direct runs.
	base       relaySide
	baseSk     *peers.Sink
	basePx     *peers.Proxy
	baseRatios []float64
}

// measureRelay is measurement 1. One smtp-sink takes both the direct and
// the proxied runs of smtp-source; a fresh smtppool serves only this
// measurement, so that its VmHWM is this run's peak. Each pair runs direct
// and proxied back to back, in alternating order, and gives one ratio of
// throughputs (messages ÷ smtp-source's wall time); the figure is the
// median ratio.
func (b *bench) measureRelay(g *peers.Group) error {
	pl := b.plan
	r := &relayRun{g: g, pl: pl, hz: clockTicks(), timeout: 5*time.Minute + time.Duration(pl.relayMessages)*10*time.Millisecond}
	var err error
	if r.sk, err = b.startSink(g, 0); err != nil {
		return err
	}
	if r.px, err = b.startProxy(g, r.sk.Addr, map[string]string{"SMTPPOOL_MAX_CONNS": strconv.Itoa(pl.relayMaxConns)}); err != nil {
		return err
	}
	if b.baseline != "" {
		if r.baseSk, err = b.startSink(g, 0); err != nil {
			return err
		}
		if r.basePx, err = b.startProxyBin(g, b.baseline, r.baseSk.Addr, map[string]string{"SMTPPOOL_MAX_CONNS": strconv.Itoa(pl.relayMaxConns)}); err != nil {
			return err
		}
	}
	// Warm-up, not measured: loads the programs, fills the pool.
	warm := min(500, pl.relayMessages)
	for _, s := range r.sides() {
		if _, err := peers.RunSource(g, r.addr(s), r.source(warm), r.timeout); err != nil {
			return err
		}
		s.msgs += warm
	}
	for i := range pl.relayPairs {
		if r.basePx != nil {
			rates, err := r.rotation(i)
			if err != nil {
				return err
			}
			d, p, base := rates[0], rates[1], rates[2]
			r.ratios = append(r.ratios, p/d)
			r.baseRatios = append(r.baseRatios, base/d)
			b.logf("  round %d: direct %.0f msg/s, via smtppool %.0f msg/s, ratio %.3f; before %.0f msg/s, ratio %.3f", i+1, d, p, p/d, base, base/d)
			continue
		}
		d, p, err := r.pair(i%2 == 1)
		if err != nil {
			return err
		}
		r.ratios = append(r.ratios, p/d)
		b.logf("  pair %d: direct %.0f msg/s, via smtppool %.0f msg/s, ratio %.3f", i+1, d, p, p/d)
	}
	hwm, err := procStatusKB(r.px.Pid(), "VmHWM")
	if err != nil {
		return err
	}
	// Sessions: smtp-sink counts a session when it ends. Stopping smtppool
	// ends its pooled sessions with QUIT; every direct message was its own
	// session; the rest were smtppool's.
	if err := r.px.Shutdown(proxyShutdownTimeout); err != nil {
		return err
	}
	c := r.sk.Settle(g.Context(), 500*time.Millisecond, 10*time.Second)
	if c.Mesg != r.direct.msgs+r.proxied.msgs {
		return fmt.Errorf("smtp-sink received %d messages, want %d", c.Mesg, r.direct.msgs+r.proxied.msgs)
	}
	return b.relayReport(r, c, warm, float64(hwm)/1024)
}

func (r *relayRun) addr(s *relaySide) string {
	switch s {
	case &r.direct:
		return r.sk.Addr
	case &r.base:
		return r.basePx.Addr
	}
	return r.px.Addr
}

// sides returns direct, via smtppool, and via the baseline if there is one.
func (r *relayRun) sides() []*relaySide {
	if r.basePx != nil {
		return []*relaySide{&r.direct, &r.proxied, &r.base}
	}
	return []*relaySide{&r.direct, &r.proxied}
}

// rotation runs direct, via smtppool and via the baseline, starting with
// the i-th (mod 3), and returns their throughputs in that fixed order.
func (r *relayRun) rotation(i int) ([]float64, error) {
	sides := r.sides()
	rates := make([]float64, len(sides))
	for k := range sides {
		j := (i + k) % len(sides)
		rate, err := r.measured(sides[j])
		if err != nil {
			return nil, err
		}
		rates[j] = rate
	}
	return rates, nil
}

func (r *relayRun) source(messages int) peers.SourceOptions {
	return peers.SourceOptions{Sessions: r.pl.relaySessions, Messages: messages, Bytes: r.pl.relayBytes}
}

// pair runs direct and proxied back to back, proxied first if
// proxiedFirst, and returns their throughputs.
func (r *relayRun) pair(proxiedFirst bool) (direct, proxied float64, err error) {
	if proxiedFirst {
		if proxied, err = r.measured(&r.proxied); err == nil {
			direct, err = r.measured(&r.direct)
		}
	} else {
		if direct, err = r.measured(&r.direct); err == nil {
			proxied, err = r.measured(&r.proxied)
		}
	}
	return direct, proxied, err
}

// measured runs smtp-source once into one side and returns the
// throughput, adding the CPU time that the client, the sink and smtppool
// spent to the side's.
func (r *relayRun) measured(s *relaySide) (float64, error) {
	if s == &r.base {
		px0, err := procCPU(r.basePx.Pid(), r.hz)
		if err != nil {
			return 0, err
		}
		res, err := peers.RunSource(r.g, r.addr(s), r.source(r.pl.relayMessages), r.timeout)
		if err != nil {
			return 0, err
		}
		px1, err := procCPU(r.basePx.Pid(), r.hz)
		if err != nil {
			return 0, err
		}
		rate := float64(r.pl.relayMessages) / res.Wall.Seconds()
		s.msgs += r.pl.relayMessages
		s.rates = append(s.rates, rate)
		s.proxy = s.proxy.add(px1.sub(px0))
		return rate, r.basePx.Alive()
	}
	sk0, px0, err := r.cpu()
	if err != nil {
		return 0, err
	}
	res, err := peers.RunSource(r.g, r.addr(s), r.source(r.pl.relayMessages), r.timeout)
	if err != nil {
		return 0, err
	}
	sk1, px1, err := r.cpu()
	if err != nil {
		return 0, err
	}
	rate := float64(r.pl.relayMessages) / res.Wall.Seconds()
	s.msgs += r.pl.relayMessages
	s.rates = append(s.rates, rate)
	s.client = s.client.add(sourceCPU(res))
	s.sink = s.sink.add(sk1.sub(sk0))
	s.proxy = s.proxy.add(px1.sub(px0))
	return rate, r.px.Alive()
}

// cpu reads the CPU time that the sink and smtppool have used so far.
func (r *relayRun) cpu() (sink, proxy cpuTimes, err error) {
	if sink, err = procCPU(r.sk.Pid(), r.hz); err != nil {
		return sink, proxy, err
	}
	proxy, err = procCPU(r.px.Pid(), r.hz)
	return sink, proxy, err
}

// relayReport adds the figures of measurement 1 and their details.
func (b *bench) relayReport(r *relayRun, c peers.SinkCounters, warm int, hwmMiB float64) error {
	pl := b.plan
	figs := b.relayFigures()
	cpuPerK := func(c cpuTimes) cpuTimes {
		k := float64(pl.relayPairs*pl.relayMessages) / 1000
		return cpuTimes{c.user / k, c.sys / k}
	}
	pc := cpuPerK(r.proxied.proxy)
	upstream := c.Sess - r.direct.msgs
	figs[0].Value = median(r.ratios)
	figs[1].Value = pc.total()
	figs[2].Value = float64(upstream) / float64(r.proxied.msgs) * 1000
	figs[3].Value = hwmMiB

	b.detail("1. Relay cost: smtp-source -s %d -m %d -l %d (one connection per message), into smtp-sink directly and through smtppool (SMTPPOOL_MAX_CONNS=%d) into the same smtp-sink, %d pairs in alternating order after an unmeasured warm-up of %d messages each way. Throughput = messages ÷ smtp-source's wall time. Figure = median of the per-pair ratios %s.",
		pl.relaySessions, pl.relayMessages, pl.relayBytes, pl.relayMaxConns, pl.relayPairs, warm, fmtList(r.ratios, 3))
	b.detail("   direct: median %.0f msg/s (%s); via smtppool: median %.0f msg/s (%s).",
		median(r.direct.rates), fmtList(r.direct.rates, 0), median(r.proxied.rates), fmtList(r.proxied.rates, 0))
	dc, dsk := cpuPerK(r.direct.client), cpuPerK(r.direct.sink)
	pcl, psk := cpuPerK(r.proxied.client), cpuPerK(r.proxied.sink)
	b.detail("   CPU seconds per 1,000 messages (user + sys, from /proc/PID/stat and the client's rusage): smtppool %.3f (%.3f + %.3f); smtp-source %.3f direct, %.3f via smtppool; smtp-sink %.3f direct, %.3f via smtppool. All three share %d cores.",
		pc.total(), pc.user, pc.sys, dc.total(), pcl.total(), dsk.total(), psk.total(), runtime.NumCPU())
	if sum := pcl.total() + psk.total() + pc.total(); sum > 0 {
		b.detail("   Of the CPU spent per proxied message, smtppool takes %.0f%%, the client %.0f%%, the sink %.0f%%.",
			100*pc.total()/sum, 100*pcl.total()/sum, 100*psk.total()/sum)
	}
	b.detail("4. Upstream sessions: smtp-sink counted %d sessions in all; %d were direct messages, so smtppool opened %d for %d relayed messages (%.1f per 1,000; target N + 1000/100 = %d + 10).",
		c.Sess, r.direct.msgs, upstream, r.proxied.msgs, figs[2].Value, pl.relayMaxConns)
	b.detail("5b. VmHWM of the smtppool that served the whole relay run: %.1f MiB.", figs[3].Value)
	if base := b.relayBaselineFigure(); base != nil {
		bc := cpuPerK(r.base.proxy)
		base[0].Value, base[1].Value = median(r.baseRatios), bc.total()
		b.detail("1. CPU seconds per 1,000 messages, this smtppool ÷ before: %.3f ÷ %.3f = %.2f; throughput, this ÷ before, per round: %s.",
			pc.total(), bc.total(), pc.total()/bc.total(), fmtList(ratiosOf(r.proxied.rates, r.base.rates), 3))
		b.detail("1. Before (%s), an smtppool of its own with an smtp-sink of its own, in the same rounds (direct, this smtppool, the baseline, in rotating order): median %.0f msg/s (%s); ratios to direct %s.",
			b.baselineRef, median(r.base.rates), fmtList(r.base.rates, 0), fmtList(r.baseRatios, 3))
		figs = append(figs, base...)
	}
	for _, f := range figs {
		if math.IsNaN(f.Value) {
			return fmt.Errorf("%s: no value", f.Name)
		}
	}
	b.add(figs...)
	return nil
}

// ratiosOf divides a by b, element by element.
func ratiosOf(a, b []float64) []float64 {
	out := make([]float64, min(len(a), len(b)))
	for i := range out {
		out[i] = a[i] / b[i]
	}
	return out
}
