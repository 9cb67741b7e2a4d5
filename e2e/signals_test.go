//go:build e2e

package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// TestRecipientTextDoesNotChangeTheCap is issue 16's item 4 against real
// Postfix: a client chooses recipients whose quoted local parts are the
// words of the upstreams' limit replies, and Postfix refuses them, quoting
// each address in its reply (550 5.1.1 <too many connections@...>:
// Recipient address rejected: ..., and a 450 4.2.1 for Google's peak-limit
// words). Before the fix smtppool read its limits from that text and
// lowered its effective cap from 5 to 1. Asserted: the client hears
// Postfix's own codes, smtppool_upstream_effective_max_connections stays
// at SMTPPOOL_MAX_CONNS, no retry counts as a connection limit or a
// refused rate, and the same transaction's accepted recipient gets the
// message.
func TestRecipientTextDoesNotChangeTheCap(t *testing.T) {
	const maxConns = 5
	table := filepath.Join(publicDir(t, "recipient-access"), "recipient_access")
	rules := `/too many connections"?@/ 550 5.1.1 No such user
/concurrent connections"?@/ 550 5.1.1 No such user
/peak smtp relay limit exceeded"?@/ 450 4.2.1 Mailbox busy
`
	if err := os.WriteFile(table, []byte(rules), 0o644); err != nil {
		t.Fatal(err)
	}
	pf := startPostfix(t, peers.PostfixOptions{Postconf: []string{
		"smtpd_recipient_restrictions = check_recipient_access regexp:" + table + ", permit",
	}})
	proxy := startProxy(t, pf.Addr, map[string]string{
		"SMTPPOOL_MAX_CONNS":     "5",
		"SMTPPOOL_RETRY_TIMEOUT": "2s", // the 450 is retried this long, then passed on
	})
	admin := adminAddress(t, proxy)

	msgs := peers.NewMessages("recipient-text", 1)
	c, err := peers.Open(proxy.Addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Quit()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	step := func(want int, line string) string {
		t.Helper()
		code, text, err := c.Cmd(line)
		t.Logf("%-60.60q → %d %s", line, code, text)
		if err != nil || code != want {
			t.Fatalf("%q: %d %s (err %v), want %d", line, code, text, err, want)
		}
		return text
	}
	step(250, "MAIL FROM:<"+msgs[0].From+">")
	step(250, "RCPT TO:<"+msgs[0].To+">")
	for _, local := range []string{"too many connections", "concurrent connections"} {
		text := step(550, `RCPT TO:<"`+local+`"@`+peers.MailDomain+">")
		if !strings.Contains(text, local) {
			t.Errorf("Postfix's refusal %q does not quote the address; the test proves nothing", text)
		}
	}
	step(450, `RCPT TO:<"Peak SMTP relay limit exceeded"@`+peers.MailDomain+">")
	step(354, "DATA")
	if err := c.WriteData(msgs[0].Bytes()); err != nil {
		t.Fatal(err)
	}
	step(250, "")
	waitDelivered(t, pf, msgs, 30*time.Second)

	m := scrapeMetrics(t, admin)
	if got, ok := m.Value("smtppool_upstream_effective_max_connections"); !ok || got != maxConns {
		t.Errorf("smtppool_upstream_effective_max_connections = %v (found %v), want SMTPPOOL_MAX_CONNS=%d", got, ok, maxConns)
	}
	retries := m.ByLabel("smtppool_retries_total", "reason")
	t.Logf("retries by reason: %v", retries)
	if retries["conn_limit"] != 0 || retries["too_fast"] != 0 {
		t.Errorf("retries %v: a recipient's refusal counted as a connection limit or a refused rate", retries)
	}
	if retries["reply_4xx"] == 0 {
		t.Errorf("retries %v: the 450 to a recipient was not retried as an ordinary 4xx", retries)
	}
}
