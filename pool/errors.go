package pool

import "errors"

// Errors for sessions that cannot be set up as configured. Retrying does not
// help; the operator has to act.
var (
	// ErrTLSUnavailable means TLS was required (by the TLS mode, or to send
	// credentials) but the upstream did not offer STARTTLS.
	ErrTLSUnavailable = errors.New("upstream does not offer STARTTLS")
	// ErrAuthUnavailable means credentials are configured but the upstream
	// offers no AUTH mechanism that can use them.
	ErrAuthUnavailable = errors.New("upstream offers no usable AUTH mechanism")
)

// ErrClosed is returned by Acquire once Close has been called.
var ErrClosed = errors.New("pool closed")

// ErrNoReply means the whole message, final dot or last chunk included,
// was written and no readable reply came: the connection failed first, or
// the reply had no reply code, or a code that is neither acceptance nor
// refusal (1xx, 3xx). The upstream may or may not have accepted the
// message. (A reply that breaks the protocol but has a code, such as
// one with a line over the limit, is the upstream's verdict.)
var ErrNoReply = errors.New("connection lost after the end of the message, before the reply")

// ErrAfterMessage wraps the upstream's refusal of a message that was
// written whole, final dot or last chunk included. An upstream that
// answers 4xx there may still have kept the message.
var ErrAfterMessage = errors.New("refused after the whole message was written")

// ErrInvalidArgument means a command was refused before it was sent: its
// argument holds CR, LF or NUL, which would end or corrupt the command line.
// The session stays healthy.
var ErrInvalidArgument = errors.New("argument contains CR, LF or NUL")

// ErrUpstreamDown means a recent attempt to set up a session failed and the
// next probe of the upstream is not due yet; it wraps that attempt's error.
var ErrUpstreamDown = errors.New("upstream down, waiting to probe it again")

// Errors for an upstream that refuses an authentication that is well formed.
var (
	// ErrTokenNotAccepted means the upstream refused the OAuth2 token
	// (535 5.7.3 from Exchange Online; a 401 challenge from Google): it has
	// expired or been revoked, or the application lacks the permissions to
	// send as the mailbox. The token is dropped from its source, so a new
	// session may succeed with a fresh one.
	ErrTokenNotAccepted = errors.New("upstream did not accept the OAuth2 token")
	// ErrAuthDisabled means the upstream has SMTP AUTH turned off for the
	// mailbox or the tenant (535 5.7.139 from Exchange Online). Retrying does
	// not help; the operator has to act.
	ErrAuthDisabled = errors.New("SMTP AUTH is disabled for the upstream mailbox or tenant")
)

// ErrTokenRefused means the OAuth2 token endpoint refused to issue a token
// to the configured client: a wrong client ID or secret, an expired secret,
// a missing admin consent, an unknown tenant or scope. Retrying does not
// help; the operator has to act.
var ErrTokenRefused = errors.New("OAuth2 token endpoint refused the client")
