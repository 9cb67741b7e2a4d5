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

// TestSessionRetiredBeforeUpstreamErrorLimits: the in-process upstream
// counts, for each connection, what Postfix's smtpd holds against a client
// until it accepts a message from it (refused commands, and RSET and NOOP,
// its junk commands); Postfix slows a session down from 10 errors on and
// disconnects it at 20, and counts junk commands past 100 as errors. Over
// one session at a time (MaxConns 1), transactions that deliver nothing:
// each connection is retired, with QUIT, once it has made 8 errors or 50
// junk commands, and the next transaction gets a fresh one. The code
// before kept one session for all of them: it made 30 errors with refused
// recipients, 60 with refused senders, 120 junk commands with abandoned
// transactions and 121 with idle checks.
func TestSessionRetiredBeforeUpstreamErrorLimits(t *testing.T) {
	refused := &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user"}
	tests := []struct {
		name   string
		n      int             // transactions
		cfg    pool.Config     // MaxConns 1 added
		inject memsmtp.Command // refuses every transaction here, if set
		wantAt string          // the reply that shows the refusal, if any
		stat   func(pool.Stat) int64
		min    int64 // sessions that stat must count at least
	}{
		// A refused recipient is an error; ending its transaction takes an
		// RSET, whose reply would be slowed down.
		{name: "refused recipients", n: 30, inject: memsmtp.Rcpt, wantAt: "RCPT",
			stat: func(s pool.Stat) int64 { return s.ClosedErrors }, min: 3},
		// A refused MAIL is an error, and so is each pipelined RCPT's 503
		// after it: two a transaction.
		{name: "refused senders", n: 30, inject: memsmtp.Mail, wantAt: "MAIL",
			stat: func(s pool.Stat) int64 { return s.ClosedErrors }, min: 7},
		// A transaction abandoned after RCPT (its client left, or smtppool
		// refused its message itself) is reset with RSET.
		{name: "abandoned transactions", n: 120,
			stat: func(s pool.Stat) int64 { return s.ClosedJunk }, min: 2},
		// A session taken after an idle spell is checked with NOOP.
		{name: "idle checks", n: 120, cfg: pool.Config{PingAfterIdle: time.Nanosecond},
			stat: func(s pool.Stat) int64 { return s.ClosedJunk }, min: 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			up := startUpstream(t, memsmtp.Options{})
			if tt.inject != "" {
				up.Inject(tt.inject, memsmtp.Repeat(memsmtp.Fault{Reply: refused}, tt.n)...)
			}
			cfg := tt.cfg
			cfg.MaxConns = 1
			p := newPool(t, up, cfg)
			for i := range tt.n {
				c := acquire(t, p)
				if tt.name != "idle checks" {
					rcptErrs, err := c.Envelope(context.Background(), "sender@example.com", nil, []pool.Recipient{{Addr: "rcpt@example.com"}})
					switch tt.wantAt {
					case "MAIL":
						if !isCode(err, 550) {
							t.Fatalf("transaction %d: MAIL: %v, want the upstream's 550", i+1, err)
						}
					case "RCPT":
						if err != nil || !isCode(rcptErrs[0], 550) {
							t.Fatalf("transaction %d: %v, RCPT %v, want the upstream's 550 to RCPT", i+1, err, rcptErrs)
						}
					default:
						if err != nil || rcptErrs[0] != nil {
							t.Fatalf("transaction %d: %v, RCPT %v", i+1, err, rcptErrs)
						}
					}
				}
				c.Release()
			}
			// A last transaction delivers, on a fresh session if need be.
			c := acquire(t, p)
			if err := send(c, 0); err != nil {
				t.Fatalf("a message after the %s: %v", tt.name, err)
			}
			c.Release()

			st, ps := up.Stats(), p.Stat()
			t.Logf("%d transactions: %d upstream connections, at most %d errors and %d junk commands on one; closed: %d for errors, %d for junk",
				tt.n, st.Conns, st.MostErrors, st.MostJunk, ps.ClosedErrors, ps.ClosedJunk)
			if st.MostErrors > 8 || st.MostJunk > 50 {
				t.Errorf("an upstream connection made %d errors or %d junk commands without a message accepted; the pool retires a session at 8 or 50",
					st.MostErrors, st.MostJunk)
			}
			if got := tt.stat(ps); got < tt.min {
				t.Errorf("the pool closed %d sessions for this reason, want at least %d (Stat %+v)", got, tt.min, ps)
			}
			if st.Messages != 1 {
				t.Errorf("upstream accepted %d messages, want 1", st.Messages)
			}
			closed := ps.ClosedErrors + ps.ClosedJunk
			memsmtp.WaitFor(t, "the retired sessions' connections to close", func() bool { return up.Stats().Open == 1 })
			if quits := up.Stats().Commands["QUIT"]; quits != closed {
				t.Errorf("upstream saw %d QUIT for %d retired sessions: they close politely", quits, closed)
			}
		})
	}
}

// TestDeliveriesKeepTheSession: the upstream forgets a session's errors
// when it accepts a message, and so does the pool: refused recipients
// between deliveries, five in a row at most, never retire the session.
func TestDeliveriesKeepTheSession(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	p := newPool(t, up, pool.Config{MaxConns: 1})
	refused := &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user"}
	for round := range 6 {
		up.Inject(memsmtp.Rcpt, memsmtp.Repeat(memsmtp.Fault{Reply: refused}, 5)...)
		for range 5 {
			c := acquire(t, p)
			if rcptErrs, err := c.Envelope(context.Background(), "sender@example.com", nil, []pool.Recipient{{Addr: "gone@example.com"}}); err != nil || !isCode(rcptErrs[0], 550) {
				t.Fatalf("%v, RCPT %v, want the upstream's 550 to RCPT", err, rcptErrs)
			}
			c.Release()
		}
		c := acquire(t, p)
		if err := send(c, round); err != nil {
			t.Fatal(err)
		}
		c.Release()
	}
	st, ps := up.Stats(), p.Stat()
	if st.Conns != 1 || ps.ClosedErrors != 0 || ps.ClosedJunk != 0 {
		t.Errorf("30 refused recipients, 5 between deliveries: %d upstream connections, %d closed for errors, %d for junk; want 1, 0, 0",
			st.Conns, ps.ClosedErrors, ps.ClosedJunk)
	}
	if st.MostErrors != 5 || st.Messages != 6 {
		t.Errorf("the upstream counted at most %d errors without a delivery and accepted %d messages, want 5 and 6", st.MostErrors, st.Messages)
	}
}

// isCode reports whether err carries an upstream reply with code.
func isCode(err error, code int) bool {
	var smtpErr *smtp.SMTPError
	return errors.As(err, &smtpErr) && smtpErr.Code == code
}
