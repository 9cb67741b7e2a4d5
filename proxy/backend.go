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
	// bytes; each transaction takes MaxMessageBytes of it from MAIL, before
	// it borrows an upstream session, until its message is relayed (retries
	// included) or it ends; default DefaultMaxBufferBytes.
	MaxBufferBytes int64

	// MaxRecipients is the most recipients per message; more get 452 4.5.3;
	// default 100.
	MaxRecipients int

	// AcquireTimeout is how long a transaction waits for a free upstream
	// session before it gets 451 4.4.5 (at MAIL, for buffer space and a
	// session together); default 3 minutes: with RetryTimeout, within the
	// 5 minutes RFC 5321 gives a client for the reply to MAIL.
	AcquireTimeout time.Duration

	// RetryTimeout is how long, from its first transient failure, a
	// command of a transaction is retried before the client gets the
	// failure; default 2 minutes.
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

	// TransactionTimeout is the longest a client transaction may last
	// once it holds an upstream session, so that a client cannot keep the
	// session while the proxy waits for it, its message included (a DATA
	// body, BDAT chunks); whatever the transaction waits for then (the
	// client, a retry's pause, a fresh session) ends, the session is
	// released, nothing is relayed, and the client gets 451 4.4.2 (in a
	// message, once it ends it). A command already sent upstream is not
	// cut short (that could leave a delivered message unacknowledged): the
	// pool's command and data timeouts bound it. Default 15 minutes.
	TransactionTimeout time.Duration

	// ClientTimeout is how long a client may stay silent, or take to read a
	// reply, before it is disconnected; default 5 minutes.
	ClientTimeout time.Duration

	// Access says what a client must do before it may send (AUTH,
	// STARTTLS), and whether the log may carry envelope addresses; default
	// nothing, and only at debug.
	Access AccessConfig

	// Logger receives transaction events; default discards them.
	Logger *slog.Logger

	// Observer receives events for metrics; default none.
	Observer Observer
}

// Observer receives the proxy's events, for metrics. Its methods must be
// quick and safe for concurrent use.
type Observer interface {
	// AcquireWaited reports the time a transaction waited for an upstream
	// session it then got (at MAIL, from when it began to wait for buffer
	// space).
	AcquireWaited(d time.Duration)
	// AcquireTimedOut reports a transaction that gave up waiting for buffer
	// space or an upstream session after the acquire timeout.
	AcquireTimedOut()
	// Retried reports a transient failure that is about to be retried,
	// with its kind: "connect", "connection", "no_reply", "reply_421",
	// "reply_4xx", "auth_lost" or "other".
	Retried(reason string)
	// TransactionEnded reports a transaction's end: result "delivered",
	// "rejected" (a 5xx passed on), "failed" (a 4xx the client got) or
	// "abandoned" (the client ended it before an outcome); upstream is the
	// entry of the pool's Addr that served it last ("" if none); d is the
	// time from MAIL, size the message's size in bytes (0 if none was read).
	TransactionEnded(result, upstream string, d time.Duration, size int)
}

// noObserver discards events.
type noObserver struct{}

func (noObserver) AcquireWaited(time.Duration)                         {}
func (noObserver) AcquireTimedOut()                                    {}
func (noObserver) Retried(string)                                      {}
func (noObserver) TransactionEnded(string, string, time.Duration, int) {}

// DefaultConfig returns the defaults that NewServer applies to the fields of
// a Config left at their zero value. MaxBufferBytes is left at zero: its
// default depends on the pool (see DefaultMaxBufferBytes).
func DefaultConfig() Config {
	return Config{
		Hostname:           "localhost",
		MaxMessageBytes:    32 << 20,
		MaxRecipients:      100,
		AcquireTimeout:     3 * time.Minute,
		RetryTimeout:       2 * time.Minute,
		RetryBackoff:       250 * time.Millisecond,
		RetryBackoffMax:    4 * time.Second,
		TransactionTimeout: 15 * time.Minute,
		ClientTimeout:      5 * time.Minute,
	}
}

// DefaultMaxBufferBytes is the default of Config.MaxBufferBytes, in bytes,
// for messages of up to maxMessageBytes relayed through a pool of maxConns
// sessions: two messages for each session.
func DefaultMaxBufferBytes(maxMessageBytes int64, maxConns int32) int64 {
	return 2 * maxMessageBytes * int64(maxConns)
}

// withDefaults returns a copy of c with every unset field at its default;
// maxConns is the pool's cap, for MaxBufferBytes.
func (c Config) withDefaults(maxConns int32) Config {
	d := DefaultConfig()
	setDefault(&c.Hostname, d.Hostname)
	setDefault(&c.MaxMessageBytes, d.MaxMessageBytes)
	setDefault(&c.MaxBufferBytes, DefaultMaxBufferBytes(c.MaxMessageBytes, maxConns))
	setDefault(&c.MaxRecipients, d.MaxRecipients)
	setDefault(&c.AcquireTimeout, d.AcquireTimeout)
	setDefault(&c.RetryTimeout, d.RetryTimeout)
	setDefault(&c.RetryBackoff, d.RetryBackoff)
	setDefault(&c.RetryBackoffMax, d.RetryBackoffMax)
	setDefault(&c.TransactionTimeout, d.TransactionTimeout)
	setDefault(&c.ClientTimeout, d.ClientTimeout)
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Observer == nil {
		c.Observer = noObserver{}
	}
	return c
}

func setDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}

// backend turns client sessions into work for a pool. It implements
// smtp.Backend.
type backend struct {
	pool    *pool.Pool
	cfg     Config
	log     *slog.Logger
	ctx     context.Context
	buffers *semaphore.Weighted // the MaxBufferBytes budget
	chunks  chunkCounter        // reads the declared size of BDAT chunks

	reservedBytes, reservedPeak atomic.Int64 // of the buffer budget, now and at most

	// heldPastTimeout, if set (by tests), is told, whenever a transaction
	// gives its upstream session back after its timeout, how long past the
	// timeout the session waited for the client.
	heldPastTimeout atomic.Pointer[func(time.Duration)]
}

// newBackend returns a backend that relays through p. When ctx ends,
// transactions stop waiting for sessions or retries and get 421 4.3.2.
func newBackend(ctx context.Context, p *pool.Pool, cfg Config) *backend {
	cfg = cfg.withDefaults(p.Stat().MaxConns)
	return &backend{pool: p, cfg: cfg, log: cfg.Logger, ctx: ctx,
		buffers: semaphore.NewWeighted(max(cfg.MaxBufferBytes, cfg.MaxMessageBytes)), chunks: newChunkCounter()}
}

// NewServer returns an SMTP server, not yet listening, that relays through
// p; serve it on a Listener. It advertises SIZE, 8BITMIME, SMTPUTF8 and
// PIPELINING, and what go-smtp always does: ENHANCEDSTATUSCODES, CHUNKING
// (BDAT, whose message reaches Data like DATA's) and LIMITS.
func NewServer(ctx context.Context, p *pool.Pool, cfg Config) *smtp.Server {
	b := newBackend(ctx, p, cfg)
	s := smtp.NewServer(b)
	s.Domain = b.cfg.Hostname
	s.MaxMessageBytes = b.cfg.MaxMessageBytes
	s.MaxRecipients = b.cfg.MaxRecipients
	s.EnableSMTPUTF8 = true
	s.ReadTimeout = b.cfg.ClientTimeout
	s.WriteTimeout = b.cfg.ClientTimeout
	s.ErrorLog = slog.NewLogLogger(b.log.Handler(), slog.LevelWarn)
	b.cfg.Access.configure(s)
	return s
}

// NewSession implements smtp.Backend. go-smtp calls it at the client's
// first EHLO or HELO, after the greeting was sent.
func (b *backend) NewSession(c *smtp.Conn) (smtp.Session, error) {
	cc := clientConnOf(c.Conn())
	if _, tls := c.TLSConnectionState(); tls && cc != nil {
		cc.encrypted.Store(true)
	}
	return &session{b: b, client: c.Conn().RemoteAddr().String(), smtp: c, conn: cc,
		access: newAccessState(c)}, nil
}
