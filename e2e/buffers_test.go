//go:build e2e

package e2e

import (
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// TestBurstWithFewerBuffersThanSessions: a buffer budget that holds fewer
// messages than there are upstream sessions, the measurement of issue 17:
// 2,000 emails at once, one connection each, all connected together,
// through smtppool with 10 sessions, messages of up to 10 MiB and 64 MiB of
// buffers (6 messages), and a 30 s acquire timeout, into Postfix. Every
// client gets 250 and each message is delivered exactly once. The code
// before took a session at MAIL and, finding no buffer space at DATA, gave
// it back and queued again behind every client waiting at MAIL: 730 of
// 2,000 got 250 in 35 s, 1,108 got 451 at MAIL and 162 at the end of the
// message (Postfix saw 124 MAIL and 119 RSET for 5 messages on a session).
func TestBurstWithFewerBuffersThanSessions(t *testing.T) {
	const clients = 2000
	pf := startPostfix(t, peers.PostfixOptions{})
	proxy := startProxy(t, pf.Addr, map[string]string{"SMTPPOOL_MAX_CONNS": "10", "SMTPPOOL_LOG_LEVEL": "info",
		"SMTPPOOL_MAX_MESSAGE_BYTES": "10485760", "SMTPPOOL_MAX_BUFFER_BYTES": "67108864", "SMTPPOOL_ACQUIRE_TIMEOUT": "30s"})
	msgs := peers.NewMessages("few-buffers", clients)
	start := time.Now()
	results := peers.SendBurst(proxy.Addr, msgs, peers.BurstOptions{SyncGreeting: true, Timeout: 2 * time.Minute})
	accepted := count(results, peers.Result.Accepted)
	t.Logf("%d/%d clients got 250 in %v; replies: %s", accepted, clients, time.Since(start).Round(time.Millisecond), tally(results))
	if accepted != clients {
		t.Errorf("only %d/%d clients got 250; replies: %s; examples:\n%s", accepted, clients, tally(results),
			examples(results, 5, func(r peers.Result) bool { return !r.Accepted() }))
	}
	box := waitDelivered(t, pf, acknowledged(results), 2*time.Minute)
	if once, missing, duplicated := peers.Copies(box, msgs); once != clients {
		t.Errorf("%d/%d messages in the mailbox exactly once; %d missing, %d duplicated", once, clients, missing, duplicated)
	}
}
