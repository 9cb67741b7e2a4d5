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
	replyLineTooLong = &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 0},
		Message: "Message has a line longer than the SMTP limit"}
	replyNoSMTPUTF8Address = &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 6, 7},
		Message: "Non-ASCII address, and the upstream server does not support SMTPUTF8"}
	replyNoSMTPUTF8Header = &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 9},
		Message: "Non-ASCII header, and the upstream server does not support SMTPUTF8"}
	replyNo8BitMIME = &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 3},
		Message: "8-bit message, and the upstream server does not support 8BITMIME; smtppool does not convert messages"}
	replyTooBigUpstream = &smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 3, 4},
		Message: "Message size exceeds the upstream server's limit"}
	replyNestedMail = &smtp.SMTPError{Code: 503, EnhancedCode: smtp.EnhancedCode{5, 5, 1},
		Message: "Nested MAIL command: end the transaction first"}
	replyNoTransaction = &smtp.SMTPError{Code: 503, EnhancedCode: smtp.EnhancedCode{5, 5, 1},
		Message: "No transaction: send MAIL first"}
)

// Internal outcomes of borrowing a session, turned into replies by classify.
var (
	errBusy         = errors.New("no upstream session free within the acquire timeout")
	errShuttingDown = errors.New("shutting down")
	errSetup        = errors.New("setting up an upstream session")
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
//   - Set-up failures that retrying cannot mend (a 5xx to EHLO or AUTH, such
//     as a wrong password; no STARTTLS when required; no usable AUTH; an
//     untrusted certificate) end at once as 451 4.3.5: they are the
//     operator's to fix, and the message must not bounce for them.
func classify(err error) (reply *smtp.SMTPError, retry bool) {
	var smtpErr *smtp.SMTPError
	var certErr *tls.CertificateVerificationError
	var recordErr tls.RecordHeaderError
	switch {
	case errors.Is(err, errBusy):
		return replyBusy, false
	case errors.Is(err, errShuttingDown), errors.Is(err, pool.ErrClosed):
		return replyShuttingDown, false
	case errors.As(err, &smtpErr) && errors.Is(err, errSetup) && smtpErr.Code >= 500:
		return replyMisconfigured, false
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
// each failure after the first, plus up to half again at random so that
// clients failing together spread out, and at most max. With the defaults
// (250 ms, 4 tries) the pauses add up to between 1.75 and 2.6 seconds,
// enough to ride out an upstream restart.
func backoff(failures int, base, max time.Duration) time.Duration {
	d := min(base, max)
	for i := 1; i < failures && d < max; i++ {
		d = min(2*d, max)
	}
	return min(d+rand.N(d/2+1), max)
}

// The checks below fit a transaction to the upstream's extensions. A
// parameter the upstream lacks is left out only where that changes nothing
// (SMTPUTF8 on an all-ASCII message, BODY=8BITMIME on a 7-bit one, SIZE);
// otherwise the client gets an error, and the message is never altered.

// upstreamMailOptions returns the MAIL parameters to send upstream for a
// transaction from from with opts, or the client's error.
func upstreamMailOptions(c *pool.Conn, from string, opts smtp.MailOptions) (*smtp.MailOptions, error) {
	if opts.UTF8 && !hasExtension(c, "SMTPUTF8") {
		if !isASCII(from) {
			return nil, replyNoSMTPUTF8Address
		}
		opts.UTF8 = false
	}
	if max, ok := c.MaxMessageSize(); ok && opts.Size > max {
		return nil, replyTooBigUpstream
	}
	// go-smtp's client declares BODY=8BITMIME itself whenever the upstream
	// offers it; checkMessage refuses 8-bit data when it does not.
	opts.Body = ""
	return &opts, nil
}

// checkRecipient refuses a non-ASCII address the upstream cannot take.
func checkRecipient(c *pool.Conn, to string) error {
	if !isASCII(to) && !hasExtension(c, "SMTPUTF8") {
		return replyNoSMTPUTF8Address
	}
	return nil
}

// checkMessage refuses 8-bit data for an upstream without 8BITMIME, and
// non-ASCII headers for one without SMTPUTF8.
func checkMessage(c *pool.Conn, msg *messageBuffer) error {
	if msg.isASCII() {
		return nil
	}
	if !hasExtension(c, "8BITMIME") {
		return replyNo8BitMIME
	}
	if !hasExtension(c, "SMTPUTF8") && !msg.headerIsASCII() {
		return replyNoSMTPUTF8Header
	}
	return nil
}

func hasExtension(c *pool.Conn, name string) bool {
	ok, _ := c.Extension(name)
	return ok
}

func isASCII[T string | []byte](s T) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}
