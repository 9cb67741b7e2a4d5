//go:build e2e

package e2e

import (
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// TestCapLearnsThePostfixLimit is the @all burst against an operator who set
// SMTPPOOL_MAX_CONNS above what the upstream allows: 30 against a Postfix
// that accepts 20 concurrent connections per client and greets the 21st with
// "421 4.7.0 ... too many connections", as Exchange does. smtppool must learn
// the limit from those refusals, lower its effective cap to it, and let
// the transactions whose sessions were refused wait for a place within
// it, so that the chat server loses nothing. Asserted:
//   - every one of the 260 clients, each on its own connection, all at
//     once, gets 250;
//   - every message is in Postfix's mailbox exactly once, by Message-ID; a
//     second copy is allowed only for a client whose retry the proxy logged
//     as ambiguous;
//   - Postfix refuses few connections for the limit (see maxRefusals);
//   - the effective cap that /metrics shows at the end is at most the
//     limit;
//   - the upstream connections sampled never exceed MAX_CONNS, and, from
//     the moment /metrics shows the cap at the limit and no session being
//     set up, never exceed the limit.
func TestCapLearnsThePostfixLimit(t *testing.T) {
	const (
		clients  = 260
		limit    = 20 // the upstream's per-client connection limit (PF_LIMIT)
		maxConns = 30 // SMTPPOOL_MAX_CONNS, above the limit
		// Postfix's refusals for the limit. Before the first refusal comes
		// back, the pool may have up to MAX_CONNS sessions dialled or being
		// set up: of those, at most maxConns-limit = 10 are past the limit
		// and refused. Each refusal lowers the cap to the sessions then
		// open, the refused one excluded, and the refused transaction waits
		// for a place within it, so the pool never again dials past what was
		// open. 5 more for races the design allows: two refusals that read
		// the same number of open sessions lower the cap once, so the cap
		// may settle one above the limit and cost one more refusal; and
		// Postfix counts a closed session (the plain-text redial of the
		// opportunistic STARTTLS check, a session closed over the cap) until
		// its smtpd has seen the disconnect.
		maxRefusals = maxConns - limit + 5
	)
	pf := startPostfix(t, peers.PostfixOptions{Limit: limit})
	logStart := pf.LogSize()
	proxy := startProxy(t, pf.Addr, map[string]string{"SMTPPOOL_MAX_CONNS": strconv.Itoa(maxConns)})
	admin := adminAddress(t, proxy)
	const capMetric = "smtppool_upstream_effective_max_connections"
	if c, ok := scrapeMetrics(t, admin).Value(capMetric); !ok || c != maxConns {
		t.Fatalf("before the burst, %s is %v (found: %v), want SMTPPOOL_MAX_CONNS=%d", capMetric, c, ok, maxConns)
	}

	// One sampler runs through the whole burst. A watcher scrapes /metrics
	// every 10 ms and starts a second sampler as soon as the effective cap
	// is at the limit or below and no session is being set up: from then
	// on the cap has been learnt, and every dial made before was answered
	// (a dial the upstream has not yet refused is an established TCP
	// connection too, and counts in the samples).
	sampler := peers.SampleConns(t, pf.Port)
	var learnt struct { // set by the watcher before it closes watchDone
		at      time.Time
		cap     float64
		sampler *peers.ConnSampler // nil: the cap was not learnt
	}
	stopWatch, watchDone := make(chan struct{}), make(chan struct{})
	stopWatching := sync.OnceFunc(func() { close(stopWatch); <-watchDone })
	defer stopWatching() // also when the test fails before the end
	go func() {
		defer close(watchDone)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			if m, err := peers.ScrapeMetrics(t.Context(), admin); err == nil {
				c, ok := m.Value(capMetric)
				dialling, _ := m.Value("smtppool_upstream_connections", "state", "constructing")
				if ok && c <= limit && dialling == 0 {
					learnt.at, learnt.cap, learnt.sampler = time.Now(), c, peers.SampleConns(t, pf.Port)
					return
				}
			}
			select {
			case <-stopWatch:
				return
			case <-tick.C:
			}
		}
	}()

	msgs := peers.NewMessages("caplearn", clients)
	start := time.Now()
	results := peers.SendBurst(proxy.Addr, msgs, peers.BurstOptions{SyncGreeting: true, Timeout: 90 * time.Second})
	elapsed := time.Since(start)
	accepted := count(results, peers.Result.Accepted)
	t.Logf("%d/%d clients got 250 in %v; replies: %s", accepted, clients, elapsed.Round(time.Millisecond), tally(results))
	if accepted != clients {
		t.Errorf("only %d/%d clients got 250; the others:\n%s", accepted, clients,
			examples(results, 5, func(r peers.Result) bool { return !r.Accepted() }))
	}

	// What arrived: every acknowledged message, once.
	box := waitDelivered(t, pf, acknowledged(results), 60*time.Second)
	stopWatching()
	wasLearnt := learnt.sampler != nil
	maxSeen, samples, err := sampler.Stop()
	if err != nil {
		t.Errorf("sampling upstream connections: %v", err)
	}
	var maxAfter, samplesAfter int
	if wasLearnt {
		if maxAfter, samplesAfter, err = learnt.sampler.Stop(); err != nil {
			t.Errorf("sampling upstream connections after the cap was learnt: %v", err)
		}
	}

	once, missing, duplicated := peers.Copies(box, msgs)
	explained, _ := checkDuplicates(t, pf, box, results, proxy.Log(), time.Time{})
	t.Logf("postfix mailbox: %d/%d exactly once, %d missing, %d duplicated (%d of them after an ambiguous retry)",
		once, clients, missing, duplicated, explained)
	if missing > 0 {
		t.Errorf("%d messages are not in the mailbox", missing)
	}

	// How the cap was learnt: the upstream's refusals, the proxy's view.
	upLog := pf.LogSince(logStart)
	refusals := strings.Count(upLog, "Connection concurrency limit exceeded")
	final := scrapeMetrics(t, admin)
	effective, ok := final.Value(capMetric)
	if !ok {
		t.Fatalf("/metrics has no %s", capMetric)
	}
	connLimitRetries, _ := final.Value("smtppool_retries_total", "reason", "conn_limit")
	reply421Retries, _ := final.Value("smtppool_retries_total", "reason", "reply_421")
	opened, _ := final.Value("smtppool_upstream_connections_opened_total")
	connectFailures, _ := final.Value("smtppool_upstream_connect_failures_total")
	closedCap, _ := final.Value("smtppool_upstream_connections_closed_total", "reason", "cap")
	steps := capSteps(proxy.Log())
	t.Logf("upstream: %d connection-limit refusals (bound %d = MAX_CONNS %d - limit %d + 5), %d connections accepted; "+
		"proxy: effective cap %d -> %s, now %v; retries conn_limit %v, reply_421 %v; %v sessions opened, %v set-ups failed, %v closed over the cap; "+
		"transactions' attempts: %s",
		refusals, maxRefusals, maxConns, limit, strings.Count(upLog, ": connect from "),
		maxConns, strings.Join(steps, " -> "), effective, connLimitRetries, reply421Retries, opened, connectFailures, closedCap,
		attemptsTally(proxy.Log()))
	if refusals == 0 {
		t.Errorf("Postfix refused no connection for its limit: the pool never went past %d, and this test proves nothing about learning it", limit)
	}
	if refusals > maxRefusals {
		t.Errorf("Postfix refused %d connections for its limit, more than %d: the cap was not learnt from the first refusals", refusals, maxRefusals)
	}
	if refusals > 0 && !strings.Contains(proxy.Log(), "lowering the effective cap") {
		t.Errorf("Postfix refused %d connections for its limit, and smtppool never lowered its effective cap: the refusal was not read as a connection limit", refusals)
	}
	if effective > limit {
		t.Errorf("the effective cap is %v at the end, above the upstream's limit of %d", effective, limit)
	}

	// The connections the upstream saw.
	if wasLearnt {
		t.Logf("upstream connections: at most %d over %d samples during the whole burst (MAX_CONNS %d); "+
			"the cap read %v with no set-up in flight on /metrics %v after the burst began, and from then on at most %d over %d samples (limit %d)",
			maxSeen, samples, maxConns, learnt.cap, learnt.at.Sub(start).Round(time.Millisecond), maxAfter, samplesAfter, limit)
	} else {
		t.Logf("upstream connections: at most %d over %d samples during the whole burst (MAX_CONNS %d); the cap never read %d or less with no set-up in flight on /metrics",
			maxSeen, samples, maxConns, limit)
		t.Errorf("/metrics never showed the effective cap at the limit of %d or below, with no set-up in flight, during the burst", limit)
	}
	if maxSeen > maxConns {
		t.Errorf("sampled %d upstream connections at once, above SMTPPOOL_MAX_CONNS=%d", maxSeen, maxConns)
	}
	if maxSeen == 0 {
		t.Errorf("the sampler never saw an upstream connection in %d samples, so it proves nothing", samples)
	}
	if wasLearnt && maxAfter > limit {
		t.Errorf("after the cap was learnt, sampled %d upstream connections at once, above the upstream's limit of %d", maxAfter, limit)
	}
	stopProxy(t, proxy)
}

// capSteps lists, in order, the effective caps that the proxy logged when
// it lowered or raised it, such as "29↓", "28↓", "21↑".
func capSteps(log string) []string {
	var steps []string
	for _, line := range strings.Split(log, "\n") {
		switch {
		case strings.Contains(line, "lowering the effective cap"):
			steps = append(steps, logField(line, "effective_max_conns")+"↓")
		case strings.Contains(line, "raising the effective cap"):
			steps = append(steps, logField(line, "effective_max_conns")+"↑")
		}
	}
	if len(steps) == 0 {
		return []string{"(unchanged)"}
	}
	return steps
}

// attemptsRE finds the attempts of a transaction's info line.
var attemptsRE = regexp.MustCompile(`msg=transaction .*\battempts=(\d+)`)

// attemptsTally counts the transactions' info lines by their attempts
// (upstream sessions tried), such as "1: 258, 2: 2".
func attemptsTally(log string) string {
	counts := map[int]int{}
	for _, line := range strings.Split(log, "\n") {
		if m := attemptsRE.FindStringSubmatch(line); m != nil {
			n, _ := strconv.Atoi(m[1])
			counts[n]++
		}
	}
	return formatCounts(counts)
}
