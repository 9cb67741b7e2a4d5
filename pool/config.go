package pool

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"time"
)

// TLSMode says how a session to the upstream is encrypted.
type TLSMode int

const (
	// TLSOpportunistic upgrades with STARTTLS when the upstream offers it and
	// stays in plain text otherwise.
	TLSOpportunistic TLSMode = iota
	// TLSNone never encrypts.
	TLSNone
	// TLSStartTLS requires STARTTLS; a session to an upstream that does not
	// offer it fails.
	TLSStartTLS
	// TLSImplicit speaks TLS from the first byte (SMTPS, usually port 465).
	TLSImplicit
)

var tlsModeNames = map[TLSMode]string{
	TLSOpportunistic: "opportunistic",
	TLSNone:          "none",
	TLSStartTLS:      "starttls",
	TLSImplicit:      "tls",
}

// String returns the mode's configuration name.
func (m TLSMode) String() string {
	if s, ok := tlsModeNames[m]; ok {
		return s
	}
	return fmt.Sprintf("TLSMode(%d)", int(m))
}

// UnmarshalText parses "none", "opportunistic", "starttls" or "tls".
func (m *TLSMode) UnmarshalText(text []byte) error {
	for mode, name := range tlsModeNames {
		if string(text) == name {
			*m = mode
			return nil
		}
	}
	return fmt.Errorf("unknown TLS mode %q (want none, opportunistic, starttls or tls)", text)
}

// MarshalText returns the mode's configuration name.
func (m TLSMode) MarshalText() ([]byte, error) { return []byte(m.String()), nil }

// Config configures a Pool. Every field but Addr has a default, used when
// the field is left at its zero value.
type Config struct {
	// Addr is the upstream's host:port, or several, comma-separated, tried
	// in order: an entry that cannot be reached, or refuses a session, is
	// skipped for FailoverCooldown, and new sessions go to the first
	// healthy entry again after it; required.
	Addr string

	// TLS says how sessions are encrypted; default TLSOpportunistic.
	TLS TLSMode

	// TLSConfig is used for STARTTLS and implicit TLS; nil means the system
	// roots; an empty ServerName is taken from each entry of Addr.
	TLSConfig *tls.Config

	// Auth authenticates each new session once, after TLS; nil means no AUTH.
	Auth Authenticator

	// AllowInsecureAuth lets Auth run over a session without TLS; default
	// false, so that credentials never cross the network in clear text.
	AllowInsecureAuth bool

	// LocalName is the host name sent in EHLO, before and after STARTTLS;
	// default "localhost".
	LocalName string

	// MaxConns is the hard cap on sessions open to the upstream at any
	// moment, counting those being dialled; default 5.
	MaxConns int32

	// MaxConnLifetime is the age, from dial, after which a session is closed
	// instead of reused; default 10 minutes.
	MaxConnLifetime time.Duration

	// MaxConnIdleTime is how long a session may sit unused in the pool before
	// it is closed, but for the MinIdleConns used last; default 2 seconds,
	// as Postfix's SMTP client keeps an idle connection: an idle session
	// holds one of the upstream's connections, which other clients of a
	// shared upstream may need, and a burst keeps its sessions busy.
	MaxConnIdleTime time.Duration

	// MaxMessagesPerConn is the number of messages after which a session is
	// closed instead of reused; default 100.
	MaxMessagesPerConn int

	// PingAfterIdle is how long a session may sit unused before Acquire
	// checks it with NOOP; default 5 seconds.
	PingAfterIdle time.Duration

	// HealthCheckPeriod is the interval of the background check that closes
	// expired sessions, keeps MinIdleConns and lets the effective cap
	// recover (idle sessions are closed on time, whatever it is); default
	// 10 seconds.
	HealthCheckPeriod time.Duration

	// ProbeBackoff is the least pause, after a session failed to be set up
	// or was refused over the upstream's connection limit, before one dial
	// probes the upstream again; it doubles with each failed
	// probe, plus up to half again at random; default 250 milliseconds.
	ProbeBackoff time.Duration

	// ProbeBackoffMax caps the pause between probes; default 2 seconds.
	// While the upstream refuses sessions over its connection limit, the
	// pause is at most 1 second: places on a full upstream come free
	// within seconds, as other clients' bursts end.
	ProbeBackoffMax time.Duration

	// ConnectTimeout bounds dialling plus greeting, EHLO, STARTTLS and AUTH
	// of a new session; default 30 seconds.
	ConnectTimeout time.Duration

	// CommandTimeout bounds the wait for each reply within a session;
	// default 1 minute.
	CommandTimeout time.Duration

	// DataTimeout bounds the wait for the reply to the end of a message;
	// default 10 minutes.
	DataTimeout time.Duration

	// CapRecovery is the quiet period after the upstream last refused a
	// connection over its limit (which lowers the effective cap to the
	// sessions that were open) after which the cap rises by one, and again
	// after each further period, up to MaxConns; default 1 minute.
	CapRecovery time.Duration

	// RateLimit, when above zero, is the most messages per minute sent to
	// the upstream: Acquire waits for it, like for a session; default 0,
	// no limit.
	RateLimit float64

	// RateBurst is how many messages may go at once under RateLimit;
	// default 1.
	RateBurst int

	// SlowDown is how long, after the upstream refused the sending rate,
	// RateLimit is halved; default 1 minute.
	SlowDown time.Duration

	// FailoverCooldown is how long an entry of Addr that failed is skipped
	// when another entry follows it; default 30 seconds.
	FailoverCooldown time.Duration

	// AcquireTimeout is how long the pool's users let Acquire wait for a
	// session (they bound the wait with its context). The pool watches
	// the transactions waiting: when they cannot all get a session within
	// it at the rate sessions were handed out over the last minute, it
	// warns in the log and Stat.DrainLate says so; default 3 minutes.
	AcquireTimeout time.Duration

	// MinIdleConns is the number of idle sessions the background check keeps
	// open, ready for a burst, past MaxConnIdleTime; they count against
	// MaxConns; default 0.
	MinIdleConns int32

	// OnReply, if set, is called with each reply of the upstream to a
	// transaction command, stage "MAIL", "RCPT", "DATA" or "end of DATA",
	// and with each refusal while a session is set up (greeting, EHLO,
	// STARTTLS, AUTH), stage "set-up"; code is the reply's code. It must be
	// quick and safe for concurrent use.
	OnReply func(stage string, code int)

	// Dial opens the TCP connection to Addr; default a net.Dialer.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)

	// Logger receives session events; default discards them.
	Logger *slog.Logger
}

// DefaultConfig returns the defaults that New applies to the fields of a
// Config left at their zero value; Addr has none.
func DefaultConfig() Config {
	return Config{
		TLS:                TLSOpportunistic,
		LocalName:          "localhost",
		MaxConns:           5,
		MaxConnLifetime:    10 * time.Minute,
		MaxConnIdleTime:    2 * time.Second,
		MaxMessagesPerConn: 100,
		PingAfterIdle:      5 * time.Second,
		HealthCheckPeriod:  10 * time.Second,
		ProbeBackoff:       250 * time.Millisecond,
		ProbeBackoffMax:    2 * time.Second,
		ConnectTimeout:     30 * time.Second,
		CommandTimeout:     time.Minute,
		DataTimeout:        10 * time.Minute,
		CapRecovery:        time.Minute,
		AcquireTimeout:     3 * time.Minute,
		RateBurst:          1,
		SlowDown:           time.Minute,
		FailoverCooldown:   30 * time.Second,
	}
}

// withDefaults returns a copy of c with every unset field at its default.
func (c Config) withDefaults() (Config, error) {
	if _, err := c.addrs(); err != nil {
		return c, err
	}
	if _, ok := tlsModeNames[c.TLS]; !ok {
		return c, fmt.Errorf("pool: Config.TLS: unknown mode %d", int(c.TLS))
	}
	if c.TLS == TLSNone && c.Auth != nil && !c.AllowInsecureAuth {
		return c, errors.New("pool: Config.Auth with TLSNone needs AllowInsecureAuth")
	}
	if c.TLSConfig == nil {
		c.TLSConfig = &tls.Config{}
	}
	d := DefaultConfig()
	setDefault(&c.LocalName, d.LocalName)
	setDefault(&c.MaxConns, d.MaxConns)
	setDefault(&c.MaxConnLifetime, d.MaxConnLifetime)
	setDefault(&c.MaxConnIdleTime, d.MaxConnIdleTime)
	setDefault(&c.MaxMessagesPerConn, d.MaxMessagesPerConn)
	setDefault(&c.PingAfterIdle, d.PingAfterIdle)
	setDefault(&c.HealthCheckPeriod, d.HealthCheckPeriod)
	setDefault(&c.ProbeBackoff, d.ProbeBackoff)
	setDefault(&c.ProbeBackoffMax, d.ProbeBackoffMax)
	setDefault(&c.ConnectTimeout, d.ConnectTimeout)
	setDefault(&c.CommandTimeout, d.CommandTimeout)
	setDefault(&c.DataTimeout, d.DataTimeout)
	setDefault(&c.CapRecovery, d.CapRecovery)
	setDefault(&c.AcquireTimeout, d.AcquireTimeout)
	setDefault(&c.RateBurst, d.RateBurst)
	setDefault(&c.SlowDown, d.SlowDown)
	setDefault(&c.FailoverCooldown, d.FailoverCooldown)
	if c.OnReply == nil {
		c.OnReply = func(string, int) {}
	}
	if c.MinIdleConns > c.MaxConns {
		return c, fmt.Errorf("pool: Config.MinIdleConns %d is above MaxConns %d", c.MinIdleConns, c.MaxConns)
	}
	if c.Dial == nil {
		c.Dial = (&net.Dialer{}).DialContext
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if c.MaxConns < 0 || c.MinIdleConns < 0 || c.MaxConnLifetime < 0 || c.MaxConnIdleTime < 0 || c.MaxMessagesPerConn < 0 ||
		c.RateLimit < 0 || c.RateBurst < 0 || c.CapRecovery < 0 || c.AcquireTimeout < 0 || c.SlowDown < 0 || c.FailoverCooldown < 0 ||
		c.PingAfterIdle < 0 || c.ProbeBackoff < 0 || c.ProbeBackoffMax < 0 || c.HealthCheckPeriod < 0 || c.ConnectTimeout < 0 || c.CommandTimeout < 0 || c.DataTimeout < 0 {
		return c, errors.New("pool: Config limits and durations must not be negative")
	}
	return c, nil
}

// addrs splits Addr into its entries and checks each.
func (c Config) addrs() ([]string, error) {
	if strings.TrimSpace(c.Addr) == "" {
		return nil, errors.New("pool: Config.Addr is required")
	}
	var out []string
	for _, a := range strings.Split(c.Addr, ",") {
		a = strings.TrimSpace(a)
		if _, _, err := net.SplitHostPort(a); err != nil {
			return nil, fmt.Errorf("pool: Config.Addr entry %q: %w", a, err)
		}
		out = append(out, a)
	}
	return out, nil
}

func setDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}
