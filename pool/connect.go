package pool

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/pool/internal/smtpclient"
)

// setUp dials the upstream entry u and takes a new session through
// greeting, EHLO, STARTTLS and AUTH within ConnectTimeout.
func (p *Pool) setUp(ctx context.Context, u *upstream) (*session, error) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.ConnectTimeout)
	defer cancel()
	start := time.Now()
	s, err := p.handshake(ctx, u)
	if errors.Is(err, ErrTokenNotAccepted) {
		// The refused token was dropped: one more session, with a fresh
		// token, before this counts as a failure.
		p.log.Info("upstream refused the OAuth2 token; trying once more with a fresh token", "err", err)
		s, err = p.handshake(ctx, u)
	}
	if err != nil {
		p.stats.connectFailures.Add(1)
		var smtpErr *smtp.SMTPError
		if errors.As(err, &smtpErr) {
			p.cfg.OnReply(stageSetUp, smtpErr.Code)
		}
		p.log.Debug("upstream session set-up failed", "upstream", u.addr, "err", err, "duration", time.Since(start).String())
		return nil, p.signalError(err, p.established()+1, stageSetUp)
	}
	s.id = p.stats.connsOpened.Add(1)
	s.upstream = u
	p.grow()
	p.log.Debug("upstream session opened", "session", s.id, "upstream", u.addr, "tls", s.tls,
		"auth", p.cfg.Auth != nil, "duration", time.Since(start).String())
	return s, nil
}

func (p *Pool) handshake(ctx context.Context, u *upstream) (*session, error) {
	s, err := p.greet(ctx, u)
	if err != nil {
		return nil, err
	}
	if err := p.authenticate(ctx, s); err != nil {
		s.close()
		return nil, err
	}
	return s, nil
}

// plainTextMemory is how long, in opportunistic mode, the pool remembers
// that an upstream did not offer STARTTLS, so that it warns about it once
// in that time rather than for every session.
var plainTextMemory = time.Minute

// greet dials and runs greeting, EHLO and, as the TLS mode asks, STARTTLS
// and EHLO again. STARTTLS upgrades the connection in place, after the
// EHLO reply told whether it is offered: in opportunistic mode an
// upstream without it costs no second dial. The connection is closed when
// ctx ends before greet returns.
func (p *Pool) greet(ctx context.Context, u *upstream) (*session, error) {
	raw, err := p.cfg.Dial(ctx, "tcp", u.addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", u.addr, err)
	}
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	defer stop()
	s, err := p.hello(u, raw)
	if err != nil {
		raw.Close()
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%w)", err, context.Cause(ctx))
		}
		return nil, fmt.Errorf("greet %s: %w", u.addr, err)
	}
	return s, nil
}

// hello runs greeting, EHLO and STARTTLS on raw.
func (p *Pool) hello(u *upstream, raw net.Conn) (*session, error) {
	conn := raw
	if p.cfg.TLS == TLSImplicit {
		conn = tls.Client(raw, u.tls)
	}
	c := smtpclient.New(conn)
	c.CommandTimeout, c.DataTimeout = p.cfg.CommandTimeout, p.cfg.DataTimeout
	if err := c.Greet(); err != nil {
		return nil, err
	}
	if err := c.Hello(p.cfg.LocalName); err != nil {
		return nil, err
	}
	if p.cfg.TLS == TLSStartTLS || p.cfg.TLS == TLSOpportunistic {
		offered, _ := c.Extension("STARTTLS")
		plainOK := p.cfg.TLS == TLSOpportunistic && (p.cfg.Auth == nil || p.cfg.AllowInsecureAuth)
		switch {
		case offered:
			if err := c.StartTLS(u.tls); err != nil {
				return nil, err
			}
			if err := c.Hello(p.cfg.LocalName); err != nil {
				return nil, err
			}
		case p.cfg.TLS == TLSOpportunistic && !plainOK:
			return nil, fmt.Errorf("%w, and credentials are never sent in clear text", ErrTLSUnavailable)
		case !plainOK:
			return nil, ErrTLSUnavailable
		default:
			p.warnPlainText(u)
		}
	}
	return &session{client: c, conn: raw, tls: c.TLS()}, nil
}

// warnPlainText warns, at most once per plainTextMemory, that the
// upstream offers no STARTTLS and opportunistic mode goes on in plain text.
func (p *Pool) warnPlainText(u *upstream) {
	now := time.Now().UnixNano()
	until := u.plainUntil.Load()
	if now < until || !u.plainUntil.CompareAndSwap(until, time.Now().Add(plainTextMemory).UnixNano()) {
		return
	}
	p.log.Warn("upstream does not offer STARTTLS; opportunistic mode continues in plain text", "upstream", u.addr)
}

func (p *Pool) authenticate(ctx context.Context, s *session) error {
	if p.cfg.Auth == nil {
		return nil
	}
	if !s.tls && !p.cfg.AllowInsecureAuth {
		return fmt.Errorf("auth: %w, and credentials are never sent in clear text", ErrTLSUnavailable)
	}
	ok, mechs := s.client.Extension("AUTH")
	if !ok {
		return fmt.Errorf("auth: %w: no AUTH in EHLO reply", ErrAuthUnavailable)
	}
	sc, err := p.cfg.Auth.SASLClient(ctx, strings.Fields(mechs))
	if err != nil {
		return fmt.Errorf("auth: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { s.conn.Close() })
	defer stop()
	if err := s.client.Auth(sc); err != nil {
		return fmt.Errorf("auth: %w", authRefused(p.cfg.Auth, sc, err))
	}
	p.stats.auths.Add(1)
	return nil
}
