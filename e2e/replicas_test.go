//go:build e2e

package e2e

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// TestReplicasShareARelay is three chat-server replicas, each with its own
// smtppool (SMTPPOOL_MAX_CONNS=10, the rest at the defaults), in front of
// one Postfix relay that allows 20 concurrent connections from them all
// (they all connect from 127.0.0.1, as pods behind one NAT do). Each
// replica sends a 260-email burst, one connection per email, at the same
// moment. 30 sessions cannot all fit under the relay's 20: whichever
// replica is refused must back off as a whole, one dial at a time, and get
// its share once the others' bursts are done and their idle sessions have
// let go of the relay's slots. Asserted:
//   - every one of the 780 clients gets 250, and the time from the start of
//     the bursts until the last 250 (the upstream has accepted every
//     message by then) is under 10 s;
//   - every message is in Postfix's mailbox exactly once, by Message-ID;
//   - Postfix refuses at most 20 connections for its limit (the first
//     round of dials alone costs 10: 30 dials against 20 slots);
//   - once the bursts are over, the smtppools' idle sessions leave the
//     relay: no connection is open to it within a few seconds.
func TestReplicasShareARelay(t *testing.T) {
	const (
		replicas    = 3
		clients     = 260 // per replica
		limit       = 20  // the relay's connection limit (PF_LIMIT)
		maxConns    = 10  // each replica's SMTPPOOL_MAX_CONNS
		maxElapsed  = 10 * time.Second
		maxRefusals = 20
		// How soon the relay's connections must be gone after the bursts:
		// the default SMTPPOOL_MAX_CONN_IDLE_TIME, with room for a loaded
		// machine.
		idleRelease = 6 * time.Second
	)
	pf := startPostfix(t, peers.PostfixOptions{Limit: limit})
	logStart := pf.LogSize()
	proxies := make([]*peers.Proxy, replicas)
	addrs := make([]string, replicas)
	bursts := make([][]peers.Message, replicas)
	for i := range proxies {
		proxies[i] = startProxy(t, pf.Addr, map[string]string{"SMTPPOOL_MAX_CONNS": fmt.Sprint(maxConns)})
		addrs[i] = proxies[i].Addr
		bursts[i] = peers.NewMessages(fmt.Sprintf("replica%d", i), clients)
	}

	start := time.Now()
	results := peers.SendBursts(addrs, bursts, peers.BurstOptions{SyncGreeting: true, Timeout: 150 * time.Second})
	var all []peers.Result
	all250 := start
	for i, rs := range results {
		all = append(all, rs...)
		last := start
		for _, r := range rs {
			if r.Accepted() && r.End.After(last) {
				last = r.End
			}
		}
		if last.After(all250) {
			all250 = last
		}
		t.Logf("replica %d: %d/%d clients got 250, the last %v after the start; replies: %s; effective cap %s; sessions opened %d; set-ups failed %d",
			i, count(rs, peers.Result.Accepted), clients, last.Sub(start).Round(time.Millisecond), tally(rs),
			strings.Join(capSteps(proxies[i].Log()), " -> "), proxies[i].Count("upstream session opened"),
			proxies[i].Count("upstream session set-up failed"))
	}
	elapsed := all250.Sub(start)
	accepted := count(all, peers.Result.Accepted)
	if accepted != len(all) {
		t.Errorf("only %d/%d clients got 250; the others:\n%s", accepted, len(all),
			examples(all, 5, func(r peers.Result) bool { return !r.Accepted() }))
	}

	// The relay's slots are let go once the bursts are over.
	var open int
	released := peers.Poll(t.Context(), idleRelease, "the smtppools to close their idle sessions to the relay", func() (bool, string) {
		var err error
		open, err = peers.EstablishedTo(pf.Port)
		return err == nil && open == 0, fmt.Sprintf("%d connections open to the relay (err %v)", open, err)
	})
	releasedAfter := time.Since(all250)

	var want []peers.Message
	for _, b := range bursts {
		want = append(want, b...)
	}
	box := waitDelivered(t, pf, acknowledged(all), 60*time.Second)
	once, missing, duplicated := peers.Copies(box, want)
	refusals := strings.Count(pf.LogSince(logStart), "Connection concurrency limit exceeded")
	t.Logf("%d/%d got 250 in %v (target < %v); mailbox: %d exactly once, %d missing, %d duplicated; "+
		"relay: %d connection-limit refusals (target <= %d); relay connections all closed %v after the last 250 (%d open at the end)",
		accepted, len(all), elapsed.Round(time.Millisecond), maxElapsed, once, missing, duplicated,
		refusals, maxRefusals, releasedAfter.Round(time.Millisecond), open)
	t.Logf("RESULT elapsed=%.3fs refusals=%d", elapsed.Seconds(), refusals)
	if once != len(want) {
		t.Errorf("%d/%d messages are in the mailbox exactly once: %d missing, %d duplicated", once, len(want), missing, duplicated)
	}
	if elapsed >= maxElapsed {
		t.Errorf("the bursts took %v to be accepted, want under %v", elapsed.Round(time.Millisecond), maxElapsed)
	}
	if refusals > maxRefusals {
		t.Errorf("the relay refused %d connections for its limit, want at most %d", refusals, maxRefusals)
	}
	if released != nil {
		t.Errorf("idle sessions still hold the relay's slots: %v", released)
	}
	for _, p := range slices.Backward(proxies) {
		stopProxy(t, p)
	}
}
