// Package pool keeps a bounded set of long-lived, authenticated SMTP sessions
// to one upstream server and lends them out one mail transaction at a time.
//
// A session is dialled, greeted, upgraded with STARTTLS and authenticated
// once, then reused for many messages. At most Config.MaxConns sessions exist
// at any moment, counting those being dialled, so the upstream never sees
// more connections than that. Sessions are checked when they are acquired
// (NOOP after an idle spell), when they are released (a broken session is
// destroyed, an unfinished transaction is reset with RSET) and by a
// background loop that closes idle and expired sessions.
package pool

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/puddle/v2"
)

// ErrClosed is returned by Acquire once Close has been called.
var ErrClosed = errors.New("pool closed")

// Pool is a set of upstream SMTP sessions. It is safe for concurrent use.
type Pool struct {
	cfg     Config
	log     *slog.Logger
	p       *puddle.Pool[*session]
	stats   counters
	waiting atomic.Int32 // Acquire calls in progress

	// In opportunistic mode: noStartTLS records that the upstream did not
	// offer STARTTLS, tlsKnown that a session has been set up, which tells
	// whether it does; until then tlsProbe sets sessions up one at a time.
	noStartTLS atomic.Bool
	tlsKnown   atomic.Bool
	tlsProbe   sync.Mutex

	closeOnce sync.Once
	closed    chan struct{}
	done      chan struct{}
}

// New creates a pool for cfg. It opens no session yet: the first Acquire
// does. It starts the background health check, which Close stops.
func New(cfg Config) (*Pool, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	p := &Pool{
		cfg:    cfg,
		log:    cfg.Logger,
		closed: make(chan struct{}),
		done:   make(chan struct{}),
	}
	p.p, err = puddle.NewPool(&puddle.Config[*session]{
		Constructor: p.connect,
		Destructor:  func(s *session) { s.close() },
		MaxSize:     cfg.MaxConns,
	})
	if err != nil {
		return nil, err
	}
	go p.healthLoop()
	return p, nil
}

// Acquire returns a session ready for a new transaction, dialling one if
// none is idle and the cap allows, or waiting until one is released. It
// returns ctx's error when ctx ends first, the error of the dial or
// handshake when a new session could not be set up, and ErrClosed after
// Close. The caller must Release the Conn.
func (p *Pool) Acquire(ctx context.Context) (*Conn, error) {
	p.waiting.Add(1)
	defer p.waiting.Add(-1)
	for {
		res, err := p.p.Acquire(ctx)
		if err != nil {
			if errors.Is(err, puddle.ErrClosedPool) {
				return nil, ErrClosed
			}
			return nil, err
		}
		s := res.Value()
		// A session that has never been lent is exempt from the limits, so
		// that a tiny MaxConnLifetime cannot make Acquire dial forever.
		if s.lent {
			if reason := p.retireReason(res, false); reason != closeNone {
				p.destroy(res, reason)
				continue
			}
		}
		s.lent = true
		if res.IdleDuration() > p.cfg.PingAfterIdle {
			if err := s.client.Noop(); err != nil {
				p.log.Debug("upstream session failed NOOP", "session", s.id, "err", err)
				s.broken = true
				p.destroy(res, closeBroken)
				continue
			}
		}
		return &Conn{res: res, pool: p}, nil
	}
}

// Close stops the health check, closes idle sessions with QUIT, and waits
// until every acquired session has been released and closed.
func (p *Pool) Close() {
	p.closeOnce.Do(func() {
		close(p.closed)
		<-p.done
		p.p.Close()
	})
}

// closeReason says why a session was closed.
type closeReason int

const (
	closeNone closeReason = iota
	closeBroken
	closeLifetime
	closeIdle
	closeMessages
	closeDiscarded
	numCloseReasons
)

var closeReasonNames = [numCloseReasons]string{"", "broken", "lifetime", "idle", "messages", "discarded"}

func (r closeReason) String() string { return closeReasonNames[r] }

// retireReason says whether a session has reached a limit and must not be
// used again. The idle limit applies to sessions sitting in the pool.
func (p *Pool) retireReason(res *puddle.Resource[*session], idle bool) closeReason {
	s := res.Value()
	switch {
	case s.broken:
		return closeBroken
	case time.Since(res.CreationTime()) >= p.cfg.MaxConnLifetime:
		return closeLifetime
	case s.messages >= p.cfg.MaxMessagesPerConn:
		return closeMessages
	case idle && res.IdleDuration() >= p.cfg.MaxConnIdleTime:
		return closeIdle
	}
	return closeNone
}

// destroy closes an acquired session. Puddle frees its slot only after the
// destructor has closed the connection, so the cap holds while it closes.
func (p *Pool) destroy(res *puddle.Resource[*session], reason closeReason) {
	s := res.Value()
	p.stats.closed[reason].Add(1)
	p.log.Debug("upstream session closing", "session", s.id, "reason", reason.String(),
		"messages", s.messages, "age", time.Since(res.CreationTime()).Round(time.Millisecond))
	res.Destroy()
}

func (p *Pool) healthLoop() {
	defer close(p.done)
	t := time.NewTicker(p.cfg.HealthCheckPeriod)
	defer t.Stop()
	for {
		select {
		case <-p.closed:
			return
		case <-t.C:
			p.checkIdle()
		}
	}
}

// checkIdle closes idle sessions that have expired or idled too long.
func (p *Pool) checkIdle() {
	for _, res := range p.p.AcquireAllIdle() {
		if reason := p.retireReason(res, true); reason != closeNone {
			p.destroy(res, reason)
			continue
		}
		res.ReleaseUnused()
	}
}
