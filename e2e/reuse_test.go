//go:build e2e

package e2e

import (
	"strconv"
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// TestConnectionReuse proves that the proxy reuses its upstream sessions:
// smtp-source sends 1,000 messages, each over a connection of its own, and
// the upstream sees no more than MAX_CONNS sessions plus one renewal per
// MAX_MESSAGES_PER_CONN messages. smtp-sink's session counter is the
// evidence.
func TestConnectionReuse(t *testing.T) {
	const (
		messages = 1000
		parallel = 20  // smtp-source's parallel client sessions
		maxConns = 5   // SMTPPOOL_MAX_CONNS
		perConn  = 100 // SMTPPOOL_MAX_MESSAGES_PER_CONN, the default
		bound    = maxConns + messages/perConn
	)
	sink := startSink(t, false)
	proxy := startProxy(t, sink.Addr, map[string]string{
		"SMTPPOOL_MAX_CONNS": strconv.Itoa(maxConns),
		// smtp-sink offers no STARTTLS: no opportunistic probe sessions.
		"SMTPPOOL_UPSTREAM_TLS": "none",
	})
	sampler := peers.SampleConns(t, sink.Port)

	src, err := peers.RunSource(t, proxy.Addr, peers.SourceOptions{Sessions: parallel, Messages: messages, Subject: "reuse"}, 2*time.Minute)
	elapsed := src.Wall
	if err != nil {
		t.Fatalf("%v (smtp-source stops at the first error)", err)
	}
	waitFor(t, 10*time.Second, "smtp-sink to count every message", func() (bool, string) {
		c := sink.Counters()
		return c.Mesg >= messages, c.String()
	})

	// Stop the proxy so that it closes its sessions and smtp-sink's session
	// counter, updated when a session ends, is final.
	stopProxy(t, proxy)
	waitFor(t, 10*time.Second, "the proxy's upstream sessions to close", func() (bool, string) {
		n, err := peers.EstablishedTo(sink.Port)
		return err == nil && n == 0, strconv.Itoa(n) + " open"
	})
	maxSeen, samples, err := sampler.Stop()
	if err != nil {
		t.Errorf("sampling upstream connections: %v", err)
	}
	c := sink.Counters()
	t.Logf("%d messages from %d parallel smtp-source sessions in %v; upstream smtp-sink: %v; bound %d sessions (%d + %d/%d); "+
		"max upstream conns %d (cap %d) over %d samples; proxy opened %d sessions, retired %d at the message limit",
		messages, parallel, elapsed.Round(time.Millisecond), c, bound, maxConns, messages, perConn,
		maxSeen, maxConns, samples, proxy.Count("upstream session opened"), proxy.Count("reason=messages"))

	if c.Mesg != messages {
		t.Errorf("upstream got %d messages; want %d", c.Mesg, messages)
	}
	if c.Sess > bound {
		t.Errorf("upstream saw %d sessions for %d messages; want at most %d", c.Sess, messages, bound)
	}
	if c.Sess == 0 {
		t.Errorf("upstream counted no session at all")
	}
	if maxSeen > maxConns {
		t.Errorf("sampled %d upstream connections at once, above SMTPPOOL_MAX_CONNS=%d", maxSeen, maxConns)
	}
}
