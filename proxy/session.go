package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/pool"
)

// session is one client connection. Its transaction moves through these
// states, each a go-smtp callback:
//
//	idle  --Mail-->  envelope: upstream session held, MAIL relayed
//	envelope --Rcpt--> envelope: RCPT relayed; the upstream's verdict is the client's
//	envelope --Data--> idle: message buffered, relayed, upstream's verdict returned
//	any   --Reset/Logout--> idle: upstream session released (RSET if unfinished)
//
// Every step runs through relay, which replays the transaction on a fresh
// upstream session when the current one fails transiently.
type session struct {
	b      *Backend
	client string       // remote address, for logs
	up     *pool.Conn   // upstream session held for tx, or nil
	tx     *transaction // the current transaction, or nil when idle
}

// transaction is what the client has said in the current transaction, kept
// to replay it on a fresh upstream session.
type transaction struct {
	from  string
	opts  smtp.MailOptions
	rcpts []recipient // recipients the upstream accepted
	start time.Time

	failures int             // transient failures so far, against MaxAttempts
	failed   *smtp.SMTPError // set when a replay was refused: the transaction cannot succeed
}

type recipient struct {
	to   string
	opts *smtp.RcptOptions
}

// Mail starts a transaction: it borrows an upstream session and relays
// MAIL FROM, waiting while every session is busy.
func (s *session) Mail(from string, opts *smtp.MailOptions) error {
	if s.tx != nil {
		// go-smtp lets MAIL through in a transaction and would keep the
		// old recipients: refuse, as RFC 5321 asks.
		return replyNestedMail
	}
	s.tx = &transaction{from: from, start: time.Now()}
	if opts != nil {
		s.tx.opts = *opts
	}
	// The client did not authenticate, so it must not choose the identity
	// the upstream sees in MAIL's AUTH= parameter.
	s.tx.opts.Auth = nil
	if err := s.relay("MAIL", nil); err != nil {
		s.endTransaction()
		return err
	}
	return nil
}

// Rcpt relays RCPT TO; the client hears the upstream's verdict.
func (s *session) Rcpt(to string, opts *smtp.RcptOptions) error {
	err := s.relay("RCPT", func(c *pool.Conn) error {
		if err := checkRecipient(c, to); err != nil {
			return err
		}
		return c.Rcpt(to, opts)
	})
	if err != nil {
		return err
	}
	s.tx.rcpts = append(s.tx.rcpts, recipient{to: to, opts: opts})
	return nil
}

// Data buffers the message, bounded by MaxMessageBytes, so that it can be
// replayed, then relays it. nil, which go-smtp turns into 250, is returned
// only after the upstream answered 250 to this very message.
func (s *session) Data(r io.Reader) error {
	// Hold an upstream session before reading the message, so that
	// messages are read into memory only as fast as sessions free up.
	// (go-smtp drains the message when Data returns early.)
	if err := s.relay("DATA", nil); err != nil {
		return err
	}
	var msg messageBuffer
	defer msg.release()
	if _, err := msg.ReadFrom(r); err != nil {
		var smtpErr *smtp.SMTPError
		switch {
		case errors.As(err, &smtpErr):
			return smtpErr // 552 5.3.4 from go-smtp's size limit
		case errors.Is(err, smtp.ErrTooLongLine):
			return replyLineTooLong
		}
		return replyClientRead
	}
	err := s.relay("DATA", func(c *pool.Conn) error {
		if err := checkMessage(c, &msg); err != nil {
			return err
		}
		return c.Data(msg.Reader())
	})
	if err == nil && s.b.log.Enabled(context.Background(), slog.LevelDebug) {
		s.b.log.Debug("message relayed", "client", s.client, "from", s.tx.from,
			"rcpts", len(s.tx.rcpts), "bytes", msg.Len(), "attempts", s.tx.failures+1,
			"upstream_session", s.up.ID(), "duration", time.Since(s.tx.start))
	}
	return err
}

// Reset ends the transaction; go-smtp calls it after DATA, on RSET and on
// a repeated EHLO.
func (s *session) Reset() { s.endTransaction() }

// Logout ends the transaction when the client leaves.
func (s *session) Logout() error {
	s.endTransaction()
	return nil
}

func (s *session) endTransaction() {
	if s.up != nil {
		s.up.Release()
		s.up = nil
	}
	s.tx = nil
}

// relay runs step, the command cmd, on an upstream session that carries the
// transaction so far. A transient failure discards that session, waits a
// jittered backoff and tries again on a fresh one, replaying MAIL and the
// accepted recipients, until MaxAttempts tries have failed. It returns nil
// or a bare *smtp.SMTPError for the client.
func (s *session) relay(cmd string, step func(*pool.Conn) error) error {
	tx := s.tx
	switch {
	case tx == nil:
		return replyNoTransaction // go-smtp checks the order of commands; this is a second guard
	case tx.failed != nil:
		return tx.failed
	}
	for {
		replaying, err := s.try(step)
		if err == nil {
			return nil
		}
		reply, retry := classify(err)
		if !retry {
			if replaying && cmd != "MAIL" {
				// The upstream refused on replay what the client was already
				// told had been accepted: this transaction cannot succeed.
				tx.failed = reply
				s.discardUpstream()
			}
			s.logFailure(cmd, err, reply, tx)
			return reply
		}
		s.discardUpstream()
		tx.failures++
		if tx.failures >= s.b.cfg.MaxAttempts {
			s.logFailure(cmd, err, reply, tx)
			return reply
		}
		delay := backoff(tx.failures, s.b.cfg.RetryBackoff, s.b.cfg.RetryBackoffMax)
		s.b.log.Warn("transient upstream failure, retrying on a fresh session", "client", s.client,
			"command", cmd, "attempt", tx.failures, "max_attempts", s.b.cfg.MaxAttempts,
			"delay", delay, "err", err, "ambiguous", errors.Is(err, pool.ErrNoReply))
		if !s.b.sleep(delay) {
			return replyShuttingDown
		}
	}
}

// try runs step, first borrowing an upstream session and replaying the
// transaction on it if none is held. replaying reports that an error came
// from borrowing or replaying rather than from step.
func (s *session) try(step func(*pool.Conn) error) (replaying bool, err error) {
	if s.up == nil {
		c, err := s.acquire()
		if err != nil {
			return true, err
		}
		s.up = c
		if err := s.replay(c); err != nil {
			return true, err
		}
	}
	if step == nil {
		return false, nil
	}
	return false, step(s.up)
}

// acquire borrows an upstream session, waiting at most AcquireTimeout.
func (s *session) acquire() (*pool.Conn, error) {
	ctx, cancel := context.WithTimeout(s.b.ctx, s.b.cfg.AcquireTimeout)
	defer cancel()
	c, err := s.b.pool.Acquire(ctx)
	switch {
	case err == nil:
		return c, nil
	case s.b.ctx.Err() != nil:
		return nil, errShuttingDown
	case ctx.Err() != nil:
		return nil, errBusy
	}
	return nil, fmt.Errorf("%w: %w", errSetup, err)
}

// replay sends the transaction so far, MAIL and the accepted recipients, on
// a freshly borrowed session.
func (s *session) replay(c *pool.Conn) error {
	tx := s.tx
	opts, err := upstreamMailOptions(c, tx.from, tx.opts)
	if err != nil {
		return err
	}
	if err := c.Mail(tx.from, opts); err != nil {
		return err
	}
	for _, r := range tx.rcpts {
		if err := c.Rcpt(r.to, r.opts); err != nil {
			return err
		}
	}
	return nil
}

// discardUpstream closes the held session rather than reusing it, so that a
// retry starts on a fresh one.
func (s *session) discardUpstream() {
	if s.up != nil {
		s.up.Discard()
		s.up = nil
	}
}

func (s *session) logFailure(cmd string, err error, reply *smtp.SMTPError, tx *transaction) {
	s.b.log.Warn("upstream refused, client told", "client", s.client, "command", cmd,
		"from", tx.from, "rcpts", len(tx.rcpts), "transient_failures", tx.failures,
		"reply", reply.Code, "err", err)
}

// sleep waits d, or less if the backend's context ends; it reports whether
// the whole wait passed.
func (b *Backend) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-b.ctx.Done():
		return false
	}
}
