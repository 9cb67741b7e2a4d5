package proxy

import (
	"crypto/tls"
	"errors"
	"math/rand/v2"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/pool"
)

// Replies the proxy makes up itself. Their texts are for the client; the
// details behind them go to the log.
var (
	replyBusy = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 5},
		Message: "All upstream sessions stayed busy for the acquire timeout; try again later"}
	replyUnavailable = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 0},
		Message: "Upstream server unavailable; try again later"}
	replyMisconfigured = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 5},
		Message: "Cannot set up a session with the upstream server as configured; see smtppool's log"}
	replyShuttingDown = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2},
		Message: "smtppool is shutting down; try again later"}
	replyClientRead = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0},
		Message: "Error reading the message"}
	replyNoSMTPUTF8 = &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 6, 7},
		Message: "The upstream server does not support SMTPUTF8"}
	replyNo8BitMIME = &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 3},
		Message: "The upstream server does not support 8BITMIME, and the message is not converted"}
	replyTooBigUpstream = &smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 3, 4},
		Message: "Message size exceeds the upstream server's limit"}
)

// Internal outcomes of borrowing a session, turned into replies by classify.
var (
	errBusy         = errors.New("no upstream session free within the acquire timeout")
	errShuttingDown = errors.New("shutting down")
)

// classify turns an error from the pool or the upstream into the client's
// reply, and says whether a fresh session might succeed where this one
// failed.
//
//   - An upstream 5xx is final and reaches the client as it is.
//   - An upstream 4xx is retried; if tries run out, the client gets it, as
//     451 when it was 421, since the proxy keeps the client's connection.
//   - 452 4.5.3 (too many recipients) is passed on at once: the client is
//     expected to send the remaining recipients in another transaction.
//   - Connection failures are retried and end as 451 4.4.0.
//   - Set-up failures that retrying cannot mend (no STARTTLS when required,
//     no usable AUTH, an untrusted certificate) end at once as 451 4.3.5.
func classify(err error) (reply *smtp.SMTPError, retry bool) {
	var smtpErr *smtp.SMTPError
	var certErr *tls.CertificateVerificationError
	var recordErr tls.RecordHeaderError
	switch {
	case errors.Is(err, errBusy):
		return replyBusy, false
	case errors.Is(err, errShuttingDown), errors.Is(err, pool.ErrClosed):
		return replyShuttingDown, false
	case errors.As(err, &smtpErr):
		return classifyReply(smtpErr)
	case errors.Is(err, pool.ErrTLSUnavailable), errors.Is(err, pool.ErrAuthUnavailable),
		errors.As(err, &certErr), errors.As(err, &recordErr):
		return replyMisconfigured, false
	}
	return replyUnavailable, true
}

func classifyReply(e *smtp.SMTPError) (reply *smtp.SMTPError, retry bool) {
	reply = &smtp.SMTPError{Code: e.Code, EnhancedCode: e.EnhancedCode, Message: e.Message}
	switch {
	case e.Code >= 500 && e.Code < 600:
		return reply, false
	case e.Code == 452 && e.EnhancedCode == smtp.EnhancedCode{4, 5, 3}:
		return reply, false
	case e.Code == 421:
		reply.Code = 451
		return reply, true
	case e.Code >= 400 && e.Code < 500:
		return reply, true
	}
	// A reply out of sequence (a 250 where 354 was due, say): the session is
	// confused, a fresh one may not be.
	return replyUnavailable, true
}

// backoff returns the pause before try number failures+1: base doubled for
// each failure after the first, capped at max, with "equal jitter" (half
// fixed, half random) so that clients failing together spread out.
func backoff(failures int, base, max time.Duration) time.Duration {
	d := max
	if shift := failures - 1; shift < 30 && base<<shift < max {
		d = base << shift
	}
	return d/2 + rand.N(d/2+1)
}

// checkMailOptions refuses MAIL parameters that the upstream session cannot
// carry, rather than dropping them and altering the message.
func checkMailOptions(c *pool.Conn, opts *smtp.MailOptions) error {
	if opts.UTF8 {
		if ok, _ := c.Extension("SMTPUTF8"); !ok {
			return replyNoSMTPUTF8
		}
	}
	if opts.Body == smtp.Body8BitMIME {
		if ok, _ := c.Extension("8BITMIME"); !ok {
			return replyNo8BitMIME
		}
	}
	if max, ok := c.MaxMessageSize(); ok && opts.Size > max {
		return replyTooBigUpstream
	}
	return nil
}
