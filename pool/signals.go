package pool

import (
	"errors"
	"fmt"
	"strings"

	"github.com/emersion/go-smtp"
)

// Signals are what an upstream's refusal says about its limits, read from
// the reply's code, enhanced code and well-known text, so that the pool
// and its users react to the kind of limit rather than just the class.
type signal int

const (
	signalNone signal = iota
	// signalTooManyConns: the upstream refuses another concurrent
	// connection (a 421 banner "too many connections", 421 4.3.2, Exchange
	// Online's 432 4.3.2 "Concurrent connections limit exceeded", which
	// comes at DATA, or its older "sender thread limit exceeded").
	signalTooManyConns
	// signalTooFast: the upstream refuses the sending rate (Amazon SES's
	// 454 "Throttling failure: Maximum sending rate exceeded", Google's
	// 450 4.2.1, 421 4.7.0 "Try again later").
	signalTooFast
	// signalQuota: the sender's quota for the day is spent (SES's 454
	// "Daily message quota exceeded", Google's 550 5.4.5, Exchange
	// Online's 554 5.2.0 with STOREDRV): retrying today does not help.
	signalQuota
)

// Errors that wrap an upstream reply whose signal the pool recognised.
var (
	// ErrConnLimit wraps a reply that refused a connection over the
	// upstream's concurrency limit. The pool lowers its effective cap.
	ErrConnLimit = errors.New("upstream connection limit")
	// ErrCapLowered is wrapped with ErrConnLimit when the reply made the
	// pool lower its effective cap, or came on a session over a cap
	// lowered before (one of several refused at once): a retry waits for
	// a session within the new cap and is likely to succeed.
	ErrCapLowered = errors.New("effective cap lowered")
	// ErrTooFast wraps a reply that refused the sending rate. The pool
	// slows its rate limit down for a while.
	ErrTooFast = errors.New("upstream sending rate limit")
	// ErrQuota wraps a reply that says the sender's daily quota is spent;
	// retrying does not help.
	ErrQuota = errors.New("upstream quota exhausted")
)

// classifySignal reads the limit, if any, that an upstream reply signals.
func classifySignal(e *smtp.SMTPError) signal {
	text := strings.ToLower(e.Message)
	enh := e.EnhancedCode
	switch {
	case strings.Contains(text, "receiving mail at a rate"):
		// Google's 450 4.2.1 for one busy recipient's mailbox: that
		// recipient's limit, not the sender's.
		return signalNone
	case strings.Contains(text, "daily message quota"), e.Code == 550 && enh == smtp.EnhancedCode{5, 4, 5},
		e.Code == 554 && enh == smtp.EnhancedCode{5, 2, 0} && strings.Contains(text, "storedrv"):
		return signalQuota
	case strings.Contains(text, "too many connections"), strings.Contains(text, "concurrent connections"),
		strings.Contains(text, "sender thread limit"), (e.Code == 421 || e.Code == 432) && enh == smtp.EnhancedCode{4, 3, 2}:
		return signalTooManyConns
	case strings.Contains(text, "maximum sending rate"), e.Code == 450 && enh == smtp.EnhancedCode{4, 2, 1},
		e.Code == 421 && enh == smtp.EnhancedCode{4, 7, 0} && strings.Contains(text, "try again later"):
		return signalTooFast
	}
	return signalNone
}

// signalError wraps err with the sentinel of its signal, if it carries an
// upstream reply that signals a limit, and lets the pool react: lower the
// cap (given the sessions open when the reply came, the refused one
// included) or slow down. inSession says the reply came on a session set
// up before, not while setting one up.
func (p *Pool) signalError(err error, open int32, inSession bool) error {
	var smtpErr *smtp.SMTPError
	if err == nil || !errors.As(err, &smtpErr) {
		return err
	}
	switch classifySignal(smtpErr) {
	case signalTooManyConns:
		// A session refused while sessions over a cap lowered before
		// remain (open > the cap) is one of them: it closes, and its
		// retry waits for a place within the cap. (Not so at set-up,
		// where a retry would dial again at once while a closing
		// session still counts.)
		if p.lowerCap(open-1, smtpErr) || inSession && open > p.gate.current() {
			return fmt.Errorf("%w (%w): %w", ErrConnLimit, ErrCapLowered, err)
		}
		return fmt.Errorf("%w: %w", ErrConnLimit, err)
	case signalTooFast:
		p.slowDown(smtpErr)
		return fmt.Errorf("%w: %w", ErrTooFast, err)
	case signalQuota:
		return fmt.Errorf("%w: %w", ErrQuota, err)
	}
	return err
}
