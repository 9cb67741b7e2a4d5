package pool

import (
	"sync/atomic"
	"time"
)

// counters are the pool's own running totals, beside puddle's.
type counters struct {
	sessionsOpened  atomic.Uint64
	connectFailures atomic.Int64
	auths           atomic.Int64
	messages        atomic.Int64
	closed          [numCloseReasons]atomic.Int64
}

// Stat is a snapshot of a pool's state and running totals.
type Stat struct {
	// MaxSessions is the cap on sessions, Config.MaxConns.
	MaxSessions int32
	// TotalSessions is the number of sessions open or being dialled now.
	TotalSessions int32
	// AcquiredSessions is the number of sessions lent out now.
	AcquiredSessions int32
	// IdleSessions is the number of open sessions waiting in the pool now.
	IdleSessions int32
	// ConnectingSessions is the number of sessions being dialled now.
	ConnectingSessions int32
	// PendingAcquires is the number of Acquire calls waiting now, for a
	// session to be released or dialled: the backpressure queue.
	PendingAcquires int32

	// Acquires counts successful acquisitions of a session.
	Acquires int64
	// WaitedAcquires counts acquisitions that found no idle session and had
	// to wait for one to be released or dialled.
	WaitedAcquires int64
	// WaitTime is the total time WaitedAcquires spent waiting.
	WaitTime time.Duration
	// CanceledAcquires counts acquisitions given up because their context
	// ended, typically the acquire timeout.
	CanceledAcquires int64

	// SessionsOpened counts sessions that completed their handshake.
	SessionsOpened int64
	// ConnectFailures counts sessions that failed to dial or handshake.
	ConnectFailures int64
	// Auths counts successful AUTH exchanges.
	Auths int64
	// Messages counts messages that reached the end of DATA, whatever the
	// upstream's verdict.
	Messages int64

	// ClosedBroken counts sessions closed after an I/O error, a 421 or a
	// failed NOOP or RSET.
	ClosedBroken int64
	// ClosedLifetime counts sessions closed at MaxConnLifetime.
	ClosedLifetime int64
	// ClosedIdle counts sessions closed at MaxConnIdleTime.
	ClosedIdle int64
	// ClosedMessages counts sessions closed at MaxMessagesPerConn.
	ClosedMessages int64
	// ClosedDiscarded counts healthy sessions discarded by their holder.
	ClosedDiscarded int64
	// ClosedUnfinished counts sessions closed because a transaction was
	// left unfinished on them while the pool authenticates: RSET and the
	// EHLO after it could lose the AUTH.
	ClosedUnfinished int64
	// ClosedShutdown counts sessions closed by Close.
	ClosedShutdown int64

	// UpstreamUp reports whether the last session set-up or health check
	// of the upstream succeeded (true before the first).
	UpstreamUp bool
}

// Stat returns a snapshot of the pool.
func (p *Pool) Stat() Stat {
	ps := p.p.Stat()
	return Stat{
		MaxSessions:        ps.MaxResources(),
		TotalSessions:      ps.TotalResources(),
		AcquiredSessions:   ps.AcquiredResources(),
		IdleSessions:       ps.IdleResources(),
		ConnectingSessions: ps.ConstructingResources(),
		PendingAcquires:    p.waiting.Load(),
		Acquires:           ps.AcquireCount(),
		WaitedAcquires:     ps.EmptyAcquireCount(),
		WaitTime:           ps.EmptyAcquireWaitTime(),
		CanceledAcquires:   ps.CanceledAcquireCount(),
		SessionsOpened:     int64(p.stats.sessionsOpened.Load()),
		ConnectFailures:    p.stats.connectFailures.Load(),
		Auths:              p.stats.auths.Load(),
		Messages:           p.stats.messages.Load(),
		ClosedBroken:       p.stats.closed[closeBroken].Load(),
		ClosedLifetime:     p.stats.closed[closeLifetime].Load(),
		ClosedIdle:         p.stats.closed[closeIdle].Load(),
		ClosedMessages:     p.stats.closed[closeMessages].Load(),
		ClosedDiscarded:    p.stats.closed[closeDiscarded].Load(),
		ClosedUnfinished:   p.stats.closed[closeUnfinished].Load(),
		ClosedShutdown:     p.stats.closed[closeShutdown].Load(),
		UpstreamUp:         p.probe.up.Load(),
	}
}
