package pool_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
)

// TestConnLimitLowersTheCapAndItRecovers: a refusal over the upstream's
// connection limit lowers the effective cap to the sessions that were
// open; after a quiet period it rises again, one at a time, to MaxConns.
func TestConnLimitLowersTheCapAndItRecovers(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	p := newPool(t, up, pool.Config{MaxConns: 5, CapRecovery: 100 * time.Millisecond, HealthCheckPeriod: 10 * time.Millisecond})
	a, b := acquire(t, p), acquire(t, p)
	up.Inject(memsmtp.Banner, memsmtp.Fault{Reply: &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 7, 0},
		Message: "upstream.test Error: too many connections from 127.0.0.1"}})
	_, err := p.Acquire(context.Background())
	if !errors.Is(err, pool.ErrConnLimit) || !errors.Is(err, pool.ErrCapLowered) {
		t.Fatalf("Acquire refused over the limit: %v, want ErrConnLimit and ErrCapLowered", err)
	}
	if st := p.Stat(); st.EffectiveMaxConns != 2 {
		t.Fatalf("effective cap %d after a refusal with 2 sessions open, want 2", st.EffectiveMaxConns)
	}
	// A third Acquire now waits for one of the two.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := p.Acquire(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Acquire over the lowered cap: %v, want to wait", err)
	}
	a.Release()
	b.Release()
	memsmtp.WaitFor(t, "the cap to recover to MaxConns", func() bool { return p.Stat().EffectiveMaxConns == 5 })
}

// TestSignalsAreReadFromTheReply: the limits upstreams signal, by code,
// enhanced code and text.
func TestSignalsAreReadFromTheReply(t *testing.T) {
	tests := []struct {
		name  string
		reply *smtp.SMTPError
		want  error // nil: no signal
	}{
		{"Postfix banner", &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 7, 0}, Message: "mx Error: too many connections from 10.0.0.1"}, pool.ErrConnLimit},
		{"Exchange on-premises", &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "The maximum number of concurrent connections has exceeded a limit, closing transmission channel"}, pool.ErrConnLimit},
		{"Exchange Online at DATA", &smtp.SMTPError{Code: 432, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information."}, pool.ErrConnLimit},
		{"Exchange Online, older text", &smtp.SMTPError{Code: 432, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "STOREDRV.ClientSubmit; sender thread limit exceeded"}, pool.ErrConnLimit},
		{"SES rate", &smtp.SMTPError{Code: 454, EnhancedCode: smtp.NoEnhancedCode, Message: "Throttling failure: Maximum sending rate exceeded."}, pool.ErrTooFast},
		{"Google peak", &smtp.SMTPError{Code: 450, EnhancedCode: smtp.EnhancedCode{4, 2, 1}, Message: "Peak SMTP relay limit exceeded for customer."}, pool.ErrTooFast},
		{"Google, one busy recipient", &smtp.SMTPError{Code: 450, EnhancedCode: smtp.EnhancedCode{4, 2, 1}, Message: "The user you are trying to contact is receiving mail at a rate that prevents additional messages from being delivered."}, nil},
		{"try again later", &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 7, 0}, Message: "Try again later, closing connection."}, pool.ErrTooFast},
		{"SES quota", &smtp.SMTPError{Code: 454, EnhancedCode: smtp.NoEnhancedCode, Message: "Throttling failure: Daily message quota exceeded."}, pool.ErrQuota},
		{"Google daily", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 4, 5}, Message: "Daily SMTP relay limit exceeded for user."}, pool.ErrQuota},
		{"Exchange Online quota", &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 2, 0}, Message: "STOREDRV.Submission.Exception:SubmissionQuotaExceededException"}, pool.ErrQuota},
		{"ordinary 451", &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "Queue file write error"}, nil},
		{"ordinary 550", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			up := startUpstream(t, memsmtp.Options{})
			up.Inject(memsmtp.Mail, memsmtp.Fault{Reply: tt.reply})
			p := newPool(t, up, pool.Config{})
			c := acquire(t, p)
			defer c.Release()
			err := c.Mail(context.Background(), "sender@example.com", nil)
			for _, sentinel := range []error{pool.ErrConnLimit, pool.ErrTooFast, pool.ErrQuota} {
				if got := errors.Is(err, sentinel); got != (sentinel == tt.want) {
					t.Errorf("Mail: %v; errors.Is(%v) = %v", err, sentinel, got)
				}
			}
			var smtpErr *smtp.SMTPError
			if !errors.As(err, &smtpErr) || smtpErr.Code != tt.reply.Code {
				t.Errorf("Mail: %v, want the upstream's %d still inside", err, tt.reply.Code)
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
