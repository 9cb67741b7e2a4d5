//go:build e2e

package e2e

import (
	"cmp"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// TestRefusalsDoNotThrottleTheUpstreamSession: Postfix counts, for each
// session, the errors a client made (every command it refused, 4xx or
// 5xx) and its junk commands (RSET, NOOP, VRFY, ETRN; past
// smtpd_junk_command_limit, 100, each is an error too), and forgets both
// only when a message is delivered. From smtpd_soft_error_limit (10)
// errors on, it sleeps smtpd_error_sleep_time (1 s) before every reply;
// at smtpd_hard_error_limit (20) it disconnects ("too many errors after
// ..."). One chat server connection to smtppool, SMTPPOOL_MAX_CONNS=1, so
// that every transaction goes over the same upstream session as long as
// smtppool keeps it, each case with a Postfix and an smtppool of its own:
//   - refused recipients: 150 transactions to a deactivated user whom
//     Postfix refuses at RCPT (550 5.1.1), each ended with RSET, as a
//     client does after a refused recipient: an error and an RSET each
//     for Postfix;
//   - abandoned transactions: 150 transactions whose client gives up after
//     RCPT (RSET), as smtppool's own client does after a message it
//     refuses itself (a line too long, say): an RSET each;
//
// then an ordinary message. Asserted: no transaction took 1 s or more
// (Postfix's error sleep), Postfix logged no "too many errors", no
// upstream session made more errors or junk commands than smtppool's
// thresholds (8 and 50), as Postfix's own per-session command counts in
// its "disconnect from" lines show, the sessions smtppool retired show in
// smtppool_upstream_connections_closed_total{reason} as errors or junk,
// and the ordinary message is delivered. The code before kept the one
// session: the 10th refused recipient's transaction took 1.0 s (its RSET
// answered after the sleep), and the 111th abandoned one 3.0 s (MAIL,
// RCPT and RSET each answered after it).
func TestRefusalsDoNotThrottleTheUpstreamSession(t *testing.T) {
	const gone = "gone@" + peers.MailDomain
	for _, tt := range []struct {
		name     string
		rcpt     string // "" for the message's own recipient
		wantRcpt int
		reason   string
	}{
		{"refused recipients", gone, 550, "errors"},
		{"abandoned transactions", "", 250, "junk"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			pf := startPostfix(t, peers.PostfixOptions{Postconf: []string{
				"smtpd_recipient_restrictions = check_recipient_access inline:{ {" + gone + " = 550 5.1.1 No such user} }, permit",
				// Postfix's mail flow control: a transaction that gets past
				// RCPT opens a queue file and takes one of about 100 tokens,
				// which come back as messages reach the queue manager;
				// abandoned ones never do, and from the 101st on each new
				// one waits in_flow_delay (1 s), whatever its session. A
				// limit of the whole server, not of a session: off here.
				"in_flow_delay = 0",
			}})
			proxy := startProxy(t, pf.Addr, map[string]string{"SMTPPOOL_MAX_CONNS": "1", "SMTPPOOL_UPSTREAM_TLS": "none"})
			admin := adminAddress(t, proxy)
			c, err := peers.Open(proxy.Addr, 10*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			msgs := peers.NewMessages("error-limit", 1)
			rcpt := cmp.Or(tt.rcpt, msgs[0].To)

			const n = 150
			var slowest time.Duration
			for i := range n {
				c.SetDeadline(time.Now().Add(30 * time.Second))
				start := time.Now()
				for _, s := range []struct {
					line string
					want int
				}{{"MAIL FROM:<" + msgs[0].From + ">", 250}, {"RCPT TO:<" + rcpt + ">", tt.wantRcpt}, {"RSET", 250}} {
					if err := c.Expect(s.want, s.line); err != nil {
						t.Fatalf("transaction %d: %v", i+1, err)
					}
				}
				took := time.Since(start)
				slowest = max(slowest, took)
				if took >= time.Second {
					// Postfix's error sleep; the test ends at the first.
					t.Fatalf("transaction %d took %v: Postfix slowed the session down", i+1, took.Round(time.Millisecond))
				}
			}
			c.SetDeadline(time.Now().Add(30 * time.Second))
			start := time.Now()
			if err := c.Send(msgs[0]); err != nil {
				t.Fatalf("the ordinary message after the %s: %v", tt.name, err)
			}
			if took := time.Since(start); took >= time.Second {
				t.Errorf("the ordinary message took %v", took.Round(time.Millisecond))
			}
			waitDelivered(t, pf, msgs, 30*time.Second)
			closed := scrapeMetrics(t, admin).ByLabel("smtppool_upstream_connections_closed_total", "reason")
			t.Logf("%d transactions, the slowest took %v; upstream sessions closed by reason: %v", n, slowest.Round(time.Millisecond), closed)
			if closed[tt.reason] < 2 {
				t.Errorf("smtppool_upstream_connections_closed_total{reason=%q} = %v, want at least 2 after %d transactions", tt.reason, closed[tt.reason], n)
			}
			c.Quit()
			stopProxy(t, proxy) // its sessions QUIT, and Postfix logs their counts

			waitFor(t, 10*time.Second, "Postfix to log the end of every session", func() (bool, string) {
				l := pf.Log()
				conns, ends := strings.Count(l, "]: connect from "), strings.Count(l, "]: disconnect from ")
				return conns == ends, strconv.Itoa(ends) + " of " + strconv.Itoa(conns) + " sessions ended"
			})
			log := pf.Log()
			if strings.Contains(log, "too many errors") {
				t.Errorf("Postfix disconnected a session for too many errors:\n%s", grepLines(log, "too many errors"))
			}
			sessions := 0
			for _, line := range strings.Split(log, "\n") {
				if !strings.Contains(line, "]: disconnect from ") {
					continue
				}
				sessions++
				counts := sessionCounts(line)
				errs, junk := counts["commands"].total-counts["commands"].ok, counts["rset"].total+counts["noop"].total
				if errs > 8 || junk > 50 {
					t.Errorf("an upstream session made %d errors and %d junk commands, over smtppool's thresholds (8, 50): %s", errs, junk, line)
				}
			}
			t.Logf("Postfix saw %d sessions for %d transactions", sessions, n+1)
		})
	}
}

// commandCount is one "name=ok/total" of Postfix's disconnect line.
type commandCount struct{ ok, total int }

var commandCountRE = regexp.MustCompile(`\b([a-z]+)=(\d+)(?:/(\d+))?`)

// sessionCounts reads the per-command counts of a Postfix "disconnect
// from" line, "ehlo=1 mail=8 rcpt=0/8 rset=7 quit=1 commands=17/25": how
// many of each command succeeded, of how many (the total is left out when
// all did).
func sessionCounts(line string) map[string]commandCount {
	_, stats, _ := strings.Cut(line, "]: disconnect from ")
	m := map[string]commandCount{}
	for _, g := range commandCountRE.FindAllStringSubmatch(stats, -1) {
		ok, _ := strconv.Atoi(g[2])
		total := ok
		if g[3] != "" {
			total, _ = strconv.Atoi(g[3])
		}
		m[g[1]] = commandCount{ok, total}
	}
	return m
}
