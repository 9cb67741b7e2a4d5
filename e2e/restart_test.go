//go:build e2e

package e2e

import (
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// TestUpstreamRestartMidBurst stops the Postfix upstream one second into a
// burst of 300 messages, each over its own client connection, and starts it
// again two seconds later. The proxy runs with the default retry settings.
// Every message a client was told 250 for must be delivered; every other
// client must have been told 4xx (try again later), never 5xx, and none may
// hang or lose its connection.
func TestUpstreamRestartMidBurst(t *testing.T) {
	const (
		clients = 300
		spacing = 15 * time.Millisecond // the burst lasts 4.5 s
		stopAt  = 1 * time.Second
		downFor = 2 * time.Second
	)
	pf := startPostfix(t, peers.PostfixOptions{})
	proxy := startProxy(t, pf.Addr, map[string]string{"SMTPPOOL_MAX_CONNS": "10"})
	sampler := peers.SampleConns(t, pf.Port)
	msgs := peers.NewMessages("restart", clients)

	// The restart runs beside the burst; it reports when it stopped and
	// started Postfix, relative to the start of the burst.
	type restart struct {
		stopIssued, stopped, started time.Duration
		err                          error
	}
	restarted := make(chan restart, 1)
	ctx := t.Context()
	begin := time.Now()
	go func() {
		var r restart
		defer func() { restarted <- r }()
		time.Sleep(time.Until(begin.Add(stopAt)))
		r.stopIssued = time.Since(begin)
		if r.err = pf.Stop(ctx); r.err != nil {
			return
		}
		r.stopped = time.Since(begin)
		time.Sleep(time.Until(begin.Add(r.stopIssued + downFor)))
		if r.err = pf.Start(ctx); r.err != nil {
			return
		}
		r.started = time.Since(begin)
	}()

	results := peers.SendBurst(proxy.Addr, msgs, peers.BurstOptions{Spacing: spacing, Timeout: 60 * time.Second})
	burstTime := time.Since(begin)
	rs := <-restarted
	if rs.err != nil {
		t.Fatalf("restarting postfix: %v", rs.err)
	}
	t.Logf("burst of %d clients over %v; postfix stop issued at %v, stopped (status) at %v, started and listening again at %v",
		clients, burstTime.Round(time.Millisecond), rs.stopIssued.Round(time.Millisecond),
		rs.stopped.Round(time.Millisecond), rs.started.Round(time.Millisecond))

	var acked []peers.Message
	var ackedBefore, ackedDuring, ackedAfter int
	for _, r := range results {
		if !r.Accepted() {
			continue
		}
		acked = append(acked, r.Msg)
		switch at := r.End.Sub(begin); {
		case at < rs.stopIssued:
			ackedBefore++
		case at < rs.started:
			ackedDuring++
		default:
			ackedAfter++
		}
	}
	transient := count(results, func(r peers.Result) bool { return r.Err == nil && r.Code >= 400 && r.Code < 500 })
	permanent := count(results, func(r peers.Result) bool { return r.Err == nil && r.Code >= 500 })
	noReply := count(results, peers.Result.NoReply)
	var slowest time.Duration
	for _, r := range results {
		slowest = max(slowest, r.End.Sub(r.Start))
	}
	t.Logf("clients: %d got 250 (%d before the stop, %d between the stop and the start, %d after the start), %d got 4xx, %d got 5xx, %d no reply or hung; slowest client %v; replies: %s",
		len(acked), ackedBefore, ackedDuring, ackedAfter, transient, permanent, noReply, slowest.Round(time.Millisecond), tally(results))

	if noReply > 0 {
		t.Errorf("%d clients got no reply (dropped or hung):\n%s", noReply, examples(results, 5, peers.Result.NoReply))
	}
	if permanent > 0 {
		t.Errorf("%d clients got a permanent 5xx for a transient outage:\n%s", permanent, examples(results, 5,
			func(r peers.Result) bool { return r.Err == nil && r.Code >= 500 }))
	}
	if bad := clients - len(acked) - transient - permanent - noReply; bad != 0 {
		t.Errorf("%d clients ended neither with 250 nor with an error reply:\n%s", bad, examples(results, 5,
			func(r peers.Result) bool { return r.Err == nil && !r.Accepted() && r.Code < 400 }))
	}
	if len(acked) == 0 {
		t.Errorf("no client got 250")
	}

	// Postfix may hold acknowledged messages in its queue across the
	// restart; WaitDeliveredAfterStop flushes it. A cleanup process that
	// the stop killed may have left an unfinished queue file behind (an
	// empty incoming/582332.22886, say, which postsuper calls a bogus file
	// name at the start), which Postfix never delivers nor removes: it
	// does not count as queued.
	box, err := pf.WaitDeliveredAfterStop(t.Context(), acked, 90*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	once, missing, duplicated := peers.Copies(box, acked)
	var unacked []peers.Message
	for _, r := range results {
		if !r.Accepted() {
			unacked = append(unacked, r.Msg)
		}
	}
	_, _, unackedDup := peers.Copies(box, unacked)
	unackedOnce, unackedMissing, _ := peers.Copies(box, unacked)
	maxSeen, samples, err := sampler.Stop()
	if err != nil {
		t.Errorf("sampling upstream connections: %v", err)
	}
	t.Logf("upstream: %d/%d acknowledged messages delivered exactly once, %d missing, %d duplicated; "+
		"%d not acknowledged but delivered anyway (%d more than once), %d not delivered; "+
		"max upstream conns %d (cap 10) over %d samples; proxy logged %d retries, opened %d upstream sessions",
		once, len(acked), missing, duplicated, unackedOnce+unackedDup, unackedDup, unackedMissing, maxSeen, samples,
		proxy.Count("transient upstream failure, retrying"), proxy.Count("upstream session opened"))
	if maxSeen > 10 {
		t.Errorf("sampled %d upstream connections at once, above SMTPPOOL_MAX_CONNS=10", maxSeen)
	}
	if missing > 0 {
		t.Errorf("%d messages acknowledged with 250 are not in the mailbox", missing)
	}
	if duplicated > 0 {
		t.Logf("note: %d acknowledged messages were delivered more than once: a retry after a reply lost in the restart", duplicated)
	}
}
