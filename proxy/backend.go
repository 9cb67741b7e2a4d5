// Package proxy is smtppool's go-smtp backend. It relays every transaction a
// client sends over an upstream session borrowed from a pool.Pool, and
// answers the client only with what the upstream answered.
//
// A transaction borrows an upstream session at MAIL and returns it when the
// transaction ends, so many client connections share few upstream sessions
// and a client that sends several messages may use several sessions. While
// every session is busy the client waits at MAIL (backpressure); the
// greeting never waits. Transient upstream failures are retried on a fresh
// session, replaying the transaction from memory, before the client hears of
// them.
package proxy

import (
	"context"
	"io"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"
	"golang.org/x/sync/semaphore"

	"github.com/smtppool/smtppool/pool"
)

// Config tunes the listener and the relaying of transactions. Every field
// has a default, used when the field is left at its zero value.
type Config struct {
	// Hostname is the name in the greeting and the EHLO reply; default
	// "localhost".
	Hostname string

	// MaxMessageBytes is the largest message accepted, in bytes, advertised
	// with SIZE; larger ones get 552 5.3.4; default 32 MiB.
	MaxMessageBytes int64

	// MaxBufferBytes bounds the memory of messages buffered at once, in
	// bytes; each message takes MaxMessageBytes of it while it is read,
	// relayed and retried; default 2 × MaxMessageBytes × the pool's
	// MaxConns.
	MaxBufferBytes int64

	// MaxRecipients is the most recipients per message; more get 452 4.5.3;
	// default 100.
	MaxRecipients int

	// AcquireTimeout is how long a transaction waits for a free upstream
	// session, or for buffer space, before it gets 451 4.4.5; default 2
	// minutes.
	AcquireTimeout time.Duration

	// RetryTimeout is how long, from its first transient failure, a
	// transaction is retried before the client gets the failure; default 2
	// minutes.
	RetryTimeout time.Duration

	// MaxAttempts, when above zero, also bounds the tries per transaction;
	// default 0, no bound but RetryTimeout.
	MaxAttempts int

	// RetryBackoff is the least pause before the second try, doubled before
	// each further one, plus up to half again at random; default 250
	// milliseconds.
	RetryBackoff time.Duration

	// RetryBackoffMax caps the pause between tries; default 4 seconds.
	RetryBackoffMax time.Duration

	// TransactionTimeout is the longest a client transaction may last once
	// it has an upstream session, until the reply to its message; after it,
	// the session is released and the client gets 451 4.4.2; default 15
	// minutes.
	TransactionTimeout time.Duration

	// ClientTimeout is how long a client may stay silent, or take to read a
	// reply, before it is disconnected; default 5 minutes.
	ClientTimeout time.Duration

	// Logger receives transaction events; default discards them.
	Logger *slog.Logger
}

func (c Config) withDefaults() Config {
	if c.Hostname == "" {
		c.Hostname = "localhost"
	}
	if c.MaxMessageBytes == 0 {
		c.MaxMessageBytes = 32 << 20
	}
	if c.MaxRecipients == 0 {
		c.MaxRecipients = 100
	}
	if c.AcquireTimeout == 0 {
		c.AcquireTimeout = 2 * time.Minute
	}
	if c.RetryTimeout == 0 {
		c.RetryTimeout = 2 * time.Minute
	}
	if c.RetryBackoff == 0 {
		c.RetryBackoff = 250 * time.Millisecond
	}
	if c.RetryBackoffMax == 0 {
		c.RetryBackoffMax = 4 * time.Second
	}
	if c.TransactionTimeout == 0 {
		c.TransactionTimeout = 15 * time.Minute
	}
	if c.ClientTimeout == 0 {
		c.ClientTimeout = 5 * time.Minute
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return c
}

// Backend turns client sessions into work for a pool. It implements
// smtp.Backend.
type Backend struct {
	pool    *pool.Pool
	cfg     Config
	log     *slog.Logger
	ctx     context.Context
	buffers *semaphore.Weighted // the MaxBufferBytes budget

	reservedBytes, reservedPeak atomic.Int64 // of the buffer budget, now and at most
}

// NewBackend returns a backend that relays through p. When ctx ends,
// transactions stop waiting for sessions or retries and get 421 4.3.2.
func NewBackend(ctx context.Context, p *pool.Pool, cfg Config) *Backend {
	cfg = cfg.withDefaults()
	if cfg.MaxBufferBytes == 0 {
		cfg.MaxBufferBytes = 2 * cfg.MaxMessageBytes * int64(p.Stat().MaxSessions)
	}
	return &Backend{pool: p, cfg: cfg, log: cfg.Logger, ctx: ctx,
		buffers: semaphore.NewWeighted(max(cfg.MaxBufferBytes, cfg.MaxMessageBytes))}
}

// NewServer returns an SMTP server, not yet listening, that relays through
// p; serve it on a Listener. It advertises SIZE, 8BITMIME, SMTPUTF8 and
// PIPELINING, and what go-smtp always does: ENHANCEDSTATUSCODES, CHUNKING
// (BDAT, whose message reaches Data like DATA's) and LIMITS.
func NewServer(ctx context.Context, p *pool.Pool, cfg Config) *smtp.Server {
	b := NewBackend(ctx, p, cfg)
	s := smtp.NewServer(b)
	s.Domain = b.cfg.Hostname
	s.MaxMessageBytes = b.cfg.MaxMessageBytes
	s.MaxRecipients = b.cfg.MaxRecipients
	s.EnableSMTPUTF8 = true
	s.ReadTimeout = b.cfg.ClientTimeout
	s.WriteTimeout = b.cfg.ClientTimeout
	s.ErrorLog = slog.NewLogLogger(b.log.Handler(), slog.LevelWarn)
	return s
}

// NewSession implements smtp.Backend. go-smtp calls it at the client's
// first EHLO or HELO, after the greeting was sent.
func (b *Backend) NewSession(c *smtp.Conn) (smtp.Session, error) {
	return &session{b: b, client: c.Conn().RemoteAddr().String(), conn: clientConnOf(c.Conn())}, nil
}
