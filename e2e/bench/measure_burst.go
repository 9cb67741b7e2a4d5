package main

import (
	"context"
	"fmt"
	"maps"
	"math"
	"net"
	"os"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

func (b *bench) burstFigures() []figure {
	n, k := b.plan.burstClients, b.plan.burstN
	limit := float64(b.plan.burstLimit >> 20)
	return []figure{
		{ID: "8a", Name: fmt.Sprintf("Burst of %d clients at once into Postfix (N=%d, defaults): delivered exactly once", n, k),
			Short: fmt.Sprintf("Burst of %d: delivered", n), Target: float64(n), Dir: atLeast},
		{ID: "8b", Name: fmt.Sprintf("smtppool peak RSS (VmHWM) during the burst of %d, no memory limit", n),
			Short: fmt.Sprintf("Peak RSS, burst of %d", n), Unit: "MiB", Digits: 1},
		{ID: "8c", Name: "Memory per waiting client (RSS above the idle smtppool ÷ transactions waiting, at the most waiting)",
			Short: "Memory per waiting client", Unit: "KiB", Digits: 1, Target: 20, Dir: atMost},
		{ID: "8d", Name: fmt.Sprintf("Time to drain the burst of %d (first connect to last 250)", n),
			Unit: "s", Digits: 1},
		{ID: "8e", Name: fmt.Sprintf("The burst of %d with smtppool in a %.0f MiB memory cgroup, the k8s example's settings (N=5, 10 MiB messages, 64 MiB of buffers): delivered exactly once", n, limit),
			Short: fmt.Sprintf("Burst of %d in %.0f MiB: delivered", n, limit), Target: float64(n), Dir: atLeast},
		{ID: "8f", Name: fmt.Sprintf("Peak memory charged to that cgroup (user and kernel), limit %.0f MiB", limit),
			Short: fmt.Sprintf("Peak memory in a %.0f MiB cgroup", limit), Unit: "MiB", Digits: 1, Target: limit, Dir: atMost},
	}
}

// burstSample is one look at smtppool during the burst.
type burstSample struct {
	at                        time.Duration
	rss                       int64 // KiB
	open, waiting, goroutines int
	heap, stacks              float64 // bytes in use
}

// burstOutcome is what one burst run saw.
type burstOutcome struct {
	sessions                  int    // SMTPPOOL_MAX_CONNS
	capacity                  string // smtppool's client cap, as it logged it
	idle                      int64  // RSS before the burst, KiB
	idleGoroutines            float64
	tally                     string
	once, missing, duplicated int
	drain                     time.Duration
	hwm                       int64 // VmHWM, KiB
	most                      burstSample
	samples                   int
	perClient                 float64 // KiB per waiting client
	cgroupPeak                int64   // bytes; 0 without a cgroup
	oomKills                  int
}

// measureBurst is measurement 8, the burst capacity. A Postfix upstream
// (the e2e tests' recipe, which delivers to a maildir), smtppool with its
// defaults but SMTPPOOL_MAX_CONNS=N, warmed up with N messages so that its
// sessions exist; then every client connects at once, each holding after
// its greeting until all have one (as the chat server's goroutines do in a
// burst), and sends one message. Meanwhile smtppool's VmRSS and its
// metrics (client connections, transactions waiting, goroutines, heap and
// stacks in use) are sampled; the memory per waiting client is taken at the
// sample with the most transactions waiting, as (RSS - RSS before the
// burst) ÷ transactions waiting. Then the same burst again, with smtppool
// in a memory cgroup of its own, as in a container with the recommended
// limit, and the k8s example's message settings: it derives its client cap
// and GOMEMLIMIT from the limit, and the kernel charges the cgroup for all
// it uses.
func (b *bench) measureBurst(g *peers.Group) error {
	pl := b.plan
	figs := b.burstFigures()
	free, err := b.burstRun(g, b.bin, nil, nil)
	if err != nil {
		return err
	}
	figs[0].Value, figs[1].Value, figs[2].Value, figs[3].Value = float64(free.once), mib(free.hwm), free.perClient, free.drain.Seconds()
	b.burstDetails("", free)

	cg, err := peers.NewMemCgroup(g, fmt.Sprintf("smtppool-bench-%d", os.Getpid()), pl.burstLimit)
	if err != nil {
		figs[4].Value, figs[4].Err = math.NaN(), "no memory cgroup: "+firstLine(err.Error())
		figs[5].Value, figs[5].Err = math.NaN(), figs[4].Err
		b.detail("8. The run in a memory cgroup could not be made: %v", err)
		b.add(figs...)
		return nil
	}
	wrapped, err := cg.Wrap(b.bin, b.tmp)
	if err != nil {
		return err
	}
	limited, err := b.burstRun(g, wrapped, k8sSettings, cg)
	if err != nil {
		return fmt.Errorf("in a %d MiB cgroup: %w", pl.burstLimit>>20, err)
	}
	figs[4].Value, figs[5].Value = float64(limited.once), float64(limited.cgroupPeak)/(1<<20)
	b.burstDetails(fmt.Sprintf("In a memory cgroup limited to %d MiB (%s), with the k8s example's settings (SMTPPOOL_MAX_CONNS=5, SMTPPOOL_MAX_MESSAGE_BYTES=10485760, SMTPPOOL_MAX_BUFFER_BYTES=67108864): ", pl.burstLimit>>20, cg.Dir), limited)
	b.detail("8. In the cgroup: peak memory charged %.1f MiB of %d MiB, %d processes killed for memory.", float64(limited.cgroupPeak)/(1<<20), pl.burstLimit>>20, limited.oomKills)
	b.add(figs...)
	return nil
}

// k8sSettings are the k8s example's (k8s/config/configmap.yaml) that size
// its memory: 5 upstream sessions, messages up to 10 MiB, 64 MiB of
// buffers.
var k8sSettings = map[string]string{"SMTPPOOL_MAX_CONNS": "5", "SMTPPOOL_MAX_MESSAGE_BYTES": "10485760", "SMTPPOOL_MAX_BUFFER_BYTES": "67108864"}

// burstDetails records a burst run's method and raw figures.
func (b *bench) burstDetails(prefix string, o burstOutcome) {
	pl := b.plan
	s := o.most
	b.detail("8. %sa Postfix upstream (the e2e recipe, delivering to a maildir), smtppool with its defaults but SMTPPOOL_MAX_CONNS=%d; %s.",
		prefix, o.sessions, o.capacity)
	b.detail("8. After a warm-up of %d messages, RSS %.1f MiB (median of 5), %.0f goroutines. %d clients connect at once, each holds after its greeting until all have one, then sends one message (EHLO, MAIL, RCPT, DATA, QUIT): %s; %d delivered exactly once, %d missing, %d duplicated; the last reply %.1f s after the first connect.",
		o.sessions, mib(o.idle), o.idleGoroutines, pl.burstClients, o.tally, o.once, o.missing, o.duplicated, o.drain.Seconds())
	b.detail("8. %d samples of VmRSS and /metrics; the most transactions waiting, %d (of %d client connections open), at %.1f s: RSS %.1f MiB, %.1f MiB above idle, %.1f KiB per waiting client; %d goroutines (%.2f per waiting client above idle); heap in use %.1f MiB (%.1f KiB per waiting client), stacks %.1f MiB (%.1f KiB). VmHWM %.1f MiB.",
		o.samples, s.waiting, s.open, s.at.Seconds(), mib(s.rss), mib(s.rss-o.idle), o.perClient, s.goroutines,
		(float64(s.goroutines)-o.idleGoroutines)/float64(s.waiting), s.heap/(1<<20), s.heap/1024/float64(s.waiting),
		s.stacks/(1<<20), s.stacks/1024/float64(s.waiting), mib(o.hwm))
}

// burstRun is one burst through the smtppool binary bin, with settings
// added to the measurement's; cg, if not nil, is the cgroup bin runs in.
func (b *bench) burstRun(g *peers.Group, bin string, settings map[string]string, cg *peers.MemCgroup) (burstOutcome, error) {
	pl := b.plan
	var o burstOutcome
	script, err := peers.UpstreamScript(b.root)
	if err != nil {
		return o, err
	}
	dir, err := os.MkdirTemp(b.tmp, "burst-postfix-")
	if err != nil {
		return o, err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return o, err
	}
	pf, err := peers.StartUpstream(g, dir, script, peers.PostfixOptions{})
	if err != nil {
		return o, err
	}
	defer pf.Stop(g.Context())
	adminPort, err := peers.FreePort()
	if err != nil {
		return o, err
	}
	admin := net.JoinHostPort("127.0.0.1", strconv.Itoa(adminPort))
	// Defaults, but the upstream sessions and the admin endpoint; logging
	// at info for the capacity line (one line per transaction: the log is
	// part of what smtppool does).
	env := map[string]string{"SMTPPOOL_MAX_CONNS": strconv.Itoa(pl.burstN), "SMTPPOOL_ADMIN_ADDR": admin, "SMTPPOOL_LOG_LEVEL": "info"}
	maps.Copy(env, settings)
	if o.sessions, err = strconv.Atoi(env["SMTPPOOL_MAX_CONNS"]); err != nil {
		return o, err
	}
	px, err := b.startProxyBin(g, bin, pf.Addr, env)
	if err != nil {
		return o, err
	}
	defer px.Stop()
	o.capacity = capacityOf(px.Log())
	if lim, err := procOpenFilesLimit(px.Pid()); err != nil {
		return o, err
	} else if lim < int64(pl.burstClients+64) {
		return o, fmt.Errorf("smtppool's open-files limit is %d, too low for %d clients", lim, pl.burstClients)
	}

	warm := peers.NewMessages("burst-warm", o.sessions)
	for _, r := range peers.SendBurst(px.Addr, warm, peers.BurstOptions{Timeout: time.Minute}) {
		if !r.Accepted() {
			return o, fmt.Errorf("warm-up: %v", r)
		}
	}
	time.Sleep(time.Second)
	if o.idle, err = sampleMedian(px, 5, 100*time.Millisecond); err != nil {
		return o, err
	}
	idleMetrics, err := peers.ScrapeMetrics(g.Context(), admin)
	if err != nil {
		return o, err
	}
	o.idleGoroutines, _ = idleMetrics.Value("go_goroutines")

	msgs := peers.NewMessages("burst", pl.burstClients)
	ctx, stopSampling := context.WithCancel(g.Context())
	var samples []burstSample
	var sampled sync.WaitGroup
	sampled.Add(1)
	start := time.Now()
	go func() {
		defer sampled.Done()
		samples = sampleBurst(ctx, px, admin, start)
	}()
	results := peers.SendBurst(px.Addr, msgs, peers.BurstOptions{SyncGreeting: true, Timeout: 5 * time.Minute})
	stopSampling()
	sampled.Wait()
	if cg != nil {
		if o.oomKills, err = cg.OOMKills(); err != nil {
			return o, err
		}
		if o.oomKills > 0 {
			return o, fmt.Errorf("the kernel killed smtppool for memory (%d OOM kills in its cgroup)", o.oomKills)
		}
		if o.cgroupPeak, err = cg.Peak(); err != nil {
			return o, err
		}
	}
	if err := px.Alive(); err != nil {
		return o, err
	}
	if o.hwm, err = procStatusKB(px.Pid(), "VmHWM"); err != nil {
		return o, err
	}
	first, last := results[0].Start, results[0].End
	var acked []peers.Message
	for _, r := range results {
		first, last = minTime(first, r.Start), maxTime(last, r.End)
		if r.Accepted() {
			acked = append(acked, r.Msg)
		}
	}
	o.drain, o.tally = last.Sub(first), tallyResults(results)
	box, err := pf.WaitDelivered(g.Context(), acked, 5*time.Minute)
	if err != nil {
		return o, err
	}
	o.once, o.missing, o.duplicated = peers.Copies(box, msgs)

	if len(samples) == 0 {
		return o, fmt.Errorf("no sample of smtppool during the burst")
	}
	o.samples = len(samples)
	o.most = slices.MaxFunc(samples, func(x, y burstSample) int { return x.waiting - y.waiting }) // the first of the most
	if o.most.waiting == 0 {
		return o, fmt.Errorf("no sample saw a transaction waiting (%d samples)", len(samples))
	}
	o.perClient = float64(o.most.rss-o.idle) / float64(o.most.waiting)
	return o, nil
}

// sampleBurst samples smtppool's VmRSS and metrics every 200 ms until ctx
// ends.
func sampleBurst(ctx context.Context, px *peers.Proxy, admin string, start time.Time) []burstSample {
	var out []burstSample
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return out
		case <-tick.C:
		}
		rss, err := procStatusKB(px.Pid(), "VmRSS")
		if err != nil {
			continue
		}
		m, err := peers.ScrapeMetrics(ctx, admin)
		if err != nil {
			continue
		}
		s := burstSample{at: time.Since(start), rss: rss}
		v := func(name string) float64 { x, _ := m.Value(name); return x }
		s.open, s.waiting, s.goroutines = int(v("smtppool_client_connections")), int(v("smtppool_transactions_waiting")), int(v("go_goroutines"))
		s.heap, s.stacks = v("go_memstats_heap_inuse_bytes"), v("go_memstats_stack_inuse_bytes")
		out = append(out, s)
	}
}

// tallyResults counts the clients' outcomes by stage and code.
func tallyResults(results []peers.Result) string {
	counts := map[string]int{}
	var keys []string
	for _, r := range results {
		k := fmt.Sprintf("%s %d", r.Stage, r.Code)
		if r.Err != nil {
			k = r.Stage + " no reply"
		}
		if counts[k] == 0 {
			keys = append(keys, k)
		}
		counts[k]++
	}
	slices.Sort(keys)
	s := ""
	for i, k := range keys {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprintf("%s: %d", k, counts[k])
	}
	return s
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// capacityRe finds the cap and what limited it in smtppool's start-up log.
var capacityRe = regexp.MustCompile(`"msg":"client capacity","capacity":\{"max_client_conns":(\d+),"limited_by":"([^"]+)"`)

// capacityOf describes the client cap smtppool logged at start.
func capacityOf(log string) string {
	m := capacityRe.FindStringSubmatch(log)
	if m == nil {
		return "its client cap not logged"
	}
	return fmt.Sprintf("its client cap %s (%s)", m[1], m[2])
}
