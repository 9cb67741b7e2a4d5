package pool

import (
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/jackc/puddle/v2"
)

// Conn is a session lent out by Acquire for one mail transaction. Its
// methods send one command each and return the upstream's rejection as an
// error that wraps *smtp.SMTPError; any other error is a failure of the
// connection. A Conn is not safe for concurrent use.
type Conn struct {
	res  *puddle.Resource[*session]
	pool *Pool
}

// ID identifies the session in logs; it counts sessions from 1.
func (c *Conn) ID() uint64 { return c.res.Value().id }

// TLS reports whether the session is encrypted.
func (c *Conn) TLS() bool { return c.res.Value().tls }

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

// Mail starts a transaction with MAIL FROM.
func (c *Conn) Mail(from string, opts *smtp.MailOptions) error {
	s := c.res.Value()
	s.dirty = true
	return s.fail("MAIL", s.client.Mail(from, opts))
}

// Rcpt adds a recipient with RCPT TO.
func (c *Conn) Rcpt(to string, opts *smtp.RcptOptions) error {
	s := c.res.Value()
	return s.fail("RCPT", s.client.Rcpt(to, opts))
}

// Data sends DATA, then msg, then the final dot, and waits for the
// upstream's verdict on the message. msg reads the message as received,
// lines ending in CRLF, without dot-stuffing. When the connection fails
// after the final dot was written and before the reply, the error wraps
// ErrNoReply.
func (c *Conn) Data(msg io.Reader) error {
	s := c.res.Value()
	w, err := s.client.Data()
	if err != nil {
		return s.fail("DATA", err)
	}
	// go-smtp bounds the wait for each reply, not the writing of the
	// message: an upstream that stops reading would block it for ever.
	s.conn.SetWriteDeadline(time.Now().Add(c.pool.cfg.DataTimeout))
	s.conn.writeFailed = false
	if _, err := io.Copy(w, msg); err != nil {
		s.broken = true
		return fmt.Errorf("upstream DATA: write message: %w", err)
	}
	err = w.Close()
	var smtpErr *smtp.SMTPError
	if err == nil || errors.As(err, &smtpErr) {
		s.dirty = false
		s.messages++
		c.pool.stats.messages.Add(1)
		return s.fail("end of DATA", err)
	}
	s.broken = true
	if !s.conn.writeFailed {
		return fmt.Errorf("upstream end of DATA: %w: %w", ErrNoReply, err)
	}
	return fmt.Errorf("upstream end of DATA: %w", err)
}

// reset aborts the unfinished transaction with RSET. go-smtp's Client.Reset
// makes the client send EHLO again before its next command, and a failure
// there would be swallowed by Extension, so EHLO is sent here, where a
// failure marks the session broken.
func (s *session) reset(localName string) error {
	if err := s.client.Reset(); err != nil {
		return err
	}
	return s.client.Hello(localName)
}

// fail marks the session broken after an I/O error or a 421 and wraps err
// with the command's name.
func (s *session) fail(cmd string, err error) error {
	if err == nil {
		return nil
	}
	var smtpErr *smtp.SMTPError
	if !errors.As(err, &smtpErr) || smtpErr.Code == 421 {
		s.broken = true
	}
	return fmt.Errorf("upstream %s: %w", cmd, err)
}

// Release returns the session to the pool: after RSET when a transaction
// was left unfinished, and not at all when it is broken, failed RSET or has
// reached its lifetime or message limit. Release must be called once, and
// the Conn not used after.
func (c *Conn) Release() {
	s := c.res.Value()
	if s.dirty && !s.broken {
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
	c.res.Release()
}

// Discard closes the session instead of returning it to the pool, with QUIT
// unless it is broken. Use it when the session failed a transaction in a way
// that a fresh session might not.
func (c *Conn) Discard() {
	reason := closeDiscarded
	if c.res.Value().broken {
		reason = closeBroken
	}
	c.pool.destroy(c.res, reason)
}
