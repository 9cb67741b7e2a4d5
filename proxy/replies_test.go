package proxy_test

import (
	"errors"
	"net"
	"strings"
	"testing"

	"github.com/emersion/go-smtp"
	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/proxy"
)

// TestUpstreamReplyReachesClient maps what the upstream does to what the
// client hears, with 4 tries per transaction.
func TestUpstreamReplyReachesClient(t *testing.T) {
	tests := []struct {
		name   string
		faults map[memsmtp.Command][]memsmtp.Fault
		// The client's outcome: wantStep "" means 250 for the message.
		wantStep string
		want     *smtp.SMTPError
		// The upstream's view.
		wantCopies int
		wantConns  int64
	}{
		{name: "accepted", wantCopies: 1, wantConns: 1},
		{
			name:     "RCPT 550 passes through",
			faults:   map[memsmtp.Command][]memsmtp.Fault{memsmtp.Rcpt: {{Reply: reply(550, [3]int{5, 1, 1}, "No such user")}}},
			wantStep: "RCPT", want: reply(550, [3]int{5, 1, 1}, "No such user"), wantConns: 1,
		},
		{
			// The upstream offers PIPELINING: MAIL goes with the first
			// RCPT, and its refusal reaches the client there.
			name:     "MAIL 553 passes through",
			faults:   map[memsmtp.Command][]memsmtp.Fault{memsmtp.Mail: {{Reply: reply(553, [3]int{5, 7, 1}, "Sender not allowed")}}},
			wantStep: "RCPT", want: reply(553, [3]int{5, 7, 1}, "Sender not allowed"), wantConns: 1,
		},
		{
			name:     "end of DATA 554 passes through",
			faults:   map[memsmtp.Command][]memsmtp.Fault{memsmtp.Data: {{Reply: reply(554, [3]int{5, 7, 1}, "Spam")}}},
			wantStep: "end of DATA", want: reply(554, [3]int{5, 7, 1}, "Spam"), wantConns: 1,
		},
		{
			// A wrong password is the operator's to fix; the message must
			// not bounce for it.
			name:     "AUTH 535 is a set-up failure, not a bounce",
			faults:   map[memsmtp.Command][]memsmtp.Fault{memsmtp.Auth: {{Reply: reply(535, [3]int{5, 7, 8}, "Bad credentials")}}},
			wantStep: "MAIL", want: reply(451, [3]int{4, 3, 5}, "Cannot set up a session with the upstream server as configured; see smtppool's log"), wantConns: 1,
		},
		{
			name:       "421 banner is retried",
			faults:     map[memsmtp.Command][]memsmtp.Fault{memsmtp.Banner: {{Reply: reply(421, [3]int{4, 7, 0}, "Too many connections")}}},
			wantCopies: 1, wantConns: 2,
		},
		{
			name:       "AUTH 454 is retried",
			faults:     map[memsmtp.Command][]memsmtp.Fault{memsmtp.Auth: {{Reply: reply(454, [3]int{4, 7, 0}, "Too many login attempts")}}},
			wantCopies: 1, wantConns: 2,
		},
		{
			// A 4xx to RCPT concerns that recipient: the healthy session
			// is kept and the RCPT retried on it.
			name:       "RCPT 451 is retried on the same session",
			faults:     map[memsmtp.Command][]memsmtp.Fault{memsmtp.Rcpt: {{Reply: reply(451, [3]int{4, 3, 0}, "Try later")}}},
			wantCopies: 1, wantConns: 1,
		},
		{
			name:       "connection dropped at RCPT is retried",
			faults:     map[memsmtp.Command][]memsmtp.Fault{memsmtp.Rcpt: {{Drop: true}}},
			wantCopies: 1, wantConns: 2,
		},
		{
			name:       "end of DATA 451 is retried",
			faults:     map[memsmtp.Command][]memsmtp.Fault{memsmtp.Data: {{Reply: reply(451, [3]int{4, 3, 0}, "Queue full")}}},
			wantCopies: 1, wantConns: 2,
		},
		{
			name:       "connection dropped mid-DATA is retried",
			faults:     map[memsmtp.Command][]memsmtp.Fault{memsmtp.Data: {{Drop: true}}},
			wantCopies: 1, wantConns: 2,
		},
		{
			// The documented ambiguous case: the upstream kept the message
			// but its reply was lost. The resend makes a duplicate; nothing
			// is lost.
			name:       "connection dropped after the final dot is retried, may duplicate",
			faults:     map[memsmtp.Command][]memsmtp.Fault{memsmtp.Data: {{Drop: true, Deliver: true}}},
			wantCopies: 2, wantConns: 2,
		},
		{
			name:     "MAIL 450 until tries run out",
			faults:   map[memsmtp.Command][]memsmtp.Fault{memsmtp.Mail: memsmtp.Repeat(memsmtp.Fault{Reply: reply(450, [3]int{4, 2, 1}, "Mailbox busy")}, 4)},
			wantStep: "RCPT", want: reply(450, [3]int{4, 2, 1}, "Mailbox busy"), wantConns: 4,
		},
		{
			name:     "421 at end of DATA until tries run out becomes 451",
			faults:   map[memsmtp.Command][]memsmtp.Fault{memsmtp.Data: memsmtp.Repeat(memsmtp.Fault{Reply: reply(421, [3]int{4, 4, 2}, "Timeout, closing")}, 4)},
			wantStep: "end of DATA", want: reply(451, [3]int{4, 4, 2}, "Timeout, closing"), wantConns: 4,
		},
		{
			// The first try may have delivered the message: a permanent
			// refusal of the resend must not tell the client it was not.
			name:     "5xx to the resend after a lost reply is a 4xx",
			faults:   map[memsmtp.Command][]memsmtp.Fault{memsmtp.Data: {{Drop: true, Deliver: true}, {Reply: reply(554, [3]int{5, 6, 0}, "Duplicate")}}},
			wantStep: "end of DATA", want: reply(451, [3]int{4, 3, 0}, "Upstream refused a resend of a message whose first sending it may have kept; see smtppool's log"),
			wantCopies: 1, wantConns: 2,
		},
		{
			// go-smtp's client expects exactly 250; resending after a 251
			// would deliver twice. (Not a 2.1.x, a reply about an
			// address, which shows replies out of step there.)
			name:       "any 2xx at end of DATA accepts the message",
			faults:     map[memsmtp.Command][]memsmtp.Fault{memsmtp.Data: {{Deliver: true, Reply: reply(251, [3]int{2, 0, 0}, "Accepted")}}},
			wantCopies: 1, wantConns: 1,
		},
		{
			name:     "452 to RCPT without an enhanced code is not retried",
			faults:   map[memsmtp.Command][]memsmtp.Fault{memsmtp.Rcpt: {{Reply: reply(452, smtp.NoEnhancedCode, "Too many recipients")}}},
			wantStep: "RCPT", want: reply(452, [3]int{4, 0, 0}, "Too many recipients"), wantConns: 1,
		},
		{
			name:     "452 4.5.3 too many recipients is not retried",
			faults:   map[memsmtp.Command][]memsmtp.Fault{memsmtp.Rcpt: {{Reply: reply(452, [3]int{4, 5, 3}, "Too many recipients")}}},
			wantStep: "RCPT", want: reply(452, [3]int{4, 5, 3}, "Too many recipients"), wantConns: 1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, options{proxy: proxy.Config{MaxAttempts: 4}})
			for cmd, faults := range tt.faults {
				e.up.Inject(cmd, faults...)
			}
			c := e.dial(t)
			err := send(c, "app@example.com", []string{"user@example.com"}, message("m1"))

			var se *sendErr
			var got *smtp.SMTPError
			switch {
			case tt.wantStep == "" && err != nil:
				t.Fatalf("send: %v, want success", err)
			case tt.wantStep != "" && (!errors.As(err, &se) || se.step != tt.wantStep || !errors.As(err, &got)):
				t.Fatalf("send: %v, want an SMTP error at %s", err, tt.wantStep)
			case tt.wantStep != "" && (got.Code != tt.want.Code || got.EnhancedCode != tt.want.EnhancedCode || got.Message != tt.want.Message):
				t.Errorf("client got %d %v %q, want %d %v %q", got.Code, got.EnhancedCode, got.Message,
					tt.want.Code, tt.want.EnhancedCode, tt.want.Message)
			}
			if err := c.Quit(); err != nil {
				t.Errorf("QUIT: %v", err)
			}

			msgs := e.up.Messages()
			if len(msgs) != tt.wantCopies {
				t.Errorf("upstream has %d copies, want %d", len(msgs), tt.wantCopies)
			}
			for _, m := range msgs {
				if m.MessageID() != "<m1@test>" || m.From != "app@example.com" || strings.Join(m.To, ",") != "user@example.com" {
					t.Errorf("upstream message %q from %q to %q is not the one sent", m.MessageID(), m.From, m.To)
				}
			}
			if n := e.up.Stats().Conns; n != tt.wantConns {
				t.Errorf("upstream saw %d connections, want %d", n, tt.wantConns)
			}
		})
	}
}

func TestUpstreamDownGivesTemporaryFailureWithoutDetails(t *testing.T) {
	e := newEnv(t, options{proxy: proxy.Config{MaxAttempts: 2}})
	e.up.Close()
	c := e.dial(t)
	err := c.Mail("app@example.com", nil)
	var got *smtp.SMTPError
	if !errors.As(err, &got) || got.Code != 451 || got.EnhancedCode != (smtp.EnhancedCode{4, 4, 0}) {
		t.Fatalf("MAIL with the upstream down: %v, want 451 4.4.0", err)
	}
	if host, _, _ := net.SplitHostPort(e.up.Addr); strings.Contains(got.Message, host) || strings.Contains(got.Message, "dial") {
		t.Errorf("reply %q leaks internal details", got.Message)
	}
}
