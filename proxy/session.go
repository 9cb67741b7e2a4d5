package proxy

import (
	"context"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/pool"
)

// session is one client connection. Its transaction moves through these
// states, each a go-smtp callback:
//
//	idle     --Mail-->  held:     upstream session held; MAIL answered once its parameters
//	                              pass, sent with the first RCPT (upstream with PIPELINING)
//	idle     --Mail-->  envelope: upstream session held, MAIL relayed (without PIPELINING)
//	held     --Rcpt-->  envelope: MAIL and RCPT in one write; the client hears RCPT's verdict,
//	                              or MAIL's refusal, which ends the transaction
//	envelope --Rcpt-->  envelope: RCPT relayed; the upstream's verdict is the client's
//	envelope --Data-->  idle:     message buffered, relayed (BDAT with CHUNKING, else DATA),
//	                              upstream's verdict returned
//	any      --Reset/Logout/transaction timeout--> idle: upstream session released
//
// Every step runs through transaction.relay, which replays the transaction
// on a fresh upstream session when the current one fails transiently: the
// envelope (MAIL and the accepted recipients) goes in one write, with the
// RCPT being relayed, when the upstream offers PIPELINING.
//
// go-smtp calls Data on a goroutine of its own for BDAT, while the
// connection's goroutine may call Reset or Logout, so the current
// transaction is guarded by mu and each transaction by its own lock.
type session struct {
	b      *backend
	client string      // remote address, for logs
	smtp   *smtp.Conn  // go-smtp's connection, for the declared size of BDAT chunks
	conn   *clientConn // the client's connection, or nil if not from a Listener
	access accessState // TLS, loopback and AUTH: see access.go

	mu sync.Mutex
	tx *transaction // the current transaction, or nil when idle
}

// Mail starts a transaction: it borrows an upstream session, waiting while
// every session is busy, and relays MAIL FROM, or, if the upstream offers
// PIPELINING, checks its parameters against the upstream's extensions and
// holds it for the first RCPT.
func (s *session) Mail(from string, opts *smtp.MailOptions) error {
	if err := s.mayMail(); err != nil {
		return err
	}
	if !validArgument(from) {
		return replyBadArgument
	}
	s.mu.Lock()
	if s.tx != nil {
		s.mu.Unlock()
		// go-smtp lets MAIL through in a transaction and would keep the
		// old recipients: refuse, as RFC 5321 asks.
		return replyNestedMail
	}
	tx := s.b.newTransaction(s, from, opts)
	s.tx = tx
	s.mu.Unlock()

	tx.mu.Lock()
	defer tx.mu.Unlock()
	relayMail := func() error {
		return tx.relay(cmdMail, func(_ context.Context, c *pool.Conn) error {
			_, err := upstreamMailOptions(c, tx.from, tx.opts)
			return err
		})
	}
	// The message's share of the buffer budget first, then an upstream
	// session, within one AcquireTimeout: a transaction that waits for
	// buffer space holds no session (see reserveBuffer).
	tx.waitStart = time.Now()
	var err error
	if tx.tryReserveBuffer() && tx.tryAcquire() && tx.up.Pipelining() {
		// Buffer space, an idle session, and MAIL held for the first
		// RCPT: nothing to wait for, so no need to watch the client
		// meanwhile (which costs system calls).
		err = relayMail()
	} else {
		err = s.watching(tx, func() error {
			if err := tx.reserveBuffer(); err != nil {
				return err
			}
			return relayMail()
		})
	}
	tx.waitStart = time.Time{}
	if err != nil {
		s.detach(tx)
		tx.finishLocked()
		return err
	}
	return nil
}

// Rcpt relays RCPT TO; the client hears the upstream's verdict.
func (s *session) Rcpt(to string, opts *smtp.RcptOptions) error {
	if !validArgument(to) {
		return replyBadArgument
	}
	tx := s.current()
	if tx == nil {
		return replyNoTransaction // go-smtp checks the order of commands; this is a second guard
	}
	tx.mu.Lock()
	defer tx.mu.Unlock()
	err := s.watching(tx, func() error {
		return tx.relay(cmdRcpt, func(ctx context.Context, c *pool.Conn) error {
			if err := checkRecipient(c, &tx.opts, to); err != nil {
				return err
			}
			if !tx.envelopeSent {
				return tx.sendEnvelope(&recipient{to: to, opts: opts})
			}
			return c.Rcpt(ctx, upstreamPath(to), opts)
		})
	})
	if err != nil {
		return err
	}
	tx.rcpts = append(tx.rcpts, recipient{to: to, opts: opts})
	return nil
}

// Data buffers the message, so that it can be replayed, then relays it.
// It answers 250, with the upstream's own text, only after the upstream
// accepted this very message.
//
// The message is read without holding the transaction's lock, and the
// transaction's end (its timeout, above all) interrupts the read: a client
// slow to send its message, or one that keeps a BDAT message open with
// NOOPs between chunks, loses its upstream session at the transaction
// timeout like any other, and gets 451 4.4.2.
//
// For BDAT, go-smtp calls Data on its own goroutine and copies each chunk
// from the connection into r; the message is relayed only if the chunks
// delivered every byte their commands declared (see chunks.go).
func (s *session) Data(r io.Reader) error {
	pipe, chunked := r.(*io.PipeReader) // go-smtp's BDAT pipe
	tx := s.beginMessage(chunked)
	if tx == nil {
		return replyNoTransaction
	}
	tx.mu.Lock()
	defer tx.mu.Unlock()
	if chunked && !s.b.chunks.available(s.smtp) {
		return replyChunkingUnverifiable
	}
	run := s.watching
	if chunked {
		// go-smtp's goroutine reads the connection meanwhile, and reports
		// a client that leaves by calling Logout.
		run = func(_ *transaction, f func() error) error { return f() }
	}
	// The message's share of the buffer budget was taken at MAIL. When
	// Data is done, so is the transaction: its upstream session goes back,
	// then its buffer and share of the budget, so that no transaction
	// holds a session without its share.
	defer func() {
		tx.releaseUpstream()
		tx.releaseBuffer()
	}()
	// Hold an upstream session before reading the message, so that
	// messages are read into memory only as fast as sessions free up.
	// (go-smtp drains the message when Data returns early.) Watching the
	// client costs system calls: only steps that may wait are watched.
	if !tx.envelopeReady() {
		if err := run(tx, func() error { return tx.relay(cmdData, nil) }); err != nil {
			return err
		}
	}
	if s.conn != nil {
		// The client's clock starts now that it is asked for its message
		// (the 354 that go-smtp wrote before Data goes out with the first
		// read), not when it sent DATA or BDAT: the wait above, for a
		// session after a failed recipient gave one up, and its replay,
		// may have taken longer than the client timeout.
		s.conn.SetDeadline(time.Now().Add(s.b.cfg.ClientTimeout))
	}
	body := &clientBody{r: r, ctx: tx.ctx}
	stop := s.interruptOnEnd(tx, pipe)
	tx.reading = true
	tx.mu.Unlock()
	err := tx.readMessage(body)
	tx.mu.Lock()
	tx.reading = false
	stop()
	if err != nil || tx.ctx.Err() != nil {
		return tx.unread(err)
	}
	tx.bytes = tx.msg.Len()
	if declared, _ := s.b.chunks.declaredBytes(s.smtp); chunked && body.n != declared {
		// The client's stream ended inside the last chunk.
		tx.outcome = "truncated"
		return replyClientRead
	}
	var upstreamReply string
	err = run(tx, func() error {
		return tx.relay(cmdData, func(ctx context.Context, c *pool.Conn) error {
			if err := checkMessage(c, &tx.opts, &tx.msg); err != nil {
				return err
			}
			reply, err := c.Data(ctx, tx.msg.Reader())
			upstreamReply = reply
			return err
		})
	})
	if err != nil {
		return err
	}
	tx.delivered(upstreamReply)
	return acceptedReply(upstreamReply)
}

// interruptOnEnd makes a read of tx's message that waits for the client
// return once tx's context ends (the transaction timeout, a shutdown's):
// it closes go-smtp's BDAT pipe with the client's reply, which go-smtp
// gives to the client's next BDAT that carries data or is the LAST (a
// BDAT 0 writes nothing to the pipe), or, for DATA, moves the client
// connection's read deadline into the past. stop undoes it; once stop has
// returned, the connection's read deadline is go-smtp's again, for it to
// read the rest of the message.
func (s *session) interruptOnEnd(tx *transaction, pipe *io.PipeReader) (stop func()) {
	var interrupt, undo func()
	switch {
	case pipe != nil:
		interrupt = func() { pipe.CloseWithError(classify("", context.Cause(tx.ctx)).reply) }
	case s.conn != nil:
		interrupt, undo = s.conn.interruptRead, s.conn.restoreReadDeadline
	default:
		return func() {}
	}
	done := make(chan struct{})
	stopAfter := context.AfterFunc(tx.ctx, func() {
		defer close(done)
		interrupt()
	})
	return func() {
		if stopAfter() {
			return
		}
		<-done
		if undo != nil {
			undo()
		}
	}
}

// Reset ends the transaction; go-smtp calls it after DATA, on RSET and on
// a repeated EHLO.
func (s *session) Reset() { s.endTransaction() }

// Logout ends the transaction when the client leaves.
func (s *session) Logout() error {
	s.endTransaction()
	return nil
}

// current returns the transaction in progress, or nil.
func (s *session) current() *transaction {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.tx
}

// beginMessage returns the current transaction, and tells the client
// connection that the client is in the middle of a message until the
// transaction ends (see clientConn.timedOut). For BDAT, go-smtp calls Data
// on a goroutine of its own, which may come after the transaction ended.
func (s *session) beginMessage(chunked bool) *transaction {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn != nil && (s.tx != nil || !chunked) {
		s.conn.inMessage.Store(true)
	}
	return s.tx
}

// detach forgets tx if it is still the current transaction.
func (s *session) detach(tx *transaction) {
	s.mu.Lock()
	if s.tx == tx {
		s.tx = nil
	}
	s.mu.Unlock()
}

// endTransaction ends the current transaction, if any. A command of it
// still running elsewhere (BDAT's Data) stops waiting at once; its upstream
// session is released when that command returns.
func (s *session) endTransaction() {
	s.mu.Lock()
	tx := s.tx
	s.tx = nil
	if s.conn != nil {
		s.conn.inMessage.Store(false)
	}
	s.mu.Unlock()
	if tx != nil {
		tx.end()
	}
}

// watching runs f while watching the client's connection, so that the
// transaction stops waiting for the upstream when the client leaves. It
// must be called on the connection's goroutine, where go-smtp is not
// reading.
func (s *session) watching(tx *transaction, f func() error) error {
	if s.conn == nil {
		return f()
	}
	stop := s.conn.watch(func() { tx.cancel(errClientGone) })
	defer stop()
	return f()
}

// validArgument refuses CR, LF and NUL in an envelope address: go-smtp's
// server lets a bare CR through, and the line sent upstream would be
// corrupt.
func validArgument(s string) bool { return !strings.ContainsAny(s, "\r\n\x00") }

// acceptedReply is the client's 250 for an accepted message, carrying the
// upstream's own text (its queue id, often), on one line.
func acceptedReply(upstream string) *smtp.SMTPError {
	reply := &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 0, 0}, Message: "OK"}
	text := strings.Join(strings.Fields(upstream), " ")
	if code, rest, ok := cutEnhancedCode(text); ok && code[0] == 2 {
		reply.EnhancedCode, text = code, rest
	}
	if text != "" {
		reply.Message = clientText(text)
	}
	return reply
}

// cutEnhancedCode splits a leading enhanced status code ("2.0.0 ...") off
// a reply text.
func cutEnhancedCode(text string) (code smtp.EnhancedCode, rest string, ok bool) {
	first, rest, _ := strings.Cut(text, " ")
	parts := strings.Split(first, ".")
	if len(parts) != 3 {
		return code, text, false
	}
	for i, p := range parts {
		if p == "" || len(p) > 3 {
			return code, text, false
		}
		for _, ch := range p {
			if ch < '0' || ch > '9' {
				return code, text, false
			}
			code[i] = code[i]*10 + int(ch-'0')
		}
	}
	return code, rest, true
}
