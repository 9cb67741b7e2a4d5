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

// TestPermanentRefusalsKeepTheUpstreamSession is a chat server whose
// notifications meet Postfix's permanent refusals, one connection to
// smtppool with SMTPPOOL_MAX_CONNS=1, three transactions:
//  1. to a user and to a deactivated one, whom Postfix refuses at RCPT
//     (550 5.1.1): the client hears the 550 for that recipient, and the
//     message reaches the other;
//  2. a message Postfix's header checks refuse after its end (550 5.7.1,
//     to BDAT, since Postfix offers CHUNKING): the client hears the 550,
//     and nothing is delivered;
//  3. an ordinary message: 250, delivered.
//
// Asserted besides: all three went over one upstream session (smtppool's
// smtppool_upstream_connections_opened_total is 1), so a refusal costs
// no new connection and AUTH, which count against an upstream's limits,
// and the refused BDAT left no state behind that spoilt the next message.
func TestPermanentRefusalsKeepTheUpstreamSession(t *testing.T) {
	const gone = "gone@" + peers.MailDomain
	checks := filepath.Join(publicDir(t, "header-checks"), "header_checks")
	if err := os.WriteFile(checks, []byte("/^Subject: .*refused by policy/ REJECT 5.7.1 refused by policy\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	pf := startPostfix(t, peers.PostfixOptions{Postconf: []string{
		"header_checks = regexp:" + checks,
		"smtpd_recipient_restrictions = check_recipient_access inline:{ {" + gone + " = 550 5.1.1 No such user} }, permit",
	}})
	proxy := startProxy(t, pf.Addr, map[string]string{"SMTPPOOL_MAX_CONNS": "1"})

	msgs := peers.NewMessages("refusals", 3)
	msgs[1].Subject = "a notification refused by policy"
	c, err := peers.Open(proxy.Addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Quit()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	step := func(want int, line string) {
		t.Helper()
		code, text, err := c.Cmd(line)
		t.Logf("%-40.40q → %d %s", line, code, text)
		if err != nil || code != want {
			t.Fatalf("%q: %d %s (err %v), want %d", line, code, text, err, want)
		}
	}
	data := func(m peers.Message, want int) {
		t.Helper()
		if err := c.WriteData(m.Bytes()); err != nil {
			t.Fatal(err)
		}
		step(want, "")
	}

	step(250, "MAIL FROM:<"+msgs[0].From+">")
	step(250, "RCPT TO:<"+msgs[0].To+">")
	step(550, "RCPT TO:<"+gone+">")
	step(354, "DATA")
	data(msgs[0], 250)

	step(250, "MAIL FROM:<"+msgs[1].From+">")
	step(250, "RCPT TO:<"+msgs[1].To+">")
	step(354, "DATA")
	data(msgs[1], 550)

	if err := c.Send(msgs[2]); err != nil {
		t.Fatalf("the ordinary message after the refusals: %v", err)
	}

	box := waitDelivered(t, pf, []peers.Message{msgs[0], msgs[2]}, 30*time.Second)
	if n := len(box[msgs[1].ID]); n != 0 {
		t.Errorf("the message refused by the header checks was delivered %d times", n)
	}
	if n := len(box[msgs[0].ID]); n != 1 {
		t.Errorf("the first message was delivered %d times, want once (to %s only)", n, msgs[0].To)
	}
	if !strings.Contains(pf.Log(), "refused by policy") {
		t.Errorf("Postfix's log does not show the header check's refusal")
	}
	m := scrapeMetrics(t, adminAddress(t, proxy))
	opened, _ := m.Value("smtppool_upstream_connections_opened_total")
	t.Logf("smtppool opened %v upstream sessions for the three transactions", opened)
	if opened != 1 {
		t.Errorf("smtppool opened %v upstream sessions, want 1: a permanent refusal must not cost the session", opened)
	}
}
