//go:build e2e

package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// TestStalledClientLosesItsSession (issue 16, item 1) is the issue's
// reproduction against the real binary and Postfix: SMTPPOOL_MAX_CONNS=1,
// SMTPPOOL_TRANSACTION_TIMEOUT=3s, SMTPPOOL_CLIENT_TIMEOUT=6s. A client takes
// the only upstream session and holds it while it makes smtppool wait for
// it: with MAIL, RCPT, "BDAT 5" (not LAST) and a NOOP every 3 s, which keeps
// go-smtp's read deadline fresh, or in the middle of a DATA body that it
// sends a byte a second. Three other clients, one after another, send one
// message each meanwhile. Asserted: the first of them is served within the
// transaction timeout and a few seconds' slack of the stalled client taking
// the session, all three are delivered, the stalled client's message gets
// 451 4.4.2 when it ends it, and it never reaches Postfix. The code before
// held the session through BDAT for as long as the client went on (15 s
// here, then delivered the stalled message) and through the DATA body until
// the client timeout (6 s, then 451 4.3.0).
func TestStalledClientLosesItsSession(t *testing.T) {
	const (
		timeout = 3 * time.Second
		slack   = 2 * time.Second // a loaded 2-core machine; the client timeout, 6 s, is beyond it
		stall   = 15 * time.Second
	)
	pf := startPostfix(t, peers.PostfixOptions{})
	proxy := startProxy(t, pf.Addr, map[string]string{"SMTPPOOL_UPSTREAM_TLS": "none", "SMTPPOOL_MAX_CONNS": "1",
		"SMTPPOOL_TRANSACTION_TIMEOUT": "3s", "SMTPPOOL_CLIENT_TIMEOUT": "6s", "SMTPPOOL_ACQUIRE_TIMEOUT": "30s"})

	for _, mode := range []struct {
		name       string
		start      string        // after MAIL and RCPT
		startReply int           // its reply
		every      time.Duration // how often the client keeps smtppool waiting
		keep       string        // what it sends then
		keepReply  int           // and the reply to that, if any
		end        func(m peers.Message) string
	}{
		{name: "BDAT with NOOPs", start: "BDAT 5\r\n" + "From:", startReply: 250, every: 3 * time.Second,
			keep: "NOOP\r\n", keepReply: 250,
			end: func(m peers.Message) string {
				rest := m.Bytes()[5:]
				return fmt.Sprintf("BDAT %d LAST\r\n%s", len(rest), rest)
			}},
		{name: "DATA trickled", start: "DATA\r\n", startReply: 354, every: time.Second, keep: "x",
			end: func(m peers.Message) string { return "\r\n" + string(m.Bytes()) + ".\r\n" }},
	} {
		t.Run(mode.name, func(t *testing.T) {
			msgs := peers.NewMessages("stall-"+strings.ReplaceAll(mode.name, " ", "-"), 4)
			stalled, others := msgs[0], msgs[1:]
			logStart := pf.LogSize()
			c := dialRaw(t, proxy.Addr)
			c.write(t, "EHLO chat.e2e.test\r\n", nil)
			if code, text, err := c.reply(10 * time.Second); err != nil || code != 250 {
				t.Fatalf("EHLO: %d %s (err %v)", code, text, err)
			}
			for _, cmd := range []struct {
				line string
				want int
			}{{"MAIL FROM:<" + stalled.From + ">\r\n", 250}, {"RCPT TO:<" + stalled.To + ">\r\n", 250}, {mode.start, mode.startReply}} {
				c.write(t, cmd.line, nil)
				if code, text, err := c.reply(30 * time.Second); err != nil || code != cmd.want {
					t.Fatalf("%q: %d %s (err %v), want %d", cmd.line, code, text, err, cmd.want)
				}
			}
			held := time.Now()

			// The others, one after another, while the client stalls.
			results := make(chan peers.Result, len(others))
			go func() {
				for _, m := range others {
					results <- peers.SendMail(proxy.Addr, m, peers.SendOptions{Timeout: 60 * time.Second})
				}
			}()
			var first peers.Result
			firstAt := time.Duration(-1)
			tick := time.NewTicker(mode.every)
			for time.Since(held) < stall && firstAt < 0 {
				select {
				case first = <-results:
					firstAt = time.Since(held)
				case <-tick.C:
					c.write(t, mode.keep, nil)
					if mode.keepReply != 0 {
						if code, text, err := c.reply(10 * time.Second); err != nil || code != mode.keepReply {
							t.Fatalf("%q while stalling: %d %s (err %v)", mode.keep, code, text, err)
						}
					}
				}
			}
			tick.Stop()
			c.write(t, mode.end(stalled), nil)
			code, text, err := c.reply(30 * time.Second)
			c.quit()
			if firstAt < 0 {
				first, firstAt = <-results, time.Since(held)
			}
			rest := []peers.Result{first, <-results, <-results}
			t.Logf("stalled client: %d %s (err %v); the first other client done %v after it took the session: %s",
				code, text, err, firstAt.Round(time.Millisecond), first)
			if firstAt > timeout+slack || !first.Accepted() {
				t.Errorf("the first other client was done after %v (%s), want served within %v of the timeout of %v", firstAt.Round(time.Millisecond), first, slack, timeout)
			}
			for _, r := range rest[1:] {
				if !r.Accepted() {
					t.Errorf("another client: %s, want 250", r)
				}
			}
			if err != nil || code != 451 || !strings.HasPrefix(text, "4.4.2") {
				t.Errorf("the stalled client's message got %d %s (err %v), want 451 4.4.2", code, text, err)
			}
			waitDelivered(t, pf, acknowledged(rest), 30*time.Second)
			// The stalled message must never reach Postfix: an absence,
			// watched for 2 s, ten times Postfix's delivery latency.
			_ = peers.Poll(t.Context(), 2*time.Second, "the stalled message to show up (it must not)", func() (bool, string) {
				if strings.Contains(pf.LogSince(logStart), "message-id="+stalled.ID) {
					t.Errorf("postfix received the stalled client's message %s", stalled.ID)
					return true, ""
				}
				return false, "absent"
			})
		})
	}
}
