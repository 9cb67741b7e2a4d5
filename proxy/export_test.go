package proxy

import (
	"time"

	"github.com/emersion/go-smtp"
)

// ReservedPeak returns the most of the buffer budget that srv's backend
// has held at once, in bytes.
func ReservedPeak(srv *smtp.Server) int64 {
	return srv.Backend.(*backend).reservedPeak.Load()
}

// OnHeldPastTimeout makes srv's backend call f whenever a transaction gives
// its upstream session back after its timeout, with how long past the
// timeout the session waited for the client.
func OnHeldPastTimeout(srv *smtp.Server, f func(time.Duration)) {
	srv.Backend.(*backend).heldPastTimeout.Store(&f)
}

// ReplyLostTwice is the reply to a message whose resend lost its reply
// too, after its first sending had: it may have been delivered.
var ReplyLostTwice = replyLostTwice

// StreamsEnded returns how many of ln's open client connections have met
// the end of their client's stream.
func StreamsEnded(ln *Listener) int {
	ln.mu.Lock()
	defer ln.mu.Unlock()
	n := 0
	for c := range ln.conns {
		if c.eof.Load() {
			n++
		}
	}
	return n
}
