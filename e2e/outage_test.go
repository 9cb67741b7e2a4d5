//go:build e2e

package e2e

import (
	"bufio"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// TestUpstreamOutageMidBurst is the outage the users fear: the chat server
// sends a burst of 300 emails, one connection each, 100 at a time, and in
// the middle of it the Postfix upstream goes away for 20 seconds. smtppool
// runs with its default retry settings. The open connection is the queue:
// the clients must be held, not failed. Asserted:
//   - every client gets 250, none a 4xx or a 5xx, none a dropped
//     connection;
//   - every message is in Postfix's mailbox exactly once, by Message-ID; a
//     second copy is allowed only for a client whose retry the proxy logged
//     as ambiguous (the reply to a complete message lost in the stop);
//   - the slowest client waited longer than the upstream was down, which
//     shows the clients were held through it;
//   - while the upstream was down, the proxy probed it with one dial at a
//     time and backoff, not one dial per waiting transaction (its debug
//     lines "upstream session set-up failed" are counted and their
//     intervals checked for overlap);
//   - the proxy's peak RSS stays under 100 MiB: buffered messages are
//     budgeted, however long the outage.
func TestUpstreamOutageMidBurst(t *testing.T) {
	const (
		clients     = 300
		concurrency = 100 // clients under way at once
		maxConns    = 10  // SMTPPOOL_MAX_CONNS
		stopAfter   = 100 // messages Postfix receives before it is stopped
		outage      = 20 * time.Second
		maxRSS      = 100 << 20
	)
	pf := startPostfix(t, peers.PostfixOptions{})
	proxy := startProxy(t, pf.Addr, map[string]string{"SMTPPOOL_MAX_CONNS": strconv.Itoa(maxConns)})
	msgs := peers.NewMessages("outage", clients)

	// The outage runs beside the burst: once Postfix has received
	// stopAfter messages (its cleanup logs a message-id= line for each), it
	// is stopped, kept down for the outage, and started again.
	type window struct {
		stopIssued, stopped, started time.Time // stopped: nothing listens; started: listening again
		received                     int       // messages Postfix had received at the stop
		err                          error
	}
	received := func() int { return strings.Count(pf.Log(), "message-id=<outage-") }
	outaged := make(chan window, 1)
	ctx := t.Context()
	go func() {
		var w window
		defer func() { outaged <- w }()
		if w.err = peers.Poll(ctx, 60*time.Second, "the burst to be under way", func() (bool, string) {
			n := received()
			return n >= stopAfter, fmt.Sprintf("postfix received %d messages", n)
		}); w.err != nil {
			return
		}
		w.stopIssued, w.received = time.Now(), received()
		if w.err = pf.Stop(ctx); w.err != nil {
			return
		}
		w.stopped = time.Now()
		// The outage's length is the scenario, not a synchronisation.
		time.Sleep(time.Until(w.stopIssued.Add(outage)))
		if w.err = pf.Start(ctx); w.err != nil {
			return
		}
		w.started = time.Now()
	}()

	begin := time.Now()
	// RETRY_TIMEOUT is 2 minutes: the clients' own deadline is longer, so
	// that a client cut by it shows as a failure of the proxy, not of the
	// test.
	results := peers.SendBurstLimited(proxy.Addr, msgs, concurrency, peers.SendOptions{Timeout: 150 * time.Second})
	burst := time.Since(begin)
	w := <-outaged
	if w.err != nil {
		t.Fatalf("the outage did not happen as planned: %v", w.err)
	}
	down := w.started.Sub(w.stopped)
	at := func(tm time.Time) string { return tm.Sub(begin).Round(time.Millisecond).String() }
	t.Logf("burst of %d clients, %d at a time, took %v; postfix stop issued at %v (postfix had received %d messages), "+
		"not listening from %v, listening again at %v: down for %v",
		clients, concurrency, burst.Round(time.Millisecond), at(w.stopIssued), w.received,
		at(w.stopped), at(w.started), down.Round(time.Millisecond))

	// What the clients saw.
	accepted := count(results, peers.Result.Accepted)
	transient := count(results, func(r peers.Result) bool { return r.Err == nil && r.Code >= 400 && r.Code < 500 })
	permanent := count(results, func(r peers.Result) bool { return r.Err == nil && r.Code >= 500 })
	noReply := count(results, peers.Result.NoReply)
	var slowest time.Duration
	heldThrough := 0 // clients under way before the stop and answered only after the restart
	for _, r := range results {
		slowest = max(slowest, r.End.Sub(r.Start))
		if r.Start.Before(w.stopped) && r.End.After(w.started) {
			heldThrough++
		}
	}
	t.Logf("clients: %d/%d got 250, %d got 4xx, %d got 5xx, %d no reply; %d held through the whole outage; slowest client %v; replies: %s",
		accepted, clients, transient, permanent, noReply, heldThrough, slowest.Round(time.Millisecond), tally(results))
	if accepted != clients {
		t.Errorf("%d/%d clients got 250; the others:\n%s", accepted, clients,
			examples(results, 5, func(r peers.Result) bool { return !r.Accepted() }))
	}
	if transient+permanent+noReply > 0 {
		t.Errorf("%d clients got 4xx, %d got 5xx and %d no reply, for an outage shorter than the retry window", transient, permanent, noReply)
	}
	if slowest < down || heldThrough == 0 {
		t.Errorf("the slowest client took %v, and %d were held through the outage of %v: the clients were not held until the upstream came back",
			slowest.Round(time.Millisecond), heldThrough, down.Round(time.Millisecond))
	}

	// What arrived: every acknowledged message, once.
	// Postfix was stopped mid-transaction, which may leave an unfinished
	// queue file behind that it never delivers: it does not count.
	box, err := pf.WaitDeliveredAfterStop(t.Context(), acknowledged(results), 90*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	once, missing, duplicated := peers.Copies(box, msgs)
	ambiguous := ambiguousClients(proxy.Log())
	explained, redelivered := checkDuplicates(t, pf, box, results, proxy.Log(), w.stopped)
	t.Logf("postfix mailbox: %d/%d exactly once, %d missing, %d duplicated (%d sent again by smtppool after an ambiguous retry, "+
		"%d delivered again by Postfix after its stop); proxy: %d retries logged, %d of them ambiguous, %d upstream sessions opened",
		once, clients, missing, duplicated, explained, redelivered,
		proxy.Count("transient upstream failure, retrying"), len(ambiguous), proxy.Count("upstream session opened"))
	if missing > 0 {
		t.Errorf("%d messages are not in the mailbox", missing)
	}

	// How hard the proxy knocked while the upstream was down. Each failed
	// session set-up is logged with its end time and duration, so its
	// interval is known; those that ended during the outage are counted.
	attempts, err := setUpFailures(proxy.Log())
	if err != nil {
		t.Fatal(err)
	}
	var during []interval
	for _, a := range attempts {
		if !a.end.Before(w.stopIssued) && a.end.Before(w.started) {
			during = append(during, a)
		}
	}
	// The prober's schedule bounds the dials (pool.Config.ProbeBackoff and
	// ProbeBackoffMax): once a set-up has failed, the next dial waits 250
	// ms, doubled after each failed probe up to 2 s, plus up to half again
	// at random, counted from the end of the last one. Taking every pause at
	// its shortest, probes come at most 0.25, 0.75, 1.75 and 3.75 s after
	// the first failure and every 2 s after that: 12 in 20 s. The dials
	// already under way when the upstream went away are not gated (Postfix
	// accepts and then resets connections while it stops), but the pool
	// never dials more than MAX_CONNS at once: at most 10 of those. The
	// window counted runs from the stop command to the listening port, a
	// little longer than the outage; the bound is computed for it. Without
	// the prober each of the 100 waiting transactions would dial at each of
	// its retries: hundreds.
	bound := maxConns + probesWithin(w.started.Sub(w.stopIssued))
	// Once the upstream is known to be down (from the end of the first
	// failure of the outage), at most one dial may be in flight.
	var overlap int
	if len(during) > 0 {
		overlap = maxOverlap(during, during[0].end)
	}
	t.Logf("upstream session set-ups that failed during the outage: %d (bound %d: %d dials under way at the stop + %d probes in %v); "+
		"the most in flight at once after the first failure: %d; the proxy logged %d %q and %d %q",
		len(during), bound, maxConns, bound-maxConns, w.started.Sub(w.stopIssued).Round(time.Millisecond), overlap,
		proxy.Count("upstream unreachable; probing it"), "upstream unreachable", proxy.Count("upstream reachable again"), "upstream reachable again")
	if len(during) == 0 {
		t.Errorf("the proxy logged no failed session set-up during the outage: the outage did not reach it")
	}
	if len(during) > bound {
		t.Errorf("%d session set-ups failed during the outage, above the prober's bound of %d: the waiting transactions hammered the upstream", len(during), bound)
	}
	if overlap > 1 {
		t.Errorf("%d session set-ups were in flight at once while the upstream was known to be down; want one probe at a time", overlap)
	}

	// Memory: the budget holds buffered messages whatever the outage.
	hwm, err := peakRSS(proxy.Pid())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("proxy peak RSS (VmHWM): %.1f MiB (bound %d MiB)", float64(hwm)/(1<<20), maxRSS>>20)
	if hwm > maxRSS {
		t.Errorf("the proxy's peak RSS was %.1f MiB, above %d MiB", float64(hwm)/(1<<20), maxRSS>>20)
	}
	stopProxy(t, proxy)
}

// probesWithin is the most probes the prober's schedule allows within d
// of the first failed set-up: pauses of 250 ms, 500 ms, 1 s, then 2 s, each
// at its shortest (no jitter).
func probesWithin(d time.Duration) int {
	n, pause := 0, 250*time.Millisecond
	for at := pause; at <= d; at += pause {
		n++
		pause = min(2*pause, 2*time.Second)
	}
	return n
}

// interval is when one failed session set-up was in flight.
type interval struct{ start, end time.Time }

// setUpFailures reads the proxy's debug lines "upstream session set-up
// failed" (slog text: time=... duration=...), each logged when the set-up
// ended, with how long it took.
func setUpFailures(log string) ([]interval, error) {
	var out []interval
	sc := bufio.NewScanner(strings.NewReader(log))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.Contains(line, `msg="upstream session set-up failed"`) {
			continue
		}
		end, err := time.Parse(time.RFC3339, logField(line, "time"))
		if err != nil {
			return nil, fmt.Errorf("the time of %q: %w", line, err)
		}
		d, err := time.ParseDuration(logField(line, "duration"))
		if err != nil {
			return nil, fmt.Errorf("the duration of %q: %w", line, err)
		}
		out = append(out, interval{end.Add(-d), end})
	}
	return out, sc.Err()
}

// logField returns the value of key in a slog text line, unquoted.
func logField(line, key string) string {
	i := strings.Index(line, " "+key+"=")
	if strings.HasPrefix(line, key+"=") {
		i = -1
	} else if i < 0 {
		return ""
	}
	v := line[i+len(key)+2:]
	if strings.HasPrefix(v, `"`) {
		if s, err := strconv.QuotedPrefix(v); err == nil {
			u, _ := strconv.Unquote(s)
			return u
		}
	}
	v, _, _ = strings.Cut(v, " ")
	return v
}

// maxOverlap is the most intervals in flight at one moment, counting only
// intervals that started after from. The log's times have millisecond
// precision; intervals that merely touch do not overlap.
func maxOverlap(in []interval, from time.Time) int {
	type edge struct {
		at    time.Time
		delta int
	}
	var edges []edge
	for _, iv := range in {
		if iv.start.After(from) {
			edges = append(edges, edge{iv.start, +1}, edge{iv.end, -1})
		}
	}
	slices.SortFunc(edges, func(a, b edge) int {
		if c := a.at.Compare(b.at); c != 0 {
			return c
		}
		return a.delta - b.delta // an end before a start at the same time
	})
	n, most := 0, 0
	for _, e := range edges {
		n += e.delta
		most = max(most, n)
	}
	return most
}

// ambiguousClients are the client addresses for which the proxy logged a
// retry or a failure marked ambiguous: the upstream may have kept a
// message whose reply was lost.
func ambiguousClients(log string) map[string]bool {
	clients := map[string]bool{}
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, " ambiguous=true") {
			clients[logField(line, "client")] = true
		}
	}
	return clients
}

// peakRSS is a process's peak resident set size (VmHWM), in bytes.
func peakRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no VmHWM in /proc/%d/status", pid)
}
