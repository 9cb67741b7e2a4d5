//go:build e2e

package e2e

// The tests' side of the harness in e2e/internal/peers: each helper fails
// the test where peers returns an error, and prints what a failing test
// needs to be understood (a process's output, Postfix's log) or keeps it
// (its folders).

import (
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// waitFor polls cond until it reports true, and fails the test when timeout
// passes first. cond's status (a figure, such as "258/260 delivered") goes
// into the failure message.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (ok bool, status string)) {
	t.Helper()
	if err := peers.Poll(t.Context(), timeout, what, cond); err != nil {
		t.Fatal(err)
	}
}

// publicDir makes a folder under /tmp that the postfix and nobody users can
// search (t.TempDir makes 0700 folders), removed after a passing test and
// kept for inspection after a failing one.
func publicDir(t *testing.T, what string) string {
	t.Helper()
	dir, err := peers.PublicDir("smtppool-e2e-" + what + "-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kept %s for inspection", dir)
			return
		}
		os.RemoveAll(dir)
	})
	return dir
}

// logOnFailure prints the end of p's output if the test fails.
func logOnFailure(t *testing.T, p *peers.Process) {
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("%s output (tail):\n%s\n%s", p.Name, peers.Tail(p.Log(), 60), peers.Tail(p.Stdout(), 20))
		}
	})
}

// startProxy runs the smtppool binary against upstreamAddr, with debug logs
// in text and the variables in env added, and waits until it accepts
// connections. A data race that the race detector reports in it fails the
// test.
func startProxy(t *testing.T, upstreamAddr string, env map[string]string) *peers.Proxy {
	t.Helper()
	vars := map[string]string{"SMTPPOOL_LOG_LEVEL": "debug", "SMTPPOOL_LOG_FORMAT": "text"}
	var shown []string
	for k, v := range env {
		vars[k] = v
		shown = append(shown, k+"="+v)
	}
	slices.Sort(shown)
	var p *peers.Proxy
	t.Cleanup(func() { // runs after the proxy has been stopped
		if raceEnabled && p != nil && strings.Contains(p.Log(), "WARNING: DATA RACE") {
			t.Errorf("the race detector reported a data race in smtppool:\n%s", peers.Tail(p.Log(), 60))
		}
	})
	p, err := peers.StartProxy(t, proxyBin, upstreamAddr, vars)
	if err != nil {
		t.Fatal(err)
	}
	logOnFailure(t, p.Process)
	if len(shown) == 0 {
		shown = []string{"(defaults)"}
	}
	t.Logf("smtppool listening on %s, upstream %s, %s", p.Addr, upstreamAddr, strings.Join(shown, " "))
	return p
}

// stopProxy shuts the proxy down as an operator would, with SIGTERM, and
// waits until it has exited: it closes its upstream sessions with QUIT.
func stopProxy(t *testing.T, p *peers.Proxy) {
	t.Helper()
	if err := p.Shutdown(45 * time.Second); err != nil {
		t.Fatal(err)
	}
}

// startSink runs smtp-sink with args on a free port and waits until it
// listens. With dump, it also writes every message it accepts to a file in
// its DumpDir.
func startSink(t *testing.T, dump bool, args ...string) *peers.Sink {
	t.Helper()
	s, err := peers.StartSink(t, publicDir(t, "sink"), peers.SinkOptions{Args: args, Dump: dump})
	if err != nil {
		t.Fatal(err)
	}
	logOnFailure(t, s.Process)
	t.Logf("smtp-sink %s", strings.Join(s.Args, " "))
	return s
}

// startPostfix sets up and starts a Postfix upstream of its own, in a fresh
// folder on a free port, with the shared recipe, and waits until it
// listens. It is stopped when the test ends.
func startPostfix(t *testing.T, opts peers.PostfixOptions) *peers.Postfix {
	t.Helper()
	pf, err := peers.StartUpstream(t, publicDir(t, "postfix"), upstreamScript, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("postfix log (tail):\n%s", peers.Tail(pf.Log(), 40))
		}
	})
	t.Logf("postfix upstream on %s, PF_DIR %s, per-client limit %d, STARTTLS %v", pf.Addr, pf.Dir, pf.Limit, opts.TLSCert != "")
	return pf
}

// waitDelivered waits until Postfix has delivered every message of want and
// its queue is empty, and returns the mailbox indexed by Message-ID.
func waitDelivered(t *testing.T, pf *peers.Postfix, want []peers.Message, timeout time.Duration) peers.Mailbox {
	t.Helper()
	box, err := pf.WaitDelivered(t.Context(), want, timeout)
	if err != nil {
		t.Fatal(err)
	}
	return box
}

// acknowledged returns the messages of results whose client got 250.
func acknowledged(results []peers.Result) []peers.Message {
	var acked []peers.Message
	for _, r := range results {
		if r.Accepted() {
			acked = append(acked, r.Msg)
		}
	}
	return acked
}

// checkDuplicates fails the test for each message of results that
// smtppool sent to Postfix more than once, unless the proxy logged an
// ambiguous retry for its client (see ambiguousClients in proxyLog): the
// reply to a whole message was lost, and smtppool sent it again. Copies are
// told apart by the queue id Postfix gave each (StoredMessage.QueueID):
// each SMTP transaction that Postfix accepted has its own, so the queue ids
// are the copies smtppool sent. Two copies with one queue id are one message
// that Postfix delivered twice: its delivery agent wrote the mailbox file,
// and Postfix was stopped before its queue manager marked the recipient
// done, so it delivered the message again after its restart. That is
// Postfix's own at-least-once delivery, not smtppool's: it is allowed when
// the test stopped Postfix, down is a moment when Postfix was down (after
// its stop ended, before its restart began), and the copies' files were
// written one before and one after that moment; otherwise it fails the
// test. It returns how many messages smtppool sent twice after an
// ambiguous retry, and how many Postfix delivered again. A failure prints
// Postfix's log lines of the queue ids and smtppool's of the client.
func checkDuplicates(t *testing.T, pf *peers.Postfix, box peers.Mailbox, results []peers.Result, proxyLog string, down time.Time) (explained, redelivered int) {
	t.Helper()
	ambiguous := ambiguousClients(proxyLog)
	for _, r := range results {
		copies := box[r.Msg.ID]
		if len(copies) < 2 {
			continue
		}
		byQueue := peers.ByQueueID(copies)
		ids := slices.Sorted(maps.Keys(byQueue))
		evidence := func() string {
			var b strings.Builder
			for _, id := range ids {
				fmt.Fprintf(&b, "  postfix, queue id %q:\n%s\n", id, indentLines(grepLines(pf.Log(), id+": "), "    "))
			}
			fmt.Fprintf(&b, "  smtppool, client %s:\n%s", r.Local, indentLines(grepLines(proxyLog, "client="+r.Local+" "), "    "))
			return b.String()
		}
		if _, ok := byQueue[""]; ok {
			t.Errorf("%s: %d copies, some without Postfix's Received header: cannot tell who sent them twice\n%s", r.Msg.ID, len(copies), evidence())
			continue
		}
		for _, id := range ids {
			if n := len(byQueue[id]); n > 1 {
				redelivered++
				if before, after := aroundDown(byQueue[id], down); before > 0 && after > 0 {
					t.Logf("%s: Postfix delivered its queue file %s %d times, %d before it was stopped and %d after its restart: "+
						"stopped after its delivery agent wrote the mailbox file, before it marked the recipient done (Postfix's own at-least-once; allowed)",
						r.Msg.ID, id, n, before, after)
				} else {
					t.Errorf("%s: Postfix delivered its queue file %s %d times, not across a restart (%d copies written before %v, %d after)\n%s",
						r.Msg.ID, id, n, before, down, after, evidence())
				}
			}
		}
		if len(ids) < 2 {
			continue
		}
		if ambiguous[r.Local] {
			explained++
			t.Logf("%s: sent to Postfix %d times (queue ids %s); the proxy logged an ambiguous retry for its client %s (allowed)", r.Msg.ID, len(ids), strings.Join(ids, ", "), r.Local)
		} else {
			t.Errorf("%s: sent to Postfix %d times (queue ids %s), and the proxy logged no ambiguous retry for its client %s\n%s", r.Msg.ID, len(ids), strings.Join(ids, ", "), r.Local, evidence())
		}
	}
	return explained, redelivered
}

// aroundDown counts the copies whose files were written before down and
// those written after; with down zero (Postfix was never stopped), every
// copy counts as before.
func aroundDown(copies []peers.StoredMessage, down time.Time) (before, after int) {
	for _, c := range copies {
		fi, err := os.Stat(c.Path)
		if err == nil && !down.IsZero() && fi.ModTime().After(down) {
			after++
		} else {
			before++
		}
	}
	return before, after
}

// indentLines puts prefix before each line of s.
func indentLines(s, prefix string) string {
	if s == "" {
		return prefix + "(none)"
	}
	return prefix + strings.ReplaceAll(s, "\n", "\n"+prefix)
}

// adminAddress waits until smtppool has logged where its admin endpoints
// listen (SMTPPOOL_ADMIN_ADDR is 127.0.0.1:0 in the tests) and returns
// that address.
func adminAddress(t *testing.T, p *peers.Proxy) string {
	t.Helper()
	addr, err := peers.AdminAddr(t.Context(), p)
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

// scrapeMetrics reads smtppool's /metrics at its admin address, and fails
// the test on an error.
func scrapeMetrics(t *testing.T, addr string) peers.Metrics {
	t.Helper()
	m, err := peers.ScrapeMetrics(t.Context(), addr)
	if err != nil {
		t.Fatal(err)
	}
	return m
}
