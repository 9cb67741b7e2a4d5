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

// ErrNoReply means the connection failed after the whole message, final dot
// included, was written, and before the upstream's reply arrived. The
// upstream may or may not have accepted the message.
var ErrNoReply = errors.New("connection lost after the end of the message, before the reply")

// ErrInvalidArgument means a command was refused before it was sent: its
// argument holds CR, LF or NUL, which would end or corrupt the command line.
// The session stays healthy.
var ErrInvalidArgument = errors.New("argument contains CR, LF or NUL")

// ErrUpstreamDown means a recent attempt to set up a session failed and the
// next probe of the upstream is not due yet; it wraps that attempt's error.
var ErrUpstreamDown = errors.New("upstream down, waiting to probe it again")
