package pool

import (
	"log/slog"
	"sync/atomic"
	"time"
)

// counters are the pool's own running totals, beside puddle's.
type counters struct {
	handedOut       atomic.Int64 // sessions returned by Acquire and TryAcquire
	connsOpened     atomic.Uint64
	connectFailures atomic.Int64
	auths           atomic.Int64
	messages        atomic.Int64
	closed          [numCloseReasons]atomic.Int64
	// canceledAcquires counts Acquire calls that returned because their
	// context ended, wherever they waited (see Pool.gaveUp); puddle's own
	// count sees only the waits inside it, not the gate's or the
	// prober's.
	canceledAcquires atomic.Int64
}

// Stat is a snapshot of a pool's state and running totals. A conn is one
// upstream session: one connection, greeted and authenticated.
type Stat struct {
	// MaxConns is the cap on conns, Config.MaxConns.
	MaxConns int32
	// EffectiveMaxConns is the cap in force now, between 1 and MaxConns:
	// lowered when the upstream refuses a conn over its limit, raised by
	// one after each quiet Config.CapRecovery.
	EffectiveMaxConns int32
	// TotalConns is the number of conns open or being set up now.
	TotalConns int32
	// AcquiredConns is the number of conns lent out now.
	AcquiredConns int32
	// IdleConns is the number of open conns waiting in the pool now.
	IdleConns int32
	// ConstructingConns is the number of conns being dialled and set up now.
	ConstructingConns int32
	// PendingAcquires is the number of Acquire calls waiting now, for a
	// conn to be released or set up, and of callers counted with Waiting:
	// the backpressure queue.
	PendingAcquires int32
	// DrainTime is how long the Acquire calls waiting would take to get a
	// conn at the rate conns were handed out over the last minute (or
	// since the queue formed, if later), as the background loop last
	// judged it: 0 with none waiting, or before the queue has lasted long
	// enough to be judged; math.MaxInt64 when none was handed out.
	DrainTime time.Duration
	// DrainLate reports whether DrainTime is above Config.AcquireTimeout:
	// the last of the waiting calls will time out unless the pace rises.
	// Once set, it stays set until DrainTime falls below three quarters
	// of the timeout.
	DrainLate bool

	// AcquireCount counts successful acquisitions of a conn.
	AcquireCount int64
	// EmptyAcquireCount counts acquisitions that found no idle conn and had
	// to wait for one to be released or set up.
	EmptyAcquireCount int64
	// EmptyAcquireWaitTime is the total time EmptyAcquireCount spent
	// waiting.
	EmptyAcquireWaitTime time.Duration
	// CanceledAcquireCount counts acquisitions given up because their
	// context ended, typically the acquire timeout, wherever they waited:
	// for the rate limit, a place under the effective cap, the prober or
	// a session.
	CanceledAcquireCount int64

	// ConnsOpened counts conns that completed their set-up.
	ConnsOpened int64
	// ConnectFailures counts conns that failed to dial or set up.
	ConnectFailures int64
	// Auths counts successful AUTH exchanges.
	Auths int64
	// Messages counts messages that reached the end of DATA, whatever the
	// upstream's verdict.
	Messages int64

	// ClosedBroken counts conns closed after an I/O error, a 421, a
	// cancelled command or a failed NOOP or RSET.
	ClosedBroken int64
	// ClosedLifetime counts conns closed at MaxConnLifetime.
	ClosedLifetime int64
	// ClosedIdle counts conns closed at MaxConnIdleTime.
	ClosedIdle int64
	// ClosedMessages counts conns closed at MaxMessagesPerConn.
	ClosedMessages int64
	// ClosedDiscarded counts healthy conns discarded by their holder.
	ClosedDiscarded int64
	// ClosedShutdown counts conns closed by Close.
	ClosedShutdown int64
	// ClosedCap counts conns closed because the effective cap was lowered
	// below the conns open.
	ClosedCap int64
	// ClosedErrors and ClosedJunk count conns retired before the upstream
	// would slow them down or disconnect them: after 8 refused commands
	// (4xx or 5xx replies), or 50 RSET and NOOP commands, since it last
	// accepted a message from them.
	ClosedErrors, ClosedJunk int64

	// UpstreamUp reports whether the last set-up or health check of a conn
	// to any entry of Config.Addr succeeded; it is false until one has.
	UpstreamUp bool
	// Upstreams reports each entry of Config.Addr, in order.
	Upstreams []UpstreamStat
}

// UpstreamStat is the state of one entry of Config.Addr.
type UpstreamStat struct {
	// Addr is the entry's host:port.
	Addr string
	// Up reports whether the last set-up or health check of a conn to it
	// succeeded; it is false until one has.
	Up bool
}

// Stat returns a snapshot of the pool.
func (p *Pool) Stat() Stat {
	ps := p.p.Stat()
	ups := make([]UpstreamStat, len(p.upstreams))
	for i, u := range p.upstreams {
		ups[i] = UpstreamStat{Addr: u.addr, Up: u.probe.up.Load()}
	}
	return Stat{
		MaxConns:             ps.MaxResources(),
		EffectiveMaxConns:    p.gate.current(),
		TotalConns:           ps.TotalResources(),
		AcquiredConns:        ps.AcquiredResources(),
		IdleConns:            ps.IdleResources(),
		ConstructingConns:    ps.ConstructingResources(),
		PendingAcquires:      p.waiting.Load(),
		DrainTime:            time.Duration(p.drainTime.Load()),
		DrainLate:            p.drainLate.Load(),
		AcquireCount:         ps.AcquireCount(),
		EmptyAcquireCount:    ps.EmptyAcquireCount(),
		EmptyAcquireWaitTime: ps.EmptyAcquireWaitTime(),
		CanceledAcquireCount: p.stats.canceledAcquires.Load(),
		ConnsOpened:          int64(p.stats.connsOpened.Load()),
		ConnectFailures:      p.stats.connectFailures.Load(),
		Auths:                p.stats.auths.Load(),
		Messages:             p.stats.messages.Load(),
		ClosedBroken:         p.stats.closed[closeBroken].Load(),
		ClosedLifetime:       p.stats.closed[closeLifetime].Load(),
		ClosedIdle:           p.stats.closed[closeIdle].Load(),
		ClosedMessages:       p.stats.closed[closeMessages].Load(),
		ClosedDiscarded:      p.stats.closed[closeDiscarded].Load(),
		ClosedShutdown:       p.stats.closed[closeShutdown].Load(),
		ClosedCap:            p.stats.closed[closeCap].Load(),
		ClosedErrors:         p.stats.closed[closeErrors].Load(),
		ClosedJunk:           p.stats.closed[closeJunk].Load(),
		UpstreamUp:           p.upstreamUp(),
		Upstreams:            ups,
	}
}

// LogValue summarises the pool for a log line.
func (s Stat) LogValue() slog.Value {
	return slog.GroupValue(
		slog.Int("max_conns", int(s.MaxConns)),
		slog.Int("effective_max_conns", int(s.EffectiveMaxConns)),
		slog.Int("acquired_conns", int(s.AcquiredConns)),
		slog.Int("idle_conns", int(s.IdleConns)),
		slog.Int("constructing_conns", int(s.ConstructingConns)),
		slog.Int("pending_acquires", int(s.PendingAcquires)),
		slog.Int64("acquire_count", s.AcquireCount),
		slog.Int64("empty_acquire_count", s.EmptyAcquireCount),
		slog.String("empty_acquire_wait_time", s.EmptyAcquireWaitTime.Round(time.Millisecond).String()),
		slog.Int64("conns_opened", s.ConnsOpened),
		slog.Int64("connect_failures", s.ConnectFailures),
		slog.Int64("messages", s.Messages),
		slog.Bool("upstream_up", s.UpstreamUp),
	)
}
