package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"strings"
	"unicode/utf8"

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
	replyMessageTimeout = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 4, 2},
		Message: "Timeout waiting for the rest of the message; closing the connection"}
	replyClientGone = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0},
		Message: "Transaction ended"}
	replyTransactionTimeout = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 2},
		Message: "Transaction took too long; start again"}
	replyReplayRefused = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0},
		Message: "Upstream refused on a retry what it had accepted; try the whole message again later"}
	replyMaybeDelivered = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0},
		Message: "Upstream refused a resend of a message whose first sending it may have kept; see smtppool's log"}
	replyLostTwice = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 0},
		Message: "Upstream lost its reply to the message twice; it may have been delivered; see smtppool's log"}
	replyBadArgument = &smtp.SMTPError{Code: 501, EnhancedCode: smtp.EnhancedCode{5, 5, 4},
		Message: "Address contains CR, LF or NUL"}
	replyChunkingUnverifiable = &smtp.SMTPError{Code: 502, EnhancedCode: smtp.EnhancedCode{5, 5, 1},
		Message: "BDAT is not available; use DATA"}
	replyLineTooLong = &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 0},
		Message: "Message has a line longer than the SMTP limit"}
	replyNoSMTPUTF8Address = &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 6, 7},
		Message: "Non-ASCII address with SMTPUTF8, and the upstream server does not support SMTPUTF8"}
	replyNoSMTPUTF8Header = &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 9},
		Message: "Non-ASCII header with SMTPUTF8, and the upstream server does not support SMTPUTF8"}
	replyNo8BitMIME = &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 3},
		Message: "8-bit message with BODY=8BITMIME, and the upstream server does not support 8BITMIME; smtppool does not convert messages"}
	replyTooBigUpstream = &smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 3, 4},
		Message: "Message size exceeds the upstream server's limit"}
	replyNestedMail = &smtp.SMTPError{Code: 503, EnhancedCode: smtp.EnhancedCode{5, 5, 1},
		Message: "Nested MAIL command: end the transaction first"}
	replyNoTransaction = &smtp.SMTPError{Code: 503, EnhancedCode: smtp.EnhancedCode{5, 5, 1},
		Message: "No transaction: send MAIL first"}
)

// Internal outcomes, turned into replies by classify.
var (
	errBusy               = errors.New("no upstream session free within the acquire timeout")
	errShuttingDown       = errors.New("shutting down")
	errSetup              = errors.New("setting up an upstream session")
	errClientGone         = errors.New("client left")
	errTransactionEnded   = errors.New("transaction ended")
	errTransactionTimeout = errors.New("transaction timeout")
)

// verdict is what a failed try means.
type verdict struct {
	reply *smtp.SMTPError // for the client, if no retry follows
	retry bool            // another try might succeed
	// sameSession says the upstream session is healthy and only this step
	// was refused (a recipient): the retry, or the rest of the
	// transaction, goes on with it.
	sameSession bool
	now         bool // retry without a pause
	// free says the failure is not the transaction's: the upstream refused
	// a session over its limit and the pool lowered its cap, so a retry
	// within the new cap does not count as an attempt.
	free bool
}

// classify turns an error from the pool or the upstream, met while relaying
// cmd, into the client's reply, and says whether another try might succeed.
//
//   - An upstream 5xx is final and reaches the client as it is.
//   - An upstream 4xx is retried on a fresh session; if tries run out, the
//     client gets it, as 451 when it was 421, since the proxy keeps the
//     client's connection. A 4xx to RCPT concerns that recipient only, so
//     it is retried on the same, healthy session.
//   - 452 to RCPT (too many recipients) and 452 4.5.3 anywhere are passed on
//     at once: the client is expected to send the remaining recipients in
//     another transaction.
//   - A 2xx or 3xx out of sequence means a confused session: retried on a
//     fresh one.
//   - Connection failures are retried and end as 451 4.4.0.
//   - Set-up failures that retrying cannot mend (a 5xx to EHLO or AUTH, such
//     as a wrong password; no STARTTLS when required; no usable AUTH; an
//     untrusted certificate, an OAuth2 token endpoint that refuses the
//     client) end at once as 451 4.3.5: they are the
//     operator's to fix, and the message must not bounce for them.
//   - An argument the upstream cannot be sent (CR, LF, NUL) is 501 5.5.4.
//   - Limits the upstream signals: a refusal over its connection limit
//     that lowered the pool's cap is retried at once within the new cap,
//     without counting; a spent daily quota is passed on without retry; a
//     refused sending rate is retried after the longest pause.
func classify(cmd command, err error) verdict {
	var smtpErr *smtp.SMTPError
	var certErr *tls.CertificateVerificationError
	var recordErr tls.RecordHeaderError
	switch {
	case errors.Is(err, errBusy):
		return verdict{reply: replyBusy}
	case errors.Is(err, errShuttingDown), errors.Is(err, pool.ErrClosed), errors.Is(err, context.Canceled):
		return verdict{reply: replyShuttingDown}
	case errors.Is(err, errClientGone), errors.Is(err, errTransactionEnded):
		return verdict{reply: replyClientGone}
	case errors.Is(err, errTransactionTimeout):
		return verdict{reply: replyTransactionTimeout}
	case errors.Is(err, pool.ErrInvalidArgument):
		return verdict{reply: replyBadArgument}
	case errors.Is(err, pool.ErrQuota) && errors.As(err, &smtpErr):
		// The day's quota is spent: pass the reply on, no retry storm.
		return verdict{reply: &smtp.SMTPError{Code: smtpErr.Code, EnhancedCode: smtpErr.EnhancedCode, Message: clientText(smtpErr.Message)}}
	case errors.Is(err, pool.ErrCapLowered) && !errors.Is(err, pool.ErrUpstreamDown):
		return verdict{reply: replyUnavailable, retry: true, now: true, free: true}
	case errors.As(err, &smtpErr) && errors.Is(err, errSetup) && smtpErr.Code >= 500:
		return verdict{reply: replyMisconfigured}
	case errors.As(err, &smtpErr):
		return classifyReply(cmd, smtpErr)
	case errors.Is(err, pool.ErrTLSUnavailable), errors.Is(err, pool.ErrAuthUnavailable), errors.Is(err, pool.ErrTokenRefused),
		errors.As(err, &certErr), errors.As(err, &recordErr):
		return verdict{reply: replyMisconfigured}
	}
	return verdict{reply: replyUnavailable, retry: true}
}

// classifyReply judges an upstream reply to cmd.
func classifyReply(cmd command, e *smtp.SMTPError) verdict {
	reply := &smtp.SMTPError{Code: e.Code, EnhancedCode: e.EnhancedCode, Message: clientText(e.Message)}
	switch {
	case e.Code >= 500 && e.Code < 600:
		// A refused recipient leaves the rest of the transaction intact.
		return verdict{reply: reply, sameSession: cmd == cmdRcpt}
	case e.Code == 452 && (cmd == cmdRcpt || e.EnhancedCode == smtp.EnhancedCode{4, 5, 3}):
		return verdict{reply: reply}
	case e.Code == 421:
		reply.Code = 451
		return verdict{reply: reply, retry: true}
	case e.Code >= 400 && e.Code < 500:
		return verdict{reply: reply, retry: true, sameSession: cmd == cmdRcpt}
	}
	return verdict{reply: replyUnavailable, retry: true}
}

// retryReason names the kind of a transient failure, for metrics.
func retryReason(err error) string {
	var smtpErr *smtp.SMTPError
	switch {
	case errors.Is(err, pool.ErrNoReply):
		return "no_reply"
	case errors.Is(err, pool.ErrConnLimit):
		return "conn_limit"
	case errors.Is(err, pool.ErrTooFast):
		return "too_fast"
	case isExtensionRefusal(err):
		return "failover" // an entry without an extension another one had
	case errors.As(err, &smtpErr) && smtpErr.Code == 530:
		return "auth_lost"
	case errors.As(err, &smtpErr) && smtpErr.Code == 421:
		return "reply_421"
	case errors.As(err, &smtpErr) && smtpErr.Code/100 == 4:
		return "reply_4xx"
	case errors.As(err, &smtpErr):
		return "other"
	case errors.Is(err, errSetup):
		return "connect"
	}
	return "connection"
}

// maxClientText bounds each line of an upstream's reply text passed on to
// a client, so that the reply line, code and enhanced code included, stays
// within RFC 5321's 512 octets: a client with a line limit (go-smtp's is
// 2,000 bytes) must hear the verdict, not fail to read it.
const maxClientText = 480

// clientText is an upstream reply's text as a client may be sent it: each
// line cut to maxClientText bytes, at a character boundary.
func clientText(text string) string {
	if len(text) <= maxClientText {
		return text
	}
	lines := strings.Split(text, "\n")
	for i, l := range lines {
		if len(l) <= maxClientText {
			continue
		}
		cut := maxClientText
		for cut > 0 && !utf8.RuneStart(l[cut]) {
			cut--
		}
		lines[i] = l[:cut]
	}
	return strings.Join(lines, "\n")
}
