package main

import (
	"context"
	"fmt"
	"net"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

func (b *bench) burstFigures() []figure {
	n, k := b.plan.burstClients, b.plan.burstN
	return []figure{
		{ID: "8a", Name: fmt.Sprintf("Burst of %d clients at once into Postfix (N=%d, defaults): delivered exactly once", n, k),
			Short: fmt.Sprintf("Burst of %d: delivered", n), Target: float64(n), Dir: atLeast},
		{ID: "8b", Name: fmt.Sprintf("smtppool peak RSS (VmHWM) during the burst of %d", n),
			Short: fmt.Sprintf("Peak RSS, burst of %d", n), Unit: "MiB", Digits: 1},
		{ID: "8c", Name: "Memory per waiting client (RSS above the idle smtppool ÷ transactions waiting, at the most waiting)",
			Short: "Memory per waiting client", Unit: "KiB", Digits: 1, Target: 20, Dir: atMost},
		{ID: "8d", Name: fmt.Sprintf("Time to drain the burst of %d (first connect to last 250)", n),
			Unit: "s", Digits: 1},
	}
}

// burstSample is one look at smtppool during the burst.
type burstSample struct {
	at                        time.Duration
	rss                       int64 // KiB
	open, waiting, goroutines int
	heap, stacks              float64 // bytes in use
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
// burst) ÷ transactions waiting.
func (b *bench) measureBurst(g *peers.Group) error {
	pl := b.plan
	figs := b.burstFigures()
	script, err := peers.UpstreamScript(b.root)
	if err != nil {
		return err
	}
	pf, err := peers.StartUpstream(g, b.tmp+"/burst-postfix", script, peers.PostfixOptions{})
	if err != nil {
		return err
	}
	adminPort, err := peers.FreePort()
	if err != nil {
		return err
	}
	admin := net.JoinHostPort("127.0.0.1", strconv.Itoa(adminPort))
	// Defaults, but the upstream sessions and the admin endpoint; logging
	// at info for the capacity line (one line per transaction: the log is
	// part of what smtppool does).
	px, err := b.startProxy(g, pf.Addr, map[string]string{"SMTPPOOL_MAX_CONNS": strconv.Itoa(pl.burstN),
		"SMTPPOOL_ADMIN_ADDR": admin, "SMTPPOOL_LOG_LEVEL": "info"})
	if err != nil {
		return err
	}
	defer px.Stop()
	capacity := capacityOf(px.Log())
	if lim, err := procOpenFilesLimit(px.Pid()); err != nil {
		return err
	} else if lim < int64(pl.burstClients+64) {
		return fmt.Errorf("smtppool's open-files limit is %d, too low for %d clients", lim, pl.burstClients)
	}

	warm := peers.NewMessages("burst-warm", pl.burstN)
	for _, r := range peers.SendBurst(px.Addr, warm, peers.BurstOptions{Timeout: time.Minute}) {
		if !r.Accepted() {
			return fmt.Errorf("warm-up: %v", r)
		}
	}
	time.Sleep(time.Second)
	idle, err := sampleMedian(px, 5, 100*time.Millisecond)
	if err != nil {
		return err
	}
	idleMetrics, err := peers.ScrapeMetrics(g.Context(), admin)
	if err != nil {
		return err
	}
	idleGoroutines, _ := idleMetrics.Value("go_goroutines")

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
	if err := px.Alive(); err != nil {
		return err
	}
	hwm, err := procStatusKB(px.Pid(), "VmHWM")
	if err != nil {
		return err
	}
	first, last := results[0].Start, results[0].End
	var acked []peers.Message
	for _, r := range results {
		first, last = minTime(first, r.Start), maxTime(last, r.End)
		if r.Accepted() {
			acked = append(acked, r.Msg)
		}
	}
	drain := last.Sub(first)
	box, err := pf.WaitDelivered(g.Context(), acked, 5*time.Minute)
	if err != nil {
		return err
	}
	once, missing, duplicated := peers.Copies(box, msgs)

	if len(samples) == 0 {
		return fmt.Errorf("no sample of smtppool during the burst")
	}
	s := slices.MaxFunc(samples, func(x, y burstSample) int { return x.waiting - y.waiting }) // the first of the most
	if s.waiting == 0 {
		return fmt.Errorf("no sample saw a transaction waiting (%d samples)", len(samples))
	}
	perClient := float64(s.rss-idle) / float64(s.waiting)
	figs[0].Value, figs[1].Value, figs[2].Value, figs[3].Value = float64(once), mib(hwm), perClient, drain.Seconds()
	b.detail("8. Burst capacity: a Postfix upstream (the e2e recipe, delivering to a maildir), smtppool with its defaults but SMTPPOOL_MAX_CONNS=%d; %s.",
		pl.burstN, capacity)
	b.detail("8. After a warm-up of %d messages, RSS %.1f MiB (median of 5), %.0f goroutines. %d clients connect at once, each holds after its greeting until all have one, then sends one message (EHLO, MAIL, RCPT, DATA, QUIT): %s; %d delivered exactly once, %d missing, %d duplicated; the last reply %.1f s after the first connect.",
		pl.burstN, mib(idle), idleGoroutines, pl.burstClients, tallyResults(results), once, missing, duplicated, drain.Seconds())
	b.detail("8. %d samples of VmRSS and /metrics; the most transactions waiting, %d (of %d client connections open), at %.1f s: RSS %.1f MiB, %.1f MiB above idle, %.1f KiB per waiting client; %d goroutines (%.2f per waiting client above idle); heap in use %.1f MiB (%.1f KiB per waiting client), stacks %.1f MiB (%.1f KiB). VmHWM %.1f MiB.",
		len(samples), s.waiting, s.open, s.at.Seconds(), mib(s.rss), mib(s.rss-idle), perClient, s.goroutines,
		(float64(s.goroutines)-idleGoroutines)/float64(s.waiting), s.heap/(1<<20), s.heap/1024/float64(s.waiting),
		s.stacks/(1<<20), s.stacks/1024/float64(s.waiting), mib(hwm))
	b.add(figs...)
	return nil
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
