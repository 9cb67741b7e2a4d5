//go:build e2e

package e2e

import (
	"errors"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// TestShutdownKeepsItsTimeoutWithAStalledUpstream stops smtppool, with
// SMTPPOOL_SHUTDOWN_TIMEOUT=2s, while its upstream sits on a message:
// smtp-sink (Postfix's test server) holds its reply to the final dot for 60
// seconds (-W .:60). SIGTERM comes once the upstream has the whole message.
// Asserted: smtppool exits within 10 s of the signal (the 2 s timeout plus
// the few seconds it allows itself to close what remains), with exit status
// 0, and the client is not told 250: it was cut short, so the sender keeps
// its message.
func TestShutdownKeepsItsTimeoutWithAStalledUpstream(t *testing.T) {
	const (
		stall    = 60 * time.Second // smtp-sink -W .:60
		timeout  = 2 * time.Second  // SMTPPOOL_SHUTDOWN_TIMEOUT
		exitedBy = 10 * time.Second
	)
	sink := startSink(t, false, "-W", ".:60")
	proxy := startProxy(t, sink.Addr, map[string]string{
		"SMTPPOOL_SHUTDOWN_TIMEOUT": timeout.String(),
		"SMTPPOOL_UPSTREAM_TLS":     "none", // smtp-sink offers no STARTTLS
	})

	m := peers.NewMessages("shutdown-stalled", 1)[0]
	sent := make(chan peers.Result, 1)
	go func() { sent <- peers.SendMail(proxy.Addr, m, peers.SendOptions{Timeout: stall + 30*time.Second}) }()
	// smtp-sink counts a message when its final dot arrives, before the
	// delayed reply: from then on the proxy waits on the stalled upstream.
	had, err := sink.WaitCounters(t.Context(), 30*time.Second, func(c peers.SinkCounters) bool { return c.Mesg == 1 })
	if err != nil {
		t.Fatal(err)
	}

	signalled := time.Now()
	if err := syscall.Kill(proxy.Pid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// Waiting longer than the bound measures how late a slow exit is.
	exitErr, took := waitExit(proxy.Process, stall+15*time.Second)
	r := <-sent
	t.Logf("SIGTERM %v after smtp-sink had the whole message; smtppool exited %v after the signal (%v); the client got: %v, %v after it began",
		signalled.Sub(had).Round(time.Millisecond), took.Round(time.Millisecond), exitStatus(exitErr),
		r, r.End.Sub(r.Start).Round(time.Millisecond))
	if took > exitedBy {
		t.Errorf("smtppool took %v to exit after SIGTERM with SMTPPOOL_SHUTDOWN_TIMEOUT=%v; want at most %v",
			took.Round(time.Millisecond), timeout, exitedBy)
	}
	if exitErr != nil {
		t.Errorf("smtppool exited with %v after SIGTERM; want exit status 0", exitErr)
	}
	if r.Accepted() {
		t.Errorf("the client was told 250 for a message the upstream never acknowledged: %v", r)
	}
	t.Logf("smtp-sink counted the message and still holds its reply: %v", sink.Counters())
}

// TestSecondSignalStopsAtOnce gives smtppool a long drain,
// SMTPPOOL_SHUTDOWN_TIMEOUT=60s, and a client in the middle of a
// transaction (its MAIL accepted), which the drain would wait for. After
// the first SIGTERM smtppool is still draining; a second SIGTERM must end
// it within 2 s. Its exit status is not 0: the second signal kills it with
// the default disposition, which is what an operator who insists asks for.
func TestSecondSignalStopsAtOnce(t *testing.T) {
	const exitedBy = 2 * time.Second
	sink := startSink(t, false)
	proxy := startProxy(t, sink.Addr, map[string]string{
		"SMTPPOOL_SHUTDOWN_TIMEOUT": "60s",
		"SMTPPOOL_UPSTREAM_TLS":     "none", // smtp-sink offers no STARTTLS
	})

	c, err := peers.Open(proxy.Addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if err := c.Expect(250, "MAIL FROM:<chat@client.e2e.test>"); err != nil {
		t.Fatal(err)
	}

	first := time.Now()
	if err := syscall.Kill(proxy.Pid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "smtppool to begin its shutdown", func() (bool, string) {
		return proxy.Count("shutting down") > 0 || proxy.Exited(), "not logged yet"
	})
	// The drain has begun; 200 ms on, it must still be waiting for the
	// client. This pause is the scenario (an operator's second Ctrl-C comes
	// a moment after the first), not a synchronisation.
	time.Sleep(200 * time.Millisecond)
	if proxy.Exited() {
		t.Fatalf("smtppool exited %v after the first SIGTERM, with a client mid-transaction and a 60 s drain, so this test proves nothing: %v",
			time.Since(first).Round(time.Millisecond), proxy.Failure())
	}

	second := time.Now()
	if err := syscall.Kill(proxy.Pid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	exitErr, took := waitExit(proxy.Process, 75*time.Second)
	t.Logf("second SIGTERM %v after the first; smtppool exited %v after it (%v)",
		second.Sub(first).Round(time.Millisecond), took.Round(time.Millisecond), exitStatus(exitErr))
	if took > exitedBy {
		t.Errorf("smtppool took %v to exit after the second SIGTERM; want at most %v", took.Round(time.Millisecond), exitedBy)
	}
	if exitErr == nil {
		t.Errorf("smtppool exited with status 0 after the second SIGTERM; want the signal's default disposition (killed by SIGTERM)")
	}
}

// waitExit waits up to limit for p to exit and returns how it ended (nil
// for exit status 0) and how long that took; if p is still running at the
// limit, took is the limit and the test's cleanup kills it.
func waitExit(p *peers.Process, limit time.Duration) (exitErr error, took time.Duration) {
	start := time.Now()
	done := make(chan error, 1)
	go func() { done <- p.Err() }()
	select {
	case err := <-done:
		return err, time.Since(start)
	case <-time.After(limit):
		return errors.New("still running"), limit
	}
}

// exitStatus describes how a process ended, for the log.
func exitStatus(err error) string {
	var ee *exec.ExitError
	switch {
	case err == nil:
		return "exit status 0"
	case errors.As(err, &ee):
		return ee.ProcessState.String()
	default:
		return err.Error()
	}
}
