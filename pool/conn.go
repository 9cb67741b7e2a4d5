package pool

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/jackc/puddle/v2"
)

// Conn is a session lent out by Acquire for one mail transaction. Its
// methods send one command each and return the upstream's rejection as an
// error that wraps *smtp.SMTPError; an error wrapping ErrInvalidArgument is
// refused locally; any other error is a failure of the connection. Each
// method gives up when its context ends, and the session is then broken. A
// Conn is not safe for concurrent use.
type Conn struct {
	res      *puddle.Resource[*session]
	pool     *Pool
	released bool
}

// ID identifies the session in logs; it counts sessions from 1.
func (c *Conn) ID() uint64 { return c.res.Value().id }

// Upstream returns the entry of Config.Addr the session is connected to.
func (c *Conn) Upstream() string { return c.res.Value().upstream.addr }

// TLS reports whether the session is encrypted.
func (c *Conn) TLS() bool { return c.res.Value().tls }

// Reused reports whether the session carried a transaction before this
// one, as opposed to being freshly set up for it.
func (c *Conn) Reused() bool { return c.res.Value().transactions > 1 }

// Extension reports whether the upstream advertised ext in EHLO, and its
// parameter.
func (c *Conn) Extension(ext string) (bool, string) {
	return c.res.Value().client.Extension(ext)
}

// MaxMessageSize returns the upstream's SIZE limit; ok is false when it
// advertised none.
func (c *Conn) MaxMessageSize() (size int64, ok bool) {
	has, param := c.Extension("SIZE")
	if !has {
		return 0, false
	}
	n, err := strconv.ParseInt(param, 10, 64)
	if err != nil || n <= 0 {
		return 0, false
	}
	return n, true
}

// checkArgument refuses what go-smtp's client would refuse locally (CR and
// LF) and NUL, before anything is sent.
func checkArgument(cmd, arg string) error {
	if strings.ContainsAny(arg, "\r\n\x00") {
		return fmt.Errorf("upstream %s: %w", cmd, ErrInvalidArgument)
	}
	return nil
}

// Mail starts a transaction with MAIL FROM.
func (c *Conn) Mail(ctx context.Context, from string, opts *smtp.MailOptions) error {
	if err := checkArgument("MAIL", from); err != nil {
		return err
	}
	s := c.res.Value()
	s.dirty = true
	defer s.bind(ctx)()
	return c.done(ctx, "MAIL", s.client.Mail(from, opts), 250)
}

// Rcpt adds a recipient with RCPT TO.
func (c *Conn) Rcpt(ctx context.Context, to string, opts *smtp.RcptOptions) error {
	if err := checkArgument("RCPT", to); err != nil {
		return err
	}
	s := c.res.Value()
	defer s.bind(ctx)()
	return c.done(ctx, "RCPT", s.client.Rcpt(to, opts), 250)
}

// Data sends DATA, then msg, then the final dot, and waits for the
// upstream's verdict on the message. It returns the text of the upstream's
// 2xx reply (often with its queue id) when it accepted the message. msg
// reads the message as received, lines ending in CRLF, without
// dot-stuffing. When the connection fails after the final dot was written
// and before the reply, the error wraps ErrNoReply.
func (c *Conn) Data(ctx context.Context, msg io.Reader) (reply string, err error) {
	s := c.res.Value()
	defer s.bind(ctx)()
	w, err := s.client.Data()
	if err := c.done(ctx, "DATA", err, 354); err != nil {
		return "", err
	}
	// go-smtp bounds the wait for each reply, not the writing of the
	// message: an upstream that stops reading would block it for ever.
	s.conn.SetWriteDeadline(time.Now().Add(c.pool.cfg.DataTimeout))
	s.conn.writeFailed = false
	if _, err := io.Copy(w, msg); err != nil {
		s.broken = true
		return "", s.fail(ctx, "DATA", fmt.Errorf("write message: %w", err))
	}
	resp, err := w.CloseWithResponse()
	var smtpErr *smtp.SMTPError
	switch {
	case err == nil:
		reply = resp.StatusText
	case errors.As(err, &smtpErr) && smtpErr.Code/100 == 2:
		// go-smtp expects exactly 250; any 2xx accepts the message, and
		// sending it again would deliver it twice.
		c.pool.cfg.OnReply("end of DATA", smtpErr.Code)
		reply, err = smtpErr.Message, nil
	case errors.As(err, &smtpErr):
	default:
		s.broken = true
		if !s.conn.writeFailed {
			err = fmt.Errorf("%w: %w", ErrNoReply, err)
		}
		return "", c.done(ctx, "end of DATA", err, 0)
	}
	s.dirty = false
	s.messages++
	c.pool.stats.messages.Add(1)
	if err == nil {
		return reply, c.done(ctx, "end of DATA", nil, 250)
	}
	return "", c.done(ctx, "end of DATA", err, 0)
}

// done reports the upstream's reply to a command to Config.OnReply (ok,
// the code it expected, when err is nil) and returns err as fail does.
func (c *Conn) done(ctx context.Context, stage string, err error, ok int) error {
	var smtpErr *smtp.SMTPError
	switch {
	case err == nil:
		c.pool.cfg.OnReply(stage, ok)
	case errors.As(err, &smtpErr):
		c.pool.cfg.OnReply(stage, smtpErr.Code)
		err = c.pool.signalError(err, c.pool.established())
	}
	return c.res.Value().fail(ctx, stage, err)
}

// Release returns the session to the pool. A session left in the middle of
// a transaction is reset with RSET when the pool has no credentials, and
// closed otherwise: go-smtp's client follows RSET with EHLO, after which
// some upstreams forget the AUTH. A broken session, or one at its lifetime
// or message limit, is closed too. Release may be called more than once;
// the Conn must not be used after.
func (c *Conn) Release() {
	if c.released {
		return
	}
	c.released = true
	defer c.pool.gate.release()
	s := c.res.Value()
	if s.dirty && !s.broken {
		if c.pool.cfg.Auth != nil {
			c.pool.destroy(c.res, closeUnfinished)
			return
		}
		if err := s.reset(c.pool.cfg.LocalName); err != nil {
			c.pool.log.Debug("upstream session failed RSET", "session", s.id, "err", err)
			s.broken = true
		}
		s.dirty = false
	}
	if reason := c.pool.retireReason(c.res, false); reason != closeNone {
		c.pool.destroy(c.res, reason)
		return
	}
	if c.pool.overCap() {
		c.pool.destroy(c.res, closeCap)
		return
	}
	c.res.Release()
}

// Discard closes the session instead of returning it to the pool, with QUIT
// unless it is broken. Use it when the session failed a transaction in a way
// that a fresh session might not. Discard after Release, or twice, does
// nothing.
func (c *Conn) Discard() {
	if c.released {
		return
	}
	c.released = true
	defer c.pool.gate.release()
	reason := closeDiscarded
	if c.res.Value().broken {
		reason = closeBroken
	}
	c.pool.destroy(c.res, reason)
}
