package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"net"
	"os"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
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
		{ID: "8g", Name: fmt.Sprintf("Burst of %d clients at once while the Postfix upstream is stopped, started again once all wait: delivered exactly once", n),
			Short: fmt.Sprintf("Burst of %d through an outage: delivered", n), Target: float64(n), Dir: atLeast},
		{ID: "8h", Name: "Memory per client waiting through an outage (RSS above the idle smtppool ÷ transactions waiting, at the most waiting while the upstream was down)",
			Short: "Memory per client waiting through an outage", Unit: "KiB", Digits: 1, Target: 20, Dir: atMost},
		{ID: "8i", Name: "Goroutines per client waiting through that outage (above the idle smtppool, at the same sample)", Digits: 2},
		{ID: "8j", Name: fmt.Sprintf("Time from the upstream's recovery (listening again) to the last 250 of the burst of %d", n),
			Unit: "s", Digits: 1},
	}
}

// burstSample is one look at smtppool during the burst.
type burstSample struct {
	at                        time.Duration
	rss                       int64 // KiB
	open, waiting, goroutines int
	heap, stacks              float64 // bytes in use
	allocated                 float64 // bytes allocated since smtppool started
	// awaitingMail is the clients that had sent MAIL and not yet read its
	// reply, as the clients counted them when the sample was taken.
	awaitingMail int
}

// burstKind is what the upstream does during a burst.
type burstKind int

const (
	// upstreamUp: the upstream takes the burst; clients wait for busy
	// sessions.
	upstreamUp burstKind = iota
	// upstreamOutage: the upstream is stopped before the burst and started
	// again, on the same port, once every client waits for the reply to its
	// MAIL and outageHold has passed.
	upstreamOutage
)

// readCostReads is how many reads in a row measure what one read of
// /metrics allocates in smtppool.
const readCostReads = 20

// outageHold is how long the upstream stays down once every client of an
// outage burst waits: some seconds of smtppool holding them all, well
// within SMTPPOOL_RETRY_TIMEOUT (2 minutes) and SMTPPOOL_ACQUIRE_TIMEOUT
// (3 minutes), so that no client should fail.
const outageHold = 5 * time.Second

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
	outage                    outageOutcome // for an upstreamOutage burst
}

// outageOutcome is what an outage burst saw of the outage.
type outageOutcome struct {
	stopped   time.Duration // from the first connect to the upstream's stop; negative: before the burst
	allWait   time.Duration // from the first connect until every client awaited the reply to MAIL
	holdEnd   time.Duration // from the first connect to the end of outageHold
	recovered time.Duration // from the first connect until the upstream listened again
	// Seen in smtppool's metrics just before the upstream was started
	// again: upstream_up, set-ups that failed during the burst, retries
	// by reason, transactions finished during the burst (none may have).
	up                float64
	failedSetUps      float64
	retries           map[string]float64
	finished          float64
	waitingAtRecovery int     // smtppool's transactions waiting then
	toLast            float64 // seconds from the recovery to the last reply
	// held is the samples taken while every client waited, from the
	// first with the most transactions waiting (the figure's) to
	// holdEnd.
	held []burstSample
	// readCost is what one read of /metrics allocates in smtppool
	// (bytes), measured at the end of the outage, every client waiting.
	readCost float64
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
// burst) ÷ transactions waiting. Then the same burst through an outage:
// Postfix is stopped before it and started again on its port once every
// client awaits the reply to its MAIL and outageHold has passed; smtppool
// holds them all meanwhile (none may be answered before the upstream is
// back), and the memory per waiting client is taken the same way. Then
// the same burst again, with the upstream up and smtppool in a memory
// cgroup of its own, as in a container with the recommended limit, and the
// k8s example's message settings: it derives its client cap and GOMEMLIMIT
// from the limit, and the kernel charges the cgroup for all it uses.
func (b *bench) measureBurst(g *peers.Group) error {
	pl := b.plan
	figs := b.burstFigures()
	free, err := b.burstRun(g, b.bin, nil, nil, upstreamUp)
	if err != nil {
		return err
	}
	figs[0].Value, figs[1].Value, figs[2].Value, figs[3].Value = float64(free.once), mib(free.hwm), free.perClient, free.drain.Seconds()
	b.burstDetails("", free)

	down, err := b.burstRun(g, b.bin, nil, nil, upstreamOutage)
	if err != nil {
		return fmt.Errorf("through an outage: %w", err)
	}
	figs[6].Value, figs[7].Value = float64(down.once), down.perClient
	figs[8].Value, figs[9].Value = (float64(down.most.goroutines)-down.idleGoroutines)/float64(down.most.waiting), down.outage.toLast
	b.burstDetails("Through an outage: ", down)
	b.outageDetails(down)

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
	limited, err := b.burstRun(g, wrapped, k8sSettings, cg, upstreamUp)
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

// outageDetails records what an outage burst saw of the outage.
func (b *bench) outageDetails(o burstOutcome) {
	u := o.outage
	reasons := slices.Sorted(maps.Keys(u.retries))
	retries := ""
	for i, r := range reasons {
		if i > 0 {
			retries += ", "
		}
		retries += fmt.Sprintf("%s %.0f", r, u.retries[r])
	}
	if retries == "" {
		retries = "none"
	}
	b.detail("8. Through an outage: Postfix was stopped (postfix stop) %.1f s before the first connect, and smtppool had closed its warm sessions; every client awaited the reply to its MAIL %.1f s after the first connect; Postfix was kept stopped %v more, then started, and listened again on the same port %.1f s after that moment (at %.1f s). Just before it was started, smtppool's metrics showed upstream_up %.0f, %.0f failed session set-ups, retries by reason: %s; %.0f transactions finished during the burst and %d waiting (the others, between their tries, held their buffer space). The last reply came %.1f s after Postfix listened again. At the sample with the most waiting, %d clients awaited the reply to MAIL.",
		-u.stopped.Seconds(), u.allWait.Seconds(), outageHold, (u.recovered - u.allWait).Seconds(), u.recovered.Seconds(), u.up, u.failedSetUps, retries,
		u.finished, u.waitingAtRecovery, u.toLast, o.most.awaitingMail)
	if len(u.held) < 2 {
		return
	}
	first, last := u.held[0], u.held[len(u.held)-1]
	secs := (last.at - first.at).Seconds()
	b.detail("8. Through an outage, while every client waited: %d samples from the one above, at %.1f s, to the end of the %v hold, at %.1f s; RSS %.1f MiB at the first (%.1f KiB per waiting client), %.1f MiB at the last (%.1f KiB); heap in use %.1f then %.1f MiB. smtppool allocated %.1f MiB meanwhile (go_memstats_alloc_bytes_total), %.0f KiB/s; one read of /metrics allocates %.0f KiB in it (%d reads in a row at the end of the outage), so the %d reads of the samples between the first and the last account for %.1f MiB of that.",
		len(u.held), first.at.Seconds(), outageHold, last.at.Seconds(), mib(first.rss), float64(first.rss-o.idle)/float64(first.waiting),
		mib(last.rss), float64(last.rss-o.idle)/float64(last.waiting), first.heap/(1<<20), last.heap/(1<<20),
		(last.allocated-first.allocated)/(1<<20), (last.allocated-first.allocated)/1024/secs, u.readCost/1024, readCostReads,
		len(u.held)-1, float64(len(u.held)-1)*u.readCost/(1<<20))
}

// burstRun is one burst through the smtppool binary bin, with settings
// added to the measurement's; cg, if not nil, is the cgroup bin runs in;
// kind says whether the upstream takes the burst or is down when it
// starts (see upstreamOutage).
func (b *bench) burstRun(g *peers.Group, bin string, settings map[string]string, cg *peers.MemCgroup, kind burstKind) (burstOutcome, error) {
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
	// smtppool logs its client cap just after it starts to listen.
	_ = peers.Poll(g.Context(), 10*time.Second, "smtppool's client capacity in its log", func() (bool, string) {
		return capacityRe.MatchString(px.Log()), "not logged yet"
	})
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
	finishedBefore, _ := idleMetrics.Value("smtppool_transactions_total")
	var stopped time.Time
	if kind == upstreamOutage {
		if err := pf.Stop(g.Context()); err != nil {
			return o, err
		}
		stopped = time.Now()
		// smtppool was measured idle as in the other runs, with its warm
		// sessions; they close once idle for SMTPPOOL_MAX_CONN_IDLE_TIME
		// (2 s): it then holds nothing of the upstream, as after an
		// outage that began while it was quiet. (Its metrics are read
		// only twice a second meanwhile: each read allocates in it.)
		if err := peers.PollEvery(g.Context(), 500*time.Millisecond, 30*time.Second, "smtppool to close its sessions to the stopped Postfix", func() (bool, string) {
			m, err := peers.ScrapeMetrics(g.Context(), admin)
			if err != nil {
				return false, err.Error()
			}
			n, _ := m.Value("smtppool_upstream_connections")
			return n == 0, fmt.Sprintf("%.0f upstream connections", n)
		}); err != nil {
			return o, err
		}
	}

	name := "burst"
	if kind == upstreamOutage {
		name = "outage-burst"
	}
	msgs := peers.NewMessages(name, pl.burstClients)
	ctx, stopSampling := context.WithCancel(g.Context())
	var samples []burstSample
	var sampled sync.WaitGroup
	var awaiting atomic.Int64
	sampled.Add(1)
	start := time.Now()
	go func() {
		defer sampled.Done()
		samples = sampleBurst(ctx, px, admin, start, &awaiting)
	}()
	burst := peers.BurstOptions{SyncGreeting: true, Timeout: 5 * time.Minute, AwaitingMail: &awaiting}
	var results []peers.Result
	var recovered time.Time
	switch kind {
	case upstreamOutage:
		done := make(chan []peers.Result, 1)
		go func() { done <- peers.SendBurst(px.Addr, msgs, burst) }()
		o.outage, recovered, err = b.outage(g.Context(), pf, admin, &awaiting, start)
		o.outage.stopped = stopped.Sub(start)
		o.outage.finished -= finishedBefore
		// Whatever became of the outage, the clients end: Postfix runs
		// again, or, if it could not be started, they time out.
		results = <-done
	default:
		results = peers.SendBurst(px.Addr, msgs, burst)
	}
	stopSampling()
	sampled.Wait()
	if err != nil {
		return o, err
	}
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
	answeredEarly := 0 // outage: clients answered before the upstream was back
	for _, r := range results {
		first, last = minTime(first, r.Start), maxTime(last, r.End)
		if r.Accepted() {
			acked = append(acked, r.Msg)
		}
		if !recovered.IsZero() && r.End.Before(recovered) {
			answeredEarly++
		}
	}
	o.drain, o.tally = last.Sub(first), tallyResults(results)
	if kind == upstreamOutage {
		o.outage.toLast = last.Sub(recovered).Seconds()
		if answeredEarly > 0 {
			return o, fmt.Errorf("%d clients were answered while the upstream was down (%s); smtppool should hold them until it is back", answeredEarly, o.tally)
		}
	}
	box, err := pf.WaitDelivered(g.Context(), acked, 5*time.Minute)
	if err != nil {
		return o, err
	}
	o.once, o.missing, o.duplicated = peers.Copies(box, msgs)

	if len(samples) == 0 {
		return o, fmt.Errorf("no sample of smtppool during the burst")
	}
	o.samples = len(samples)
	// Through an outage, the figure's sample is one taken while the
	// upstream was down: after it is back, the memory of the drain (the
	// sessions, the messages read) would count as the waiting clients'.
	candidates := samples
	if kind == upstreamOutage {
		candidates = slices.DeleteFunc(slices.Clone(samples), func(x burstSample) bool { return x.at >= o.outage.holdEnd })
		if len(candidates) == 0 {
			return o, fmt.Errorf("no sample of smtppool while the upstream was down (%d samples)", len(samples))
		}
	}
	o.most = slices.MaxFunc(candidates, func(x, y burstSample) int { return x.waiting - y.waiting }) // the first of the most
	for _, x := range samples {
		if kind == upstreamOutage && x.at >= o.most.at && x.at < o.outage.holdEnd {
			o.outage.held = append(o.outage.held, x)
		}
	}
	if o.most.waiting == 0 {
		return o, fmt.Errorf("no sample saw a transaction waiting (%d samples)", len(samples))
	}
	o.perClient = float64(o.most.rss-o.idle) / float64(o.most.waiting)
	return o, nil
}

// outage runs the outage of an upstreamOutage burst, whose clients started
// at start: it waits until every client awaits the reply to its MAIL (none
// may have been answered: smtppool holds them while it probes the
// upstream), holds the upstream down for outageHold more, checks in
// smtppool's metrics that it saw the upstream down and finished no
// transaction, measures what a read of its metrics allocates in it, and
// starts Postfix again on its port. It returns what it
// saw and when Postfix listened again.
func (b *bench) outage(ctx context.Context, pf *peers.Postfix, admin string, awaiting *atomic.Int64, start time.Time) (outageOutcome, time.Time, error) {
	var o outageOutcome
	n := int64(b.plan.burstClients)
	err := peers.PollEvery(ctx, 50*time.Millisecond, 2*time.Minute, "every client to await the reply to its MAIL", func() (bool, string) {
		a := awaiting.Load()
		return a == n, fmt.Sprintf("%d of %d clients await it", a, n)
	})
	if err == nil {
		o.allWait = time.Since(start)
		// The outage's length is the scenario, not a synchronisation.
		time.Sleep(outageHold)
		o.holdEnd = time.Since(start)
		var m peers.Metrics
		if m, err = peers.ScrapeMetrics(ctx, admin); err == nil {
			v := func(name string) float64 { x, _ := m.Value(name); return x }
			o.up, o.failedSetUps, o.finished = v("smtppool_upstream_up"), v("smtppool_upstream_connect_failures_total"), v("smtppool_transactions_total")
			o.retries, o.waitingAtRecovery = m.ByLabel("smtppool_retries_total", "reason"), int(v("smtppool_transactions_waiting"))
		}
		if err == nil {
			o.readCost, err = metricsReadCost(ctx, admin, readCostReads)
		}
	}
	if a := awaiting.Load(); err == nil && a != n {
		err = fmt.Errorf("%d of %d clients still awaited the reply to MAIL after %v of the outage; the others were answered while the upstream was down", a, n, outageHold)
	}
	if err == nil && o.up != 0 {
		err = fmt.Errorf("smtppool_upstream_up is %v while Postfix is stopped", o.up)
	}
	// Postfix starts again even after a failure, so that the clients end.
	if serr := pf.Start(ctx); serr != nil {
		return o, time.Time{}, errors.Join(err, fmt.Errorf("starting Postfix again: %w", serr))
	}
	recovered := time.Now()
	o.recovered = recovered.Sub(start)
	return o, recovered, err
}

// metricsReadCost reads smtppool's /metrics n+1 times in a row and returns
// the bytes it allocated per read, by its own count
// (go_memstats_alloc_bytes_total, which the first and last reads report).
func metricsReadCost(ctx context.Context, admin string, n int) (float64, error) {
	var first, last float64
	for i := range n + 1 {
		m, err := peers.ScrapeMetrics(ctx, admin)
		if err != nil {
			return 0, err
		}
		v, ok := m.Value("go_memstats_alloc_bytes_total")
		if !ok {
			return 0, errors.New("no go_memstats_alloc_bytes_total in smtppool's metrics")
		}
		if i == 0 {
			first = v
		}
		last = v
	}
	return (last - first) / float64(n), nil
}

// sampleBurst samples smtppool's VmRSS and metrics every 200 ms until ctx
// ends, with the count of clients awaiting the reply to MAIL.
func sampleBurst(ctx context.Context, px *peers.Proxy, admin string, start time.Time, awaiting *atomic.Int64) []burstSample {
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
		s := burstSample{at: time.Since(start), rss: rss, awaitingMail: int(awaiting.Load())}
		v := func(name string) float64 { x, _ := m.Value(name); return x }
		s.open, s.waiting, s.goroutines = int(v("smtppool_client_connections")), int(v("smtppool_transactions_waiting")), int(v("go_goroutines"))
		s.heap, s.stacks = v("go_memstats_heap_inuse_bytes"), v("go_memstats_stack_inuse_bytes")
		s.allocated = v("go_memstats_alloc_bytes_total")
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
