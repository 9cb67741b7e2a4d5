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
			p.cfg.OnReply("set-up", smtpErr.Code)
		}
		p.log.Debug("upstream session set-up failed", "upstream", u.addr, "err", err, "duration", time.Since(start).String())
		return nil, p.signalError(err, p.established()+1)
	}
	s.id = p.stats.connsOpened.Add(1)
	s.upstream = u
	p.log.Debug("upstream session opened", "session", s.id, "upstream", u.addr, "tls", s.tls,
		"auth", p.cfg.Auth != nil, "duration", time.Since(start).String())
	return s, nil
}

func (p *Pool) handshake(ctx context.Context, u *upstream) (*session, error) {
	var s *session
	var err error
	switch p.cfg.TLS {
	case TLSOpportunistic:
		s, err = p.greetOpportunistic(ctx, u)
	case TLSStartTLS:
		s, err = p.greet(ctx, u, true)
	default:
		s, err = p.greet(ctx, u, false)
	}
	if err != nil {
		return nil, err
	}
	if err := p.authenticate(ctx, s); err != nil {
		s.close()
		return nil, err
	}
	s.client.CommandTimeout = p.cfg.CommandTimeout
	s.client.SubmissionTimeout = p.cfg.DataTimeout
	return s, nil
}

// plainTextMemory is how long, in opportunistic mode, the pool remembers
// that the upstream did not offer STARTTLS, and sets sessions up without
// trying. After that, the next session tries again.
var plainTextMemory = time.Minute

// greetOpportunistic starts sessions with STARTTLS unless the upstream was
// seen without it less than plainTextMemory ago. go-smtp cannot upgrade a
// client that has already read the EHLO reply, so finding out costs a
// second dial; until one session has been set up, new sessions are set up
// one at a time, so that a burst of them finds out once. When credentials
// would cross in clear text, STARTTLS is always tried and its absence is an
// error, whatever an earlier session saw.
func (p *Pool) greetOpportunistic(ctx context.Context, u *upstream) (*session, error) {
	if !p.tlsKnown.Load() {
		p.tlsProbe.Lock()
		if p.tlsKnown.Load() { // found out while this one waited
			p.tlsProbe.Unlock()
		} else {
			defer p.tlsProbe.Unlock()
		}
	}
	plainOK := p.cfg.Auth == nil || p.cfg.AllowInsecureAuth
	if plainOK && time.Now().UnixNano() < u.plainUntil.Load() {
		return p.greet(ctx, u, false)
	}
	s, err := p.greet(ctx, u, true)
	if errors.Is(err, ErrTLSUnavailable) {
		u.plainUntil.Store(time.Now().Add(plainTextMemory).UnixNano())
		if !plainOK {
			return nil, fmt.Errorf("%w, and credentials are never sent in clear text", err)
		}
		p.log.Warn("upstream does not offer STARTTLS; opportunistic mode continues in plain text", "upstream", u.addr)
		s, err = p.greet(ctx, u, false)
	}
	if err == nil {
		p.tlsKnown.Store(true)
	}
	return s, err
}

// greet dials and runs greeting, EHLO and, if asked, STARTTLS and EHLO again.
// The connection is closed when ctx ends before it returns.
func (p *Pool) greet(ctx context.Context, u *upstream, startTLS bool) (*session, error) {
	raw, err := p.cfg.Dial(ctx, "tcp", u.addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", u.addr, err)
	}
	tc := &trackedConn{Conn: raw}
	var conn net.Conn = tc
	if p.cfg.TLS == TLSImplicit {
		conn = tls.Client(tc, u.tls)
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()

	var c *smtp.Client
	if startTLS {
		c, err = smtp.NewClientStartTLS(conn, u.tls)
		if err != nil && strings.Contains(err.Error(), "doesn't support STARTTLS") {
			err = ErrTLSUnavailable
		}
	} else {
		c = smtp.NewClient(conn)
	}
	if err == nil {
		err = c.Hello(p.cfg.LocalName)
	}
	if err != nil {
		conn.Close()
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%w)", err, context.Cause(ctx))
		}
		return nil, fmt.Errorf("greet %s: %w", u.addr, err)
	}
	_, isTLS := c.TLSConnectionState()
	return &session{client: c, conn: tc, tls: isTLS}, nil
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
	stop := context.AfterFunc(ctx, func() { s.client.Close() })
	defer stop()
	if err := s.client.Auth(sc); err != nil {
		return fmt.Errorf("auth: %w", authRefused(p.cfg.Auth, sc, err))
	}
	p.stats.auths.Add(1)
	return nil
}
