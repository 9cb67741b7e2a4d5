package pool

import (
	"errors"
	"fmt"
	"strings"

	"github.com/emersion/go-smtp"
)

// Signals are what an upstream's refusal says about its limits, read from
// the reply's code and enhanced code first, and from its text only where a
// provider's documented reply needs it: only with the code that provider
// uses for it, at the stage where it comes, and never from the part of a
// reply that echoes what smtppool sent (an address, which the client chose,
// or anything in angle brackets). So a client cannot make the pool lower
// its cap or slow down by choosing an address such as
// <"too many connections"@example.com>, which an upstream quotes in its
// refusal.
type signal int

const (
	signalNone signal = iota
	// signalTooManyConns: the upstream refuses another concurrent
	// connection (a 421 "too many connections" or 421 4.3.2 while a
	// session is set up, as Postfix's and Exchange's banners say;
	// Exchange Online's 432 4.3.2 at DATA).
	signalTooManyConns
	// signalTooFast: the upstream refuses the sending rate (Amazon SES's
	// 454 "Throttling failure: Maximum sending rate exceeded" at DATA,
	// Google's 450 4.2.1 "Peak SMTP relay limit exceeded", Gmail's 421
	// 4.7.0 "Try again later" while a session is set up).
	signalTooFast
	// signalQuota: the sender's quota for the day is spent (SES's 454
	// "Daily message quota exceeded" at DATA, Google's 550 5.4.5,
	// Exchange Online's 554 5.2.0 STOREDRV): retrying today does not
	// help.
	signalQuota
)

// The stages of a reply, as Config.OnReply names them.
const (
	stageSetUp     = "set-up"
	stageMail      = "MAIL"
	stageRcpt      = "RCPT"
	stageData      = "DATA"
	stageEndOfData = "end of DATA"
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

// Enhanced codes the signals are read from.
var (
	enh432 = smtp.EnhancedCode{4, 3, 2} // system not accepting network messages
	enh470 = smtp.EnhancedCode{4, 7, 0}
	enh421 = smtp.EnhancedCode{4, 2, 1}
	enh545 = smtp.EnhancedCode{5, 4, 5}
	enh520 = smtp.EnhancedCode{5, 2, 0}
)

// classifySignal reads the limit, if any, that an upstream reply at stage
// signals. echoes are the arguments of the command it answers (the
// address of MAIL or RCPT), which the text is read without.
func classifySignal(stage string, e *smtp.SMTPError, echoes ...string) signal {
	code, enh := e.Code, e.EnhancedCode
	text := serverText(e.Message, echoes)
	switch stage {
	case stageSetUp:
		// The greeting, or a reply to the pool's own EHLO, STARTTLS or
		// AUTH: no client chose any of it.
		switch {
		case code == 421 && (enh == enh432 || strings.Contains(text, "too many connections") ||
			strings.Contains(text, "concurrent connections")):
			return signalTooManyConns
		case code == 421 && enh == enh470 && strings.HasPrefix(text, "try again later"):
			return signalTooFast
		}
	case stageRcpt:
		// A reply to RCPT is about that recipient. Google's peak relay
		// limit counts recipients, so it may come here; nothing else
		// does, and no 5xx.
		if code == 450 && enh == enh421 && strings.HasPrefix(text, "peak smtp relay limit") {
			return signalTooFast
		}
	case stageMail, stageData, stageEndOfData:
		atData := stage != stageMail
		switch {
		case code == 432 && enh == enh432:
			return signalTooManyConns
		case code == 450 && enh == enh421 && strings.HasPrefix(text, "peak smtp relay limit"):
			return signalTooFast
		case code == 454 && atData && strings.HasPrefix(text, "throttling failure: maximum sending rate exceeded"):
			return signalTooFast
		case code == 454 && atData && strings.HasPrefix(text, "throttling failure: daily message quota exceeded"):
			return signalQuota
		case code == 550 && enh == enh545:
			return signalQuota
		case code == 554 && enh == enh520 && strings.HasPrefix(text, "storedrv"):
			return signalQuota
		}
	}
	return signalNone
}

// serverText is a reply's text in lower case, with what may echo the
// client's input taken out: each echo, as sent and with its quotes removed
// (as Postfix quotes an address), wherever it is; then every span in angle
// brackets; then, at the start, the echo's local part alone, in either
// form, as a word of its own (as Sendmail's "user... User unknown" quotes
// a local recipient; only there, where the provider's words must begin,
// so that a short local part such as "a" takes no letters out of them).
// What is left is the server's own words, which a client cannot choose;
// leading spaces are trimmed.
func serverText(msg string, echoes []string) string {
	text := strings.ToLower(msg)
	var locals []string
	for _, e := range echoes {
		e = strings.ToLower(e)
		for _, form := range []string{e, strings.ReplaceAll(e, `"`, "")} {
			if form != "" {
				text = strings.ReplaceAll(text, form, "")
			}
		}
		if at := strings.LastIndexByte(e, '@'); at > 0 {
			locals = append(locals, e[:at], strings.ReplaceAll(e[:at], `"`, ""))
		}
	}
	var b strings.Builder
	for {
		before, after, found := strings.Cut(text, "<")
		b.WriteString(before)
		if !found {
			break
		}
		_, rest, closed := strings.Cut(after, ">")
		if !closed {
			break // an unclosed bracket: drop the rest
		}
		text = rest
	}
	text = strings.TrimLeft(b.String(), " ")
	for _, local := range locals {
		rest, ok := strings.CutPrefix(text, local)
		if ok && local != "" && (rest == "" || !isWordByte(rest[0])) {
			text = strings.TrimLeft(rest, " ")
		}
	}
	return text
}

// isWordByte reports whether c is a letter or digit: a local part counts
// as echoed at the start of a reply only when no word goes on after it.
func isWordByte(c byte) bool {
	return 'a' <= c && c <= 'z' || '0' <= c && c <= '9'
}

// signalError wraps err with the sentinel of its signal, if it carries an
// upstream reply at stage that signals a limit, and lets the pool react:
// lower the cap (given the sessions open when the reply came, the refused
// one included) or slow down. echoes are the arguments of the command the
// reply answers, as classifySignal takes them.
func (p *Pool) signalError(err error, open int32, stage string, echoes ...string) error {
	var smtpErr *smtp.SMTPError
	if err == nil || !errors.As(err, &smtpErr) {
		return err
	}
	switch classifySignal(stage, smtpErr, echoes...) {
	case signalTooManyConns:
		// A session refused while sessions over a cap lowered before
		// remain (open > the cap) is one of them: it closes, and its
		// retry waits for a place within the cap. (Not so at set-up,
		// where a retry would dial again at once while a closing
		// session still counts.)
		inSession := stage != stageSetUp
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
