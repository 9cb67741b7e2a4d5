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

	"github.com/smtppool/smtppool/pool/internal/smtpclient"
)

// Conn is a session lent out by Acquire for one mail transaction. Its
// methods send one command each (Envelope and Data a few, pipelined when
// the upstream allows) and return the upstream's rejection as an
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

// checkArgument refuses CR, LF and NUL in a command's argument, before
// anything is sent.
func checkArgument(cmd, arg string) error {
	if strings.ContainsAny(arg, "\r\n\x00") {
		return fmt.Errorf("upstream %s: %w", cmd, ErrInvalidArgument)
	}
	return nil
}

// Pipelining reports whether the upstream offers PIPELINING (RFC 2920),
// with which Envelope costs one round trip.
func (c *Conn) Pipelining() bool {
	ok, _ := c.Extension("PIPELINING")
	return ok
}

// Mail starts a transaction with MAIL FROM.
func (c *Conn) Mail(ctx context.Context, from string, opts *smtp.MailOptions) error {
	if err := checkArgument(stageMail, from); err != nil {
		return err
	}
	s := c.res.Value()
	line, err := s.client.MailLine(from, opts)
	if err != nil {
		return s.fail(ctx, stageMail, err)
	}
	s.dirty = true
	defer s.bind(ctx)()
	_, _, err = s.client.Cmd(250, line)
	var smtpErr *smtp.SMTPError
	if errors.As(err, &smtpErr) {
		s.dirty = false // a refused MAIL starts no transaction: no RSET needed
	}
	return c.done(ctx, stageMail, err, 250, from)
}

// Rcpt adds a recipient with RCPT TO.
func (c *Conn) Rcpt(ctx context.Context, to string, opts *smtp.RcptOptions) error {
	if err := checkArgument(stageRcpt, to); err != nil {
		return err
	}
	s := c.res.Value()
	line, err := s.client.RcptLine(to, opts)
	if err != nil {
		return s.fail(ctx, stageRcpt, err)
	}
	defer s.bind(ctx)()
	code, _, err := s.client.Cmd(25, line)
	return c.done(ctx, stageRcpt, err, code, to)
}

// Recipient is one RCPT TO of an envelope.
type Recipient struct {
	Addr string
	Opts *smtp.RcptOptions
}

// Envelope starts a transaction with MAIL FROM and adds rcpts with RCPT
// TO. When the upstream offers PIPELINING, every command goes out in one
// write and the replies are read after it: one round trip. Otherwise the
// commands go one at a time, and none follows a refused MAIL.
//
// err is MAIL's refusal, or a failure of the connection; the
// recipients' replies are then not known. Otherwise rcptErrs holds each
// recipient's refusal, or nil where it was accepted. Refusals are errors
// as Rcpt returns them.
func (c *Conn) Envelope(ctx context.Context, from string, opts *smtp.MailOptions, rcpts []Recipient) (rcptErrs []error, err error) {
	if err := checkArgument(stageMail, from); err != nil {
		return nil, err
	}
	s := c.res.Value()
	cmds := make([]smtpclient.Command, 0, 1+len(rcpts))
	line, err := s.client.MailLine(from, opts)
	if err != nil {
		return nil, s.fail(ctx, stageMail, err)
	}
	cmds = append(cmds, smtpclient.Command{Line: line, Expect: 250})
	for _, r := range rcpts {
		if err := checkArgument(stageRcpt, r.Addr); err != nil {
			return nil, err
		}
		line, err := s.client.RcptLine(r.Addr, r.Opts)
		if err != nil {
			return nil, s.fail(ctx, stageRcpt, err)
		}
		cmds = append(cmds, smtpclient.Command{Line: line, Expect: 25})
	}
	if !c.Pipelining() {
		if err := c.Mail(ctx, from, opts); err != nil {
			return nil, err
		}
		rcptErrs = make([]error, len(rcpts))
		for i, r := range rcpts {
			rcptErrs[i] = c.Rcpt(ctx, r.Addr, r.Opts)
			if rcptErrs[i] != nil && c.res.Value().broken {
				return nil, rcptErrs[i]
			}
		}
		return rcptErrs, nil
	}
	s.dirty = true
	defer s.bind(ctx)()
	replies, err := s.client.Pipeline(cmds)
	if err != nil {
		s.broken = true // the replies after the last one read are unknown
	}
	if len(replies) > 0 && replies[0].Err != nil {
		// A refused MAIL makes the recipients' replies meaningless (503,
		// typically): MAIL's is the one that counts. With every reply
		// read, no transaction was started: no RSET needed.
		s.dirty = err != nil
		return nil, c.done(ctx, stageMail, replies[0].Err, 0, from)
	}
	if err != nil {
		if len(replies) == 0 {
			return nil, c.done(ctx, stageMail, err, 0)
		}
		return nil, c.done(ctx, stageRcpt, err, 0)
	}
	c.done(ctx, stageMail, nil, 250)
	rcptErrs = make([]error, len(rcpts))
	for i, r := range replies[1:] {
		rcptErrs[i] = c.done(ctx, stageRcpt, r.Err, r.Code, rcpts[i].Addr)
	}
	if s.broken { // a 421 to a recipient: the session is over
		for _, e := range rcptErrs {
			if e != nil && isReplyCode(e, 421) {
				return nil, e
			}
		}
	}
	return rcptErrs, nil
}

// isReplyCode reports whether err carries an upstream reply with code.
func isReplyCode(err error, code int) bool {
	var smtpErr *smtp.SMTPError
	return errors.As(err, &smtpErr) && smtpErr.Code == code
}

// Data sends the message and waits for the upstream's verdict on it. It
// returns the text of the upstream's 2xx reply (often with its queue id)
// when it accepted the message. msg reads the message as received, lines
// ending in CRLF, without dot-stuffing; a bare LF is sent as CRLF.
//
// When the upstream offers CHUNKING (RFC 3030) the message goes as BDAT,
// one write and one reply for a message of up to 64 KiB; otherwise as
// DATA, the message after the 354, then the final dot. When the
// connection fails after the whole message was written and before the
// reply, or the reply has no code, or its code is neither acceptance nor
// refusal (a 1xx or 3xx), the error wraps ErrNoReply. A reply that breaks
// the protocol but has such a code (a line over 2,000 bytes, "250ok")
// counts by its code, and the session is closed when released.
func (c *Conn) Data(ctx context.Context, msg io.Reader) (reply string, err error) {
	s := c.res.Value()
	defer s.bind(ctx)()
	var sent bool
	chunked, _ := c.Extension("CHUNKING")
	if chunked {
		reply, sent, err = s.client.BDAT(msg, c.Pipelining())
	} else {
		if err := c.done(ctx, stageData, s.client.StartData(), 354); err != nil {
			return "", err
		}
		reply, sent, err = s.client.SendData(msg)
	}
	var smtpErr *smtp.SMTPError
	switch {
	case err == nil:
	case errors.As(err, &smtpErr) && sent && smtpErr.Code/100 != 4 && smtpErr.Code/100 != 5:
		// A 1xx or 3xx (or a 2xx where a chunk wanted 250) to a message
		// written whole is neither acceptance nor refusal: the upstream
		// broke the protocol, and may have kept the message, as when its
		// reply is lost. The session is out of step.
		c.pool.cfg.OnReply(stageEndOfData, smtpErr.Code)
		s.broken = true
		return "", s.fail(ctx, stageEndOfData,
			fmt.Errorf("%w: a reply with code %d is neither acceptance nor refusal", ErrNoReply, smtpErr.Code))
	case errors.As(err, &smtpErr):
		if !sent { // a chunk was refused before the last was written
			return "", c.done(ctx, stageEndOfData, err, 0)
		}
		err = fmt.Errorf("%w: %w", ErrAfterMessage, err)
	default:
		s.broken = true
		if sent {
			err = fmt.Errorf("%w: %w", ErrNoReply, err)
		}
		return "", c.done(ctx, stageEndOfData, err, 0)
	}
	// After a refused BDAT the upstream's state is indeterminate and
	// wants RSET (RFC 3030, section 2); after DATA's final reply, any
	// reply, the transaction is over (RFC 5321, section 4.1.1.4).
	s.dirty = chunked && err != nil
	s.messages++
	c.pool.stats.messages.Add(1)
	if err == nil {
		// The upstream forgets the session's errors and junk commands
		// when it accepts a message.
		s.client.Tally = smtpclient.Tally{}
		return reply, c.done(ctx, stageEndOfData, nil, 250)
	}
	return "", c.done(ctx, stageEndOfData, err, 0)
}

// done reports the upstream's reply to a command to Config.OnReply (ok,
// the code it got, when err is nil) and returns err as fail does, wrapped
// with the limit it signals, if any. echoes are the command's arguments,
// which a limit is never read from.
func (c *Conn) done(ctx context.Context, stage string, err error, ok int, echoes ...string) error {
	var smtpErr *smtp.SMTPError
	switch {
	case err == nil:
		c.pool.cfg.OnReply(stage, ok)
	case errors.As(err, &smtpErr):
		c.pool.cfg.OnReply(stage, smtpErr.Code)
		err = c.pool.signalError(err, c.pool.connected(), stage, echoes...)
	}
	return c.res.Value().fail(ctx, stage, err)
}

// Release returns the session to the pool. A session left in the middle of
// a transaction is reset with RSET (and no EHLO, after which some
// upstreams forget the AUTH), and closed if that fails. A broken session,
// one at its lifetime or message limit, and one that has made as many
// errors or junk commands since the upstream last accepted a message from
// it as the pool allows (see maxErrorReplies) is closed instead, without
// RSET. Release may be
// called more than once; the Conn must not be used after.
//
// The session's place under the effective cap is given back once the
// session is idle again or, when it is closed, once its connection is:
// an upstream that counts concurrent connections counts a closing one too.
func (c *Conn) Release() {
	if c.released {
		return
	}
	c.released = true
	s := c.res.Value()
	reason := c.pool.retireReason(c.res)
	if s.dirty && !s.broken && reason == closeNone {
		// (A session to be closed is not reset: QUIT ends the
		// transaction too.)
		if err := s.client.Reset(); err != nil {
			c.pool.log.Debug("upstream session failed RSET", "session", s.id, "err", err)
			s.broken = true
		}
		s.dirty = false
		reason = c.pool.retireReason(c.res)
	}
	if reason != closeNone {
		c.destroy(reason)
		return
	}
	if c.pool.overCap() {
		c.destroy(closeCap)
		return
	}
	c.res.Release()
	c.pool.gate.release()
	c.pool.checkIdleAt(time.Now().Add(c.pool.cfg.MaxConnIdleTime))
}

// Discard closes the session instead of returning it to the pool, with QUIT
// unless it is broken. Use it when the session failed a transaction in a way
// that a fresh session might not. Discard after Release, or twice, does
// nothing. Its place under the effective cap is given back once its
// connection is closed.
func (c *Conn) Discard() {
	if c.released {
		return
	}
	c.released = true
	reason := closeDiscarded
	if c.res.Value().broken {
		reason = closeBroken
	}
	c.destroy(reason)
}

// destroy closes the lent session for reason, and gives its place under
// the effective cap back once the connection is closed.
func (c *Conn) destroy(reason closeReason) {
	c.res.Value().afterClose = c.pool.gate.release
	c.pool.destroy(c.res, reason)
}
