package pool_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
)

// TestConnLimitLowersTheCapAndItRecovers: a refusal over the upstream's
// connection limit at set-up lowers the effective cap to the sessions that
// were open, and the refused Acquire waits for one of them instead of
// failing; after a quiet period the cap rises again, one at a time, to
// MaxConns.
func TestConnLimitLowersTheCapAndItRecovers(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	p := newPool(t, up, pool.Config{MaxConns: 5, CapRecovery: 100 * time.Millisecond, HealthCheckPeriod: 10 * time.Millisecond})
	a, b := acquire(t, p), acquire(t, p)
	defer a.Release() // before the pool's Close, on a failure too
	defer b.Release()
	up.Inject(memsmtp.Banner, memsmtp.Fault{Reply: &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 7, 0},
		Message: "upstream.test Error: too many connections from 127.0.0.1"}})
	got := make(chan *pool.Conn, 1)
	go func() {
		c, err := p.Acquire(context.Background())
		if err != nil {
			t.Errorf("Acquire refused over the limit: %v, want it to wait", err)
		}
		got <- c
	}()
	memsmtp.WaitFor(t, "the refusal to lower the cap to the 2 sessions open", func() bool { return p.Stat().EffectiveMaxConns == 2 })
	select {
	case <-got:
		t.Fatal("Acquire returned over the lowered cap while both sessions were held")
	case <-time.After(50 * time.Millisecond):
	}
	a.Release()
	c := <-got
	if c == nil {
		t.FailNow()
	}
	if c.ID() != a.ID() || up.Stats().Conns != 3 {
		t.Errorf("the waiting Acquire got session %d after %d upstream connections, want %d released (no further dial) after 3", c.ID(), up.Stats().Conns, a.ID())
	}
	c.Release()
	b.Release()
	memsmtp.WaitFor(t, "the cap to recover to MaxConns", func() bool { return p.Stat().EffectiveMaxConns == 5 })
}

// TestSignalsAreReadFromTheReply maps an upstream reply, at the stage
// where it comes, to the limit the pool reads from it: by code and
// enhanced code, and by text only for a provider's documented reply, with
// its code, at its stage, and never from what echoes the client's input
// (issue 16, item 4: Postfix's "550 5.1.1 <too many connections@...>:
// Recipient address rejected" lowered the cap to 1). Where a reply
// signals no connection limit, the effective cap stays at MaxConns.
func TestSignalsAreReadFromTheReply(t *testing.T) {
	type replyFor = func(arg string) *smtp.SMTPError
	fixed := func(code int, enh smtp.EnhancedCode, msg string) replyFor {
		return func(string) *smtp.SMTPError { return &smtp.SMTPError{Code: code, EnhancedCode: enh, Message: msg} }
	}
	// echo quotes the command's argument where the format has %s, as
	// servers quote the address they refuse (Postfix in angle brackets,
	// without the local part's quotes; Exchange without brackets).
	echo := func(code int, enh smtp.EnhancedCode, format string, unquote bool) replyFor {
		return func(arg string) *smtp.SMTPError {
			if unquote {
				arg = strings.ReplaceAll(arg, `"`, "")
			}
			return &smtp.SMTPError{Code: code, EnhancedCode: enh, Message: fmt.Sprintf(format, arg)}
		}
	}
	// echoLocal quotes the address's local part alone, without its
	// quotes, where the format has %s, as Sendmail's "user... User
	// unknown" quotes a local recipient.
	echoLocal := func(code int, enh smtp.EnhancedCode, format string) replyFor {
		return func(arg string) *smtp.SMTPError {
			local := strings.ReplaceAll(arg[:max(strings.LastIndexByte(arg, '@'), 0)], `"`, "")
			return &smtp.SMTPError{Code: code, EnhancedCode: enh, Message: fmt.Sprintf(format, local)}
		}
	}
	none := smtp.NoEnhancedCode
	tests := []struct {
		name  string
		at    memsmtp.Command // where the upstream gives the reply
		addr  string          // the address of MAIL or RCPT
		reply replyFor
		want  error // nil: no signal
	}{
		// The providers' documented replies, at their stages.
		{"Postfix banner", memsmtp.Banner, "", fixed(421, smtp.EnhancedCode{4, 7, 0}, "mx Error: too many connections from 10.0.0.1"), pool.ErrConnLimit},
		{"Exchange on-premises banner", memsmtp.Banner, "", fixed(421, smtp.EnhancedCode{4, 3, 2}, "The maximum number of concurrent connections has exceeded a limit, closing transmission channel"), pool.ErrConnLimit},
		{"Gmail banner, try again later", memsmtp.Banner, "", fixed(421, smtp.EnhancedCode{4, 7, 0}, "Try again later, closing connection. (EHLO)"), pool.ErrTooFast},
		{"Exchange Online at DATA", memsmtp.Data, "", fixed(432, smtp.EnhancedCode{4, 3, 2}, "Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information."), pool.ErrConnLimit},
		{"Exchange Online at MAIL, older text", memsmtp.Mail, "a@example.com", fixed(432, smtp.EnhancedCode{4, 3, 2}, "STOREDRV.ClientSubmit; sender thread limit exceeded"), pool.ErrConnLimit},
		{"SES rate at DATA", memsmtp.Data, "", fixed(454, none, "Throttling failure: Maximum sending rate exceeded."), pool.ErrTooFast},
		{"SES quota at DATA", memsmtp.Data, "", fixed(454, none, "Throttling failure: Daily message quota exceeded."), pool.ErrQuota},
		{"Google peak at MAIL", memsmtp.Mail, "a@example.com", fixed(450, smtp.EnhancedCode{4, 2, 1}, "Peak SMTP relay limit exceeded for customer."), pool.ErrTooFast},
		{"Google peak at RCPT", memsmtp.Rcpt, "b@example.com", fixed(450, smtp.EnhancedCode{4, 2, 1}, "Peak SMTP relay limit exceeded for customer."), pool.ErrTooFast},
		{"Google daily at MAIL", memsmtp.Mail, "a@example.com", fixed(550, smtp.EnhancedCode{5, 4, 5}, "Daily SMTP relay limit exceeded for user."), pool.ErrQuota},
		{"Exchange Online quota at DATA", memsmtp.Data, "", fixed(554, smtp.EnhancedCode{5, 2, 0}, "STOREDRV.Submission.Exception:SubmissionQuotaExceededException"), pool.ErrQuota},

		// Ordinary replies.
		{"Google, one busy recipient", memsmtp.Rcpt, "b@example.com", fixed(450, smtp.EnhancedCode{4, 2, 1}, "The user you are trying to contact is receiving mail at a rate that prevents additional messages from being delivered."), nil},
		{"ordinary 451 at MAIL", memsmtp.Mail, "a@example.com", fixed(451, smtp.EnhancedCode{4, 3, 0}, "Queue file write error"), nil},
		{"ordinary 550 at RCPT", memsmtp.Rcpt, "b@example.com", fixed(550, smtp.EnhancedCode{5, 1, 1}, "No such user"), nil},

		// Echoed client input, and the right words at the wrong code or
		// stage.
		{"Postfix echoes a quoted local part at RCPT", memsmtp.Rcpt, `"too many connections"@test.example`,
			echo(550, smtp.EnhancedCode{5, 1, 1}, "<%s>: Recipient address rejected: User unknown in local recipient table", true), nil},
		{"a 4xx echo at RCPT", memsmtp.Rcpt, `"concurrent connections"@test.example`,
			echo(450, smtp.EnhancedCode{4, 3, 2}, "<%s>: Recipient address rejected: try again", true), nil},
		{"an echo at MAIL", memsmtp.Mail, `"Throttling failure: Maximum sending rate exceeded"@test.example`,
			echo(454, none, "<%s>: Sender address rejected", true), nil},
		{"an echo of the quota at MAIL", memsmtp.Mail, `"Throttling failure: Daily message quota exceeded"@test.example`,
			echo(454, smtp.EnhancedCode{4, 7, 1}, "%s: try again later", false), nil},
		{"Google's peak words echoed without brackets at RCPT", memsmtp.Rcpt, `"Peak SMTP relay limit exceeded"@test.example`,
			echo(450, smtp.EnhancedCode{4, 2, 1}, "%s: mailbox busy", true), nil},
		{"Google's peak words as a local part echoed alone at RCPT", memsmtp.Rcpt, `"Peak SMTP relay limit exceeded"@test.example`,
			echoLocal(450, smtp.EnhancedCode{4, 2, 1}, "%s... Mailbox busy"), nil},
		{"Google's peak words as a local part echoed alone at MAIL", memsmtp.Mail, `"Peak SMTP relay limit exceeded x"@test.example`,
			echoLocal(450, smtp.EnhancedCode{4, 2, 1}, "%s... Sender busy"), nil},
		{"a closing bracket in the address", memsmtp.Rcpt, `"a>peak smtp relay limit exceeded"@test.example`,
			echo(450, smtp.EnhancedCode{4, 2, 1}, "<%s>: deferred", true), nil},
		{"a 5xx to RCPT with the connection-limit code", memsmtp.Rcpt, "b@example.com", fixed(532, smtp.EnhancedCode{4, 3, 2}, "too many connections"), nil},
		{"432 4.3.2 to RCPT", memsmtp.Rcpt, "b@example.com", fixed(432, smtp.EnhancedCode{4, 3, 2}, "Concurrent connections limit exceeded"), nil},
		{"421 too many connections at MAIL", memsmtp.Mail, "a@example.com", fixed(421, smtp.EnhancedCode{4, 7, 0}, "too many connections"), nil},
		{"SES's rate at MAIL", memsmtp.Mail, "a@example.com", fixed(454, none, "Throttling failure: Maximum sending rate exceeded."), nil},
		{"a quota at RCPT", memsmtp.Rcpt, "b@example.com", fixed(454, none, "Throttling failure: Daily message quota exceeded."), nil},
		{"the rate words after other text at DATA", memsmtp.Data, "", fixed(451, smtp.EnhancedCode{4, 7, 1}, "Subject maximum sending rate exceeded: content deferred"), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			const maxConns = 3
			up := startUpstream(t, memsmtp.Options{})
			up.Inject(tt.at, memsmtp.Fault{ReplyFor: tt.reply})
			p := newPool(t, up, pool.Config{MaxConns: maxConns})
			// A session refused over the limit at set-up is no error: the
			// first Acquire waits for the probe after the refusal, and the
			// cap stays lowered to 1, so the second waits for the first.
			waits := tt.at == memsmtp.Banner && tt.want == pool.ErrConnLimit
			from, to := "sender@example.com", "rcpt@example.com"
			switch tt.at {
			case memsmtp.Mail:
				from = tt.addr
			case memsmtp.Rcpt:
				to = tt.addr
			}
			err := func() error {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				// A second session, so that a lowered cap shows.
				other, err := p.Acquire(ctx)
				if err != nil {
					return err
				}
				defer other.Release()
				if waits {
					var cancel context.CancelFunc
					ctx, cancel = context.WithTimeout(ctx, 200*time.Millisecond)
					defer cancel()
				}
				c, err := p.Acquire(ctx)
				if err != nil {
					return err
				}
				defer c.Release()
				rcptErrs, err := c.Envelope(ctx, from, nil, []pool.Recipient{{Addr: to}})
				if err != nil {
					return err
				}
				if rcptErrs[0] != nil {
					return rcptErrs[0]
				}
				_, err = c.Data(ctx, strings.NewReader("Subject: test\r\n\r\nbody\r\n"))
				return err
			}()
			var smtpErr *smtp.SMTPError
			switch {
			case waits:
				if !errors.Is(err, context.DeadlineExceeded) {
					t.Errorf("Acquire refused over the limit at set-up: %v, want it to wait for a place under the lowered cap", err)
				}
			default:
				for _, sentinel := range []error{pool.ErrConnLimit, pool.ErrTooFast, pool.ErrQuota} {
					if got := errors.Is(err, sentinel); got != (sentinel == tt.want) {
						t.Errorf("%v; errors.Is(%v) = %v", err, sentinel, got)
					}
				}
				if !errors.As(err, &smtpErr) || smtpErr.Code != tt.reply(tt.addr).Code {
					t.Errorf("%v, want the upstream's %d still inside", err, tt.reply(tt.addr).Code)
				}
			}
			wantCap := int32(maxConns)
			if tt.want == pool.ErrConnLimit {
				wantCap = 1 // the sessions open, the refused one excluded
			}
			if got := p.Stat().EffectiveMaxConns; got != wantCap {
				t.Errorf("effective cap %d, want %d", got, wantCap)
			}
		})
	}
}

// TestRateLimitPacesMessages: 120 messages a minute let 11 acquisitions
// through in about 5 seconds, the first at once.
func TestRateLimitPacesMessages(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	p := newPool(t, up, pool.Config{RateLimit: 120})
	start := time.Now()
	for i := range 11 {
		c := acquire(t, p)
		if err := send(c, i); err != nil {
			t.Fatal(err)
		}
		c.Release()
	}
	// 10 intervals of 0.5 s; generous bounds, as the machine is shared.
	if took := time.Since(start); took < 4500*time.Millisecond || took > 8*time.Second {
		t.Errorf("11 messages at 120/min took %v, want about 5s", took)
	}
}

// TestFailoverToTheNextEntry: an entry that cannot be reached is skipped,
// the next serves, and the first is preferred again once it is back and its
// cool-down has passed.
func TestFailoverToTheNextEntry(t *testing.T) {
	primary := startUpstream(t, memsmtp.Options{})
	primaryAddr := primary.Addr
	primary.Close()
	secondary := startUpstream(t, memsmtp.Options{})
	p, err := pool.New(pool.Config{Addr: primaryAddr + ", " + secondary.Addr, TLS: pool.TLSNone,
		FailoverCooldown: 200 * time.Millisecond, MaxConnLifetime: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	c := acquire(t, p)
	if c.Upstream() != secondary.Addr {
		t.Errorf("session to %s, want the secondary %s while the primary is down", c.Upstream(), secondary.Addr)
	}
	c.Release()
	st := p.Stat()
	if len(st.Upstreams) != 2 || st.Upstreams[0].Up || !st.Upstreams[1].Up || !st.UpstreamUp {
		t.Errorf("Stat.Upstreams = %+v, want the primary down and the secondary up", st.Upstreams)
	}
	back := startUpstream(t, memsmtp.Options{Addr: primaryAddr})
	memsmtp.WaitFor(t, "the primary to be preferred again", func() bool {
		c := acquire(t, p)
		defer c.Release()
		return c.Upstream() == primaryAddr
	})
	if back.Stats().Conns == 0 {
		t.Error("the primary saw no connection")
	}
}
