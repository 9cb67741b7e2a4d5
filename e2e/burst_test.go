//go:build e2e

package e2e

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// TestBurst is the users' case. An @all in a 260-person team makes the chat
// server open 260 connections at once, one per email, to an upstream that
// allows 20 concurrent connections per client. Without the proxy the
// upstream refuses most of them with 421, and the chat server loses those
// emails; through smtppool, capped at 10 upstream connections, every email
// is accepted and delivered exactly once.
func TestBurst(t *testing.T) {
	const (
		clients  = 260
		limit    = 20 // the upstream's per-client connection limit
		maxConns = 10 // SMTPPOOL_MAX_CONNS, below the limit
	)
	pf := startPostfix(t, peers.PostfixOptions{Limit: limit})

	// 1. Without the proxy: all 260 connections open and greeted before any
	// sends, so that they are truly concurrent.
	direct := peers.NewMessages("burst-direct", clients)
	results := peers.SendBurst(pf.Addr, direct, peers.BurstOptions{SyncGreeting: true, Timeout: 90 * time.Second})
	refused := count(results, func(r peers.Result) bool { return r.Stage == peers.StageGreeting && r.Code == 421 })
	accepted := count(results, peers.Result.Accepted)
	t.Logf("direct: %d/%d refused 421 at the greeting, %d accepted; replies: %s",
		refused, clients, accepted, tally(results))
	if refused == 0 {
		t.Fatalf("direct: no client was refused with 421, so this test does not reproduce the users' problem; replies: %s", tally(results))
	}
	if accepted > limit {
		t.Errorf("direct: %d clients were accepted, more than the upstream's limit of %d", accepted, limit)
	}
	if n := count(results, peers.Result.NoReply); n > 0 {
		t.Errorf("direct: %d clients got no reply:\n%s", n, examples(results, 5, peers.Result.NoReply))
	}
	t.Logf("direct: upstream log has %d %q lines",
		strings.Count(pf.Log(), "Connection concurrency limit exceeded"), "Connection concurrency limit exceeded")

	// 2. The same burst through smtppool.
	logStart := pf.LogSize()
	proxy := startProxy(t, pf.Addr, map[string]string{"SMTPPOOL_MAX_CONNS": strconv.Itoa(maxConns)})
	sampler := peers.SampleConns(t, pf.Port)
	msgs := peers.NewMessages("burst-proxy", clients)
	start := time.Now()
	results = peers.SendBurst(proxy.Addr, msgs, peers.BurstOptions{SyncGreeting: true, Timeout: 90 * time.Second})
	elapsed := time.Since(start)
	accepted = count(results, peers.Result.Accepted)
	t.Logf("via proxy: %d/%d clients got 250 in %v; replies: %s", accepted, clients, elapsed.Round(time.Millisecond), tally(results))
	if accepted != clients {
		t.Errorf("via proxy: only %d/%d clients got 250; replies: %s; examples:\n%s", accepted, clients, tally(results),
			examples(results, 5, func(r peers.Result) bool { return !r.Accepted() }))
	}

	box := waitDelivered(t, pf, acknowledged(results), 60*time.Second)
	once, missing, duplicated := peers.Copies(box, msgs)
	maxSeen, samples, err := sampler.Stop()
	if err != nil {
		t.Errorf("sampling upstream connections: %v", err)
	}
	upLog := pf.LogSince(logStart)
	limitRefusals := strings.Count(upLog, "Connection concurrency limit exceeded")
	upstreamConns := strings.Count(upLog, ": connect from ")
	t.Logf("via proxy: %d/%d delivered exactly once, %d missing, %d duplicated; "+
		"upstream: %d connection-limit refusals, %d connections accepted; max upstream conns %d (cap %d) over %d samples (%d in one dump); "+
		"proxy opened %d upstream sessions",
		once, clients, missing, duplicated, limitRefusals, upstreamConns, maxSeen, maxConns, samples, sampler.MostInOneDump(),
		proxy.Count("upstream session opened"))

	if once != clients {
		t.Errorf("via proxy: %d/%d messages in the mailbox exactly once; %d missing, %d duplicated", once, clients, missing, duplicated)
	}
	if limitRefusals > 0 {
		t.Errorf("via proxy: the upstream refused %d connections for the connection limit", limitRefusals)
	}
	if maxSeen > maxConns {
		t.Errorf("via proxy: sampled %d upstream connections at once, above SMTPPOOL_MAX_CONNS=%d", maxSeen, maxConns)
	}
	if maxSeen == 0 {
		t.Errorf("via proxy: the sampler never saw an upstream connection in %d samples, so it proves nothing", samples)
	}
}

// TestBurstOfFiveThousand is the burst at scale: 5,000 emails sent
// the way Mattermost sends them, one connection each, all connected at
// once (each client holds after its greeting until every one has one),
// through smtppool with its defaults but SMTPPOOL_MAX_CONNS=10, into
// Postfix. A waiting client costs memory, not upstream capacity, so the
// derived client cap holds them all: every client gets 250 (with the old
// default cap of 1,000, 4,000 were refused, 3,470 of them without a
// reply), each message is delivered exactly once, and the upstream never
// sees more than 10 connections.
func TestBurstOfFiveThousand(t *testing.T) {
	const (
		clients  = 5000
		maxConns = 10
	)
	pf := startPostfix(t, peers.PostfixOptions{})
	// Info, not debug: 5,000 transactions' debug lines would only slow the
	// run down.
	proxy := startProxy(t, pf.Addr, map[string]string{"SMTPPOOL_MAX_CONNS": strconv.Itoa(maxConns), "SMTPPOOL_LOG_LEVEL": "info"})
	if line := peers.Tail(grepLines(proxy.Log(), `msg="client capacity"`), 1); line != "" {
		t.Logf("smtppool: %s", line)
	}
	sampler := peers.SampleConns(t, pf.Port)
	msgs := peers.NewMessages("burst5000", clients)
	start := time.Now()
	results := peers.SendBurst(proxy.Addr, msgs, peers.BurstOptions{SyncGreeting: true, Timeout: 4 * time.Minute})
	elapsed := time.Since(start)
	accepted := count(results, peers.Result.Accepted)
	t.Logf("%d/%d clients got 250 in %v; replies: %s", accepted, clients, elapsed.Round(time.Millisecond), tally(results))
	if accepted != clients {
		t.Errorf("only %d/%d clients got 250; replies: %s; examples:\n%s", accepted, clients, tally(results),
			examples(results, 5, func(r peers.Result) bool { return !r.Accepted() }))
	}

	box := waitDelivered(t, pf, acknowledged(results), 3*time.Minute)
	once, missing, duplicated := peers.Copies(box, msgs)
	maxSeen, samples, err := sampler.Stop()
	if err != nil {
		t.Errorf("sampling upstream connections: %v", err)
	}
	t.Logf("%d/%d delivered exactly once, %d missing, %d duplicated; max upstream conns %d (cap %d) over %d samples (%d in one dump)",
		once, clients, missing, duplicated, maxSeen, maxConns, samples, sampler.MostInOneDump())
	if once != clients {
		t.Errorf("%d/%d messages in the mailbox exactly once; %d missing, %d duplicated", once, clients, missing, duplicated)
	}
	if maxSeen > maxConns {
		t.Errorf("sampled %d upstream connections at once, above SMTPPOOL_MAX_CONNS=%d", maxSeen, maxConns)
	}
	if maxSeen == 0 {
		t.Errorf("the sampler never saw an upstream connection in %d samples, so it proves nothing", samples)
	}
}

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for _, line := range strings.Split(s, "\n") {
		if strings.Contains(line, sub) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}
