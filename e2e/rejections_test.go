//go:build e2e

package e2e

import (
	"strconv"
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// TestRejections proves that the upstream's refusals reach the client: a
// permanent one (5xx) at once and unchanged, a transient one (4xx) after the
// proxy has retried it on fresh sessions. smtp-sink dumps every message it
// accepts, which shows that no client is told 250 without a delivered copy,
// and that no copy exists where the client was not told 250.
func TestRejections(t *testing.T) {
	const attempts = 4 // SMTPPOOL_MAX_ATTEMPTS
	cases := []struct {
		name     string
		sinkArgs []string
		stage    string // where the client must stop
		code     int    // with which reply
		// upstream sessions the proxy must have used: 1 when it must not
		// retry, attempts when it must retry until tries run out
		sessions int
	}{
		{"accepted", nil, peers.StageEndOfData, 250, 1},
		{"hard reject at RCPT (-f RCPT)", []string{"-f", "RCPT"}, peers.StageRCPT, 500, 1},
		{"soft reject at MAIL (-r MAIL)", []string{"-r", "MAIL"}, peers.StageMAIL, 450, attempts},
		// -r and -f turn PIPELINING off (smtp-sink's -p); -Q does not, so
		// the proxy holds MAIL until the first RCPT, where the client hears
		// of its refusal.
		{"421 and disconnect at MAIL (-Q MAIL)", []string{"-Q", "MAIL"}, peers.StageRCPT, 451, attempts},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sink := startSink(t, true, tc.sinkArgs...)
			proxy := startProxy(t, sink.Addr, map[string]string{
				// smtp-sink offers no STARTTLS: with "none" the proxy
				// skips the opportunistic probe, so that every upstream
				// session is a try.
				"SMTPPOOL_UPSTREAM_TLS":      "none",
				"SMTPPOOL_MAX_ATTEMPTS":      strconv.Itoa(attempts),
				"SMTPPOOL_RETRY_BACKOFF":     "50ms",
				"SMTPPOOL_RETRY_BACKOFF_MAX": "200ms",
			})
			m := peers.NewMessages("reject", 1)[0]
			r := peers.SendMail(proxy.Addr, m, peers.SendOptions{Timeout: 30 * time.Second})

			// Stop the proxy, which closes its sessions, so that smtp-sink's
			// session counter is final.
			stopProxy(t, proxy)
			waitFor(t, 10*time.Second, "the proxy's upstream sessions to close", func() (bool, string) {
				n, err := peers.EstablishedTo(sink.Port)
				return err == nil && n == 0, "connections still open"
			})
			c := sink.Counters()
			dumps, err := sink.Dumped()
			if err != nil {
				t.Fatal(err)
			}
			retries := proxy.Count("transient upstream failure, retrying")
			t.Logf("client: %d at %s (%q) after %v; upstream smtp-sink: %v; proxy retries %d; messages dumped %d",
				r.Code, r.Stage, r.Reply, r.End.Sub(r.Start).Round(time.Millisecond), c, retries, len(dumps))

			if r.Err != nil || r.Stage != tc.stage || r.Code != tc.code {
				t.Errorf("client got %v; want %d at %s", r, tc.code, tc.stage)
			}
			if c.Sess != tc.sessions {
				t.Errorf("upstream saw %d sessions; want %d (one per try, with %d tries)", c.Sess, tc.sessions, attempts)
			}
			if want := tc.sessions - 1; retries != want {
				t.Errorf("proxy logged %d retries; want %d", retries, want)
			}
			if r.Accepted() {
				if len(dumps[m.ID]) != 1 || len(dumps) != 1 {
					t.Errorf("client told 250, but the upstream has %d copies of %s (%d messages in all)", len(dumps[m.ID]), m.ID, len(dumps))
				}
			} else if len(dumps) != 0 || c.Mesg != 0 {
				t.Errorf("client not told 250, but the upstream got %d messages (%d dumped)", c.Mesg, len(dumps))
			}
		})
	}
}
