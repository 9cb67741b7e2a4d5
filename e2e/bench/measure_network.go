package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// netRTTs are the round trips of measurement 7, made by a delay link.
var netRTTs = []time.Duration{0, 5 * time.Millisecond, 20 * time.Millisecond}

// netTargetRTT is the round trip the targets of measurement 7 are for.
const netTargetRTT = 20 * time.Millisecond

// networkFigures are measurement 7's: per RTT, the throughput of one
// upstream session against its limit, and the time to deliver a burst
// against a Postfix relay; with a baseline, the same for it.
func (b *bench) networkFigures() []figure {
	var figs []figure
	for _, v := range b.versions() {
		for _, rtt := range netRTTs {
			f := figure{ID: "7", Digits: 2}
			if rtt == 0 {
				f.Name = fmt.Sprintf("%sMessages per second per upstream session, RTT 0 (loopback through the link)", v.prefix)
				f.Unit, f.Digits = "msg/s", 0
			} else {
				f.Name = fmt.Sprintf("%sMessages per second per upstream session ÷ 1/(2×RTT), RTT %v", v.prefix, rtt)
				f.Short = fmt.Sprintf("%sPer-session rate ÷ limit, RTT %v", v.short, rtt)
			}
			if rtt == netTargetRTT {
				f.Target, f.Dir = 0.8, atLeast
			}
			figs = append(figs, f)
		}
		for _, rtt := range netRTTs {
			f := figure{ID: "7", Digits: 2,
				Name: fmt.Sprintf("%sTime to deliver %d messages, smtppool ÷ Postfix relay, RTT %v (N=%d)", v.prefix, b.plan.netMessages, rtt, b.plan.netN),
			}
			if rtt == netTargetRTT {
				f.Short = fmt.Sprintf("%sTime vs Postfix, RTT %v", v.short, rtt)
				f.Target, f.Dir = 0.6, atMost
			}
			figs = append(figs, f)
		}
	}
	return figs
}

// version is one smtppool binary under measurement: this one, or the
// baseline.
type version struct {
	bin           string
	prefix, short string // in figure names
}

// versions returns this smtppool, then the baseline if there is one.
func (b *bench) versions() []version {
	vs := []version{{bin: b.bin}}
	if b.baseline != "" {
		vs = append(vs, version{bin: b.baseline, prefix: fmt.Sprintf("Before (%s): ", b.baselineRef), short: "Before: "})
	}
	return vs
}

// netSide is one relay of measurement 7 and what was measured through it.
type netSide struct {
	name   string
	addr   string       // the relay, N sessions or Postfix
	single *peers.Proxy // smtppool with one session, or nil
	rates  map[time.Duration][]float64
	times  map[time.Duration][]float64
}

// netRun is measurement 7 under way.
type netRun struct {
	g        *peers.Group
	pl       plan
	up       *peers.Postfix // the upstream, behind the link
	link     *peers.DelayLink
	relay    *peers.Postfix
	postfix  *netSide
	smtppool []*netSide // one per version
	measured []string   // the link's mean one-way delay at each RTT
}

// measureNetwork is measurement 7: a Postfix upstream that discards what
// it takes (its queue on tmpfs), behind a TCP proxy that delays each
// direction by RTT/2, with, in front of the proxy, a Postfix relay (N
// connections, connection caching) and smtppool (N sessions, and one
// session) of each version. At each RTT:
//
//   - one session's throughput: smtp-source (10 clients) through
//     smtppool with SMTPPOOL_MAX_CONNS=1; messages ÷ smtp-source's wall
//     time, against the limit of a relay that waits two round trips per
//     message, 1/(2×RTT);
//   - a burst: smtp-source (50 clients, one connection per message) with
//     netMessages messages into each relay in turn, and the time from its
//     start until the upstream has taken the last message (its log's
//     status=sent lines), smtppool ÷ Postfix.
func (b *bench) measureNetwork(g *peers.Group) error {
	r, err := b.startNetRun(g)
	if err != nil {
		return err
	}
	for _, rtt := range netRTTs {
		r.link.SetDelay(rtt / 2)
		b.logf("  RTT %v", rtt)
		if err := r.singleSession(b, rtt); err != nil {
			return err
		}
		if err := r.bursts(b, rtt); err != nil {
			return err
		}
		mean, chunks := r.link.Measured()
		r.measured = append(r.measured, fmt.Sprintf("%v: %.2f ms over %d chunks", rtt/2, float64(mean)/1e6, chunks))
		// The figures hold only if the link delayed as set: a loaded
		// machine makes its timers late.
		if off := mean - rtt/2; off > linkTolerance(rtt/2) || off < -linkTolerance(rtt/2) {
			return fmt.Errorf("RTT %v: the delay link's mean one-way delay was %v, not %v: the machine is too loaded for its timers", rtt, mean, rtt/2)
		}
	}
	b.networkReport(r)
	return nil
}

// startNetRun starts the upstream, the link and the relays, and warms them
// up at RTT 0.
func (b *bench) startNetRun(g *peers.Group) (*netRun, error) {
	r := &netRun{g: g, pl: b.plan}
	shm := "/dev/shm"
	if fsType(shm) != "tmpfs" {
		shm = b.tmp
	}
	dir, err := os.MkdirTemp(shm, "smtppool-bench-upstream-")
	if err != nil {
		return nil, fmt.Errorf("upstream folder: %w", err)
	}
	g.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, err
	}
	if r.up, err = peers.StartDiscard(g, dir); err != nil {
		return nil, err
	}
	if r.link, err = peers.StartDelayLink(g, r.up.Addr, 0); err != nil {
		return nil, err
	}
	if r.relay, err = peers.StartRelay(g, b.tmp, r.link.Port, r.pl.netN); err != nil {
		return nil, err
	}
	r.postfix = &netSide{name: "Postfix", addr: r.relay.Addr}
	for _, v := range b.versions() {
		s := &netSide{name: "smtppool"}
		if v.bin != b.bin {
			s.name = "before"
		}
		// Sessions stay open between the runs, as a busy relay's would.
		env := map[string]string{"SMTPPOOL_MAX_CONN_IDLE_TIME": "30m", "SMTPPOOL_MAX_CONN_LIFETIME": "30m"}
		env["SMTPPOOL_MAX_CONNS"] = strconv.Itoa(r.pl.netN)
		px, err := b.startProxyBin(g, v.bin, r.link.Addr, env)
		if err != nil {
			return nil, err
		}
		s.addr = px.Addr
		env["SMTPPOOL_MAX_CONNS"] = "1"
		if s.single, err = b.startProxyBin(g, v.bin, r.link.Addr, env); err != nil {
			return nil, err
		}
		r.smtppool = append(r.smtppool, s)
	}
	for _, s := range r.sides() {
		s.rates, s.times = map[time.Duration][]float64{}, map[time.Duration][]float64{}
		if _, err := r.toUpstream(s.addr, 200); err != nil {
			return nil, fmt.Errorf("warm-up of %s: %w", s.name, err)
		}
		if s.single != nil {
			if _, err := r.source(s.single.Addr, 10, 20); err != nil {
				return nil, fmt.Errorf("warm-up of %s with one session: %w", s.name, err)
			}
		}
	}
	return r, nil
}

func (r *netRun) sides() []*netSide { return append([]*netSide{r.postfix}, r.smtppool...) }

// singleSession measures one session's throughput of each version at rtt,
// alternating the versions.
func (r *netRun) singleSession(b *bench, rtt time.Duration) error {
	msgs := r.pl.netSingleMessages(rtt)
	for rep := range r.pl.netRounds {
		for i := range r.smtppool {
			s := r.smtppool[(i+rep)%len(r.smtppool)]
			wall, err := r.source(s.single.Addr, 10, msgs)
			if err != nil {
				return fmt.Errorf("%s, one session, RTT %v: %w", s.name, rtt, err)
			}
			s.rates[rtt] = append(s.rates[rtt], float64(msgs)/wall.Seconds())
		}
	}
	for _, s := range r.smtppool {
		b.logf("    %s, one session: %s msg/s", s.name, fmtList(s.rates[rtt], 1))
	}
	return nil
}

// bursts times netMessages messages into each relay at rtt, in rotating
// order, netRounds times.
func (r *netRun) bursts(b *bench, rtt time.Duration) error {
	sides := r.sides()
	for round := range r.pl.netRounds {
		for i := range sides {
			s := sides[(i+round)%len(sides)]
			if err := r.settle(); err != nil {
				return err
			}
			took, err := r.toUpstream(s.addr, r.pl.netMessages)
			if err != nil {
				return fmt.Errorf("%s, RTT %v: %w", s.name, rtt, err)
			}
			s.times[rtt] = append(s.times[rtt], took.Seconds())
		}
	}
	for _, s := range sides {
		b.logf("    %s, %d messages: %s s", s.name, r.pl.netMessages, fmtList(s.times[rtt], 3))
	}
	return nil
}

// settle waits until neither Postfix has mail queued, then a moment more,
// so that no run starts in the tail of the one before.
func (r *netRun) settle() error {
	for _, p := range []*peers.Postfix{r.relay, r.up} {
		if err := p.WaitQueueEmpty(r.g.Context(), time.Minute); err != nil {
			return err
		}
	}
	return sleepCtx(r.g.Context(), 500*time.Millisecond)
}

// source runs smtp-source with msgs messages from clients parallel
// clients into addr, and returns its wall time.
func (r *netRun) source(addr string, clients, msgs int) (time.Duration, error) {
	res, err := peers.RunSource(r.g, addr, peers.SourceOptions{Sessions: clients, Messages: msgs, Bytes: 1000}, r.timeout(msgs))
	return res.Wall, err
}

// toUpstream runs smtp-source with msgs messages into addr and returns the
// time from its start until the upstream has taken them all.
func (r *netRun) toUpstream(addr string, msgs int) (time.Duration, error) {
	taken := r.up.CountFromNow("status=sent")
	start := time.Now()
	done := make(chan error, 1)
	go func() {
		_, err := r.source(addr, 50, msgs)
		done <- err
	}()
	var at time.Time
	err := peers.PollEvery(r.g.Context(), 5*time.Millisecond, r.timeout(msgs), "the upstream to take every message", func() (bool, string) {
		n := taken.Count()
		at = time.Now()
		return n >= msgs, fmt.Sprintf("%d/%d taken", n, msgs)
	})
	if srcErr := <-done; srcErr != nil {
		return 0, srcErr
	}
	if err != nil {
		return 0, err
	}
	return at.Sub(start), nil
}

func (r *netRun) timeout(msgs int) time.Duration {
	return time.Minute + time.Duration(msgs)*200*time.Millisecond
}

// networkReport adds the figures of measurement 7 and their details.
func (b *bench) networkReport(r *netRun) {
	pl := b.plan
	figs := b.networkFigures()
	i := 0
	for _, s := range r.smtppool {
		for _, rtt := range netRTTs {
			rate := median(s.rates[rtt])
			figs[i].Value = rate
			if rtt > 0 {
				figs[i].Value = rate * 2 * rtt.Seconds()
			}
			i++
		}
		for _, rtt := range netRTTs {
			figs[i].Value = median(s.times[rtt]) / median(r.postfix.times[rtt])
			i++
		}
	}
	b.detail("7. Network: a Postfix upstream that discards what it takes (queue on %s), behind a TCP proxy that delays each direction by RTT/2 (one timer per chunk, no bandwidth limit), with a Postfix relay (destination concurrency N = %d, connection caching) and smtppool (SMTPPOOL_MAX_CONNS=N, and =1) in front of the proxy; smtppool's idle and lifetime limits raised to 30 min so that sessions outlive the runs, other settings default (100 messages per session). RTTs %v, each with %d rounds, the sides in rotating order.",
		fsType(r.up.Dir), pl.netN, netRTTs, pl.netRounds)
	b.detail("   The link's one-way delay, set and measured (mean of every chunk that crossed it): %s.", strings.Join(r.measured, "; "))
	b.detail("   One session: smtp-source -s 10 -l 1000 through smtppool with SMTPPOOL_MAX_CONNS=1 (%d, %d and %d messages at the three RTTs); rate = messages ÷ smtp-source's wall time; limit 1/(2×RTT), the rate of a relay that waits two round trips per message.",
		pl.netSingleMessages(netRTTs[0]), pl.netSingleMessages(netRTTs[1]), pl.netSingleMessages(netRTTs[2]))
	for _, s := range r.smtppool {
		for _, rtt := range netRTTs {
			limit := "none"
			if rtt > 0 {
				limit = fmt.Sprintf("%.1f msg/s", 1/(2*rtt.Seconds()))
			}
			b.detail("   %s, one session, RTT %v: %s msg/s (median %.1f; limit %s).", s.name, rtt, fmtList(s.rates[rtt], 1), median(s.rates[rtt]), limit)
		}
	}
	b.detail("   Burst: smtp-source -s 50 -m %d -l 1000 (one connection per message) into each relay; time from its start until the upstream's log has %d more status=sent lines.", pl.netMessages, pl.netMessages)
	for _, rtt := range netRTTs {
		for _, s := range r.sides() {
			b.detail("   RTT %v, %s: %s s (median %.3f).", rtt, s.name, fmtList(s.times[rtt], 3), median(s.times[rtt]))
		}
	}
	b.add(figs...)
}

// sleepCtx waits d, or less if ctx ends; it fails when ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// linkTolerance is how far the delay link's mean one-way delay may be from
// oneWay: half a millisecond plus a tenth.
func linkTolerance(oneWay time.Duration) time.Duration {
	return 500*time.Microsecond + oneWay/10
}
