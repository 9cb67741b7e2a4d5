// Package pool keeps a bounded set of long-lived, authenticated SMTP sessions
// to one upstream server and lends them out one mail transaction at a time.
//
// A session is dialled, greeted, upgraded with STARTTLS and authenticated
// once, then reused for many messages. At most Config.MaxConns sessions exist
// at any moment, counting those being dialled, so the upstream never sees
// more connections than that. Sessions are checked when they are acquired
// (NOOP after an idle spell), when they are released (a broken session is
// destroyed, an unfinished transaction is reset or the session closed) and
// by a background loop that closes idle and expired sessions. While the
// upstream cannot be reached, one dial at a time probes it, with backoff,
// and other acquirers wait for that probe, or fail at once while none is
// due, instead of hammering the upstream; so too while it refuses
// sessions over its connection limit, and then the transactions waiting
// for a session wait for the next probe instead of failing.
package pool

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/puddle/v2"
	"golang.org/x/time/rate"
)

// Pool is a set of upstream SMTP sessions. It is safe for concurrent use.
type Pool struct {
	cfg     Config
	log     *slog.Logger
	p       *puddle.Pool[*session]
	stats   counters
	waiting atomic.Int32 // Acquire calls in progress

	upstreams []*upstream   // the entries of Config.Addr, in order
	gate      *capGate      // the effective cap, learnt from the upstream
	limiter   *rate.Limiter // RateLimit, or nil
	throttle  sync.Mutex    // guards the fields below
	capSignal time.Time     // when the upstream last refused a connection over its limit
	capRaised time.Time     // when the effective cap last rose
	slowUntil time.Time     // until when RateLimit is halved
	// growing says that the upstream took a session again after it had
	// refused every one of the pool's over its connection limit: each
	// set-up that succeeds while transactions wait for a place under the
	// cap raises the cap by one, until a refusal or MaxConns.
	growing bool

	// drain judges the queue of Acquire calls for the background loop,
	// which publishes its estimate in drainTime and drainLate.
	drain     drainWatch
	drainTime atomic.Int64 // a time.Duration
	drainLate atomic.Bool
	drainLog  time.Time // when the loop last warned that the queue is late
	drainSaid bool      // it warned, and has not said since that the queue is fine

	// idleTimer wakes the background loop when the idle session that has
	// waited longest reaches MaxConnIdleTime; idleAt is when (zero: not
	// armed). Guarded by idleMu.
	idleMu    sync.Mutex
	idleTimer *time.Timer
	idleAt    time.Time

	// back holds the channel that is closed, and replaced, when an
	// upstream entry that could not be reached accepts a session again
	// (see Reachable): an atomic, since every relayed command reads it.
	back atomic.Pointer[chan struct{}]

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
		gate:   newCapGate(cfg.MaxConns),
		closed: make(chan struct{}),
		done:   make(chan struct{}),

		idleTimer: time.NewTimer(time.Hour),
		drain:     drainWatch{timeout: cfg.AcquireTimeout, minSpan: min(10*time.Second, cfg.AcquireTimeout/4)},
	}
	p.idleTimer.Stop()
	back := make(chan struct{})
	p.back.Store(&back)
	if p.upstreams, err = newUpstreams(cfg, p.lockoutEnded, p.reachableAgain); err != nil {
		return nil, err
	}
	if cfg.RateLimit > 0 {
		p.limiter = rate.NewLimiter(rate.Limit(cfg.RateLimit/60), cfg.RateBurst)
	}
	p.p, err = puddle.NewPool(&puddle.Config[*session]{
		Constructor: p.connect,
		Destructor:  p.closeSession,
		MaxSize:     cfg.MaxConns,
	})
	if err != nil {
		return nil, err
	}
	go p.healthLoop()
	p.fillIdle()
	return p, nil
}

// Waiting counts a caller that waits for its turn before it calls Acquire
// (a transaction waiting for the proxy's buffer budget, which the sessions'
// work frees) among the Acquire calls waiting, in Stat.PendingAcquires and
// in the drain estimate, until it calls done, once: the queue for sessions
// is all the transactions waiting, wherever they wait.
func (p *Pool) Waiting() (done func()) {
	p.waiting.Add(1)
	return func() { p.waiting.Add(-1) }
}

// Acquire returns a session ready for a new transaction, dialling one if
// none is idle and the cap allows, or waiting until one is released. It
// returns ctx's error when ctx ends first, the error of the dial or
// handshake when a new session could not be set up (wrapping ErrUpstreamDown
// when a recent dial failed and the next probe is not due yet), and
// ErrClosed after Close. A set-up that the upstream refuses over its
// connection limit is not an error: Acquire waits, within the cap that the
// refusal lowered, for a session to be released or for the next probe of
// the upstream to succeed. The caller must Release the Conn.
func (p *Pool) Acquire(ctx context.Context) (*Conn, error) {
	p.waiting.Add(1)
	defer p.waiting.Add(-1)
	if p.limiter != nil {
		if err := p.limiter.Wait(ctx); err != nil {
			return nil, p.gaveUp(ctx, fmt.Errorf("waiting for the rate limit: %w", err))
		}
	}
	for first := false; ; first = true {
		if err := p.gate.acquire(ctx, first); err != nil {
			return nil, p.gaveUp(ctx, err)
		}
		c, err := p.acquire(ctx)
		if err == nil {
			p.stats.handedOut.Add(1)
			return c, nil
		}
		p.gate.release()
		if !errors.Is(err, ErrConnLimit) || ctx.Err() != nil {
			return nil, p.gaveUp(ctx, err)
		}
		// The upstream refused to set a session up over its connection
		// limit: a fact about the upstream, not the transaction. The cap
		// is lowered and the entry backs off; wait again for a place
		// under the cap, first in line.
	}
}

// gaveUp counts an Acquire that returns err, in CanceledAcquireCount, if
// its context has ended: wherever it waited (the rate limit, the cap, the
// prober, puddle), its wait was given up.
func (p *Pool) gaveUp(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		p.stats.canceledAcquires.Add(1)
	}
	return err
}

// TryAcquire returns a session ready for a new transaction if one is idle
// now and Acquire would not wait for the cap or the rate limit, and nil
// otherwise. It never dials, waits or checks a session with NOOP: a
// session that has idled past PingAfterIdle is left to Acquire. Like
// Acquire, it looks into the session's socket (a system call, no round
// trip), and closes a session that the upstream closed or wrote to unasked
// instead of lending it. The caller must Release the Conn.
func (p *Pool) TryAcquire() *Conn {
	if p.limiter != nil || p.p.Stat().IdleResources() == 0 || !p.gate.tryAcquire() {
		return nil
	}
	// puddle starts dialling in the background when nothing is idle (the
	// idle session seen above may have gone meanwhile); with a context
	// that has ended, that dial ends at once (see connect).
	res, err := p.p.TryAcquire(endedContext)
	if err != nil {
		p.gate.release()
		return nil
	}
	s := res.Value()
	if s.transactions > 0 && p.retireReason(res) != closeNone || res.IdleDuration() > p.cfg.PingAfterIdle {
		res.ReleaseUnused()
		p.gate.release()
		return nil
	}
	// The look into the socket that Acquire's usable makes: a session
	// that the upstream closed, or wrote to unasked, while it sat idle is
	// closed here, not lent to fail its first write and cost its
	// transaction a retry. Its place under the cap is given back once its
	// connection is closed, as a lent session's is.
	if s.client.Unsolicited() {
		s.broken = true
		s.afterClose = p.gate.release
		p.destroy(res, closeBroken)
		return nil
	}
	s.transactions++
	p.stats.handedOut.Add(1)
	return &Conn{res: res, pool: p}
}

// endedContext is a context that has ended.
var endedContext = func() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}()

// acquire takes a usable session from puddle, within the gate.
func (p *Pool) acquire(ctx context.Context) (*Conn, error) {
	// Each pass either returns or closes a session, so the loop ends; the
	// bound turns a pool that only yields unusable sessions into an error.
	for range 2*int(p.cfg.MaxConns) + 2 {
		res, err := p.take(ctx)
		if err != nil {
			return nil, err
		}
		if p.usable(ctx, res) {
			res.Value().transactions++
			return &Conn{res: res, pool: p}, nil
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
	}
	return nil, errors.New("acquire: no usable upstream session after closing expired or broken ones")
}

// take takes a session from puddle, idle or set up for it. Where the
// prober makes set-ups wait (see prober.dial), it waits, with ctx, and
// tries again: the wait is the acquirer's, since puddle runs the
// constructor with a context that the acquirer's end does not cancel.
func (p *Pool) take(ctx context.Context) (*puddle.Resource[*session], error) {
	for {
		res, err := p.p.Acquire(ctx)
		if err == nil {
			return res, nil
		}
		var w *probeWait
		switch {
		case errors.As(err, &w):
			if err := w.wait(ctx); err != nil {
				return nil, err
			}
		case errors.Is(err, puddle.ErrClosedPool):
			return nil, ErrClosed
		default:
			return nil, err
		}
	}
}

// usable checks a session just taken from the pool, and destroys it if it
// has reached a limit, if its upstream closed it or sent what no command
// asked for, or if it fails NOOP after an idle spell. A session that has
// never been lent is exempt from the limits, so that a tiny MaxConnLifetime
// cannot make Acquire dial forever.
func (p *Pool) usable(ctx context.Context, res *puddle.Resource[*session]) bool {
	s := res.Value()
	if s.transactions > 0 {
		if reason := p.retireReason(res); reason != closeNone {
			p.destroy(res, reason)
			return false
		}
	}
	// A look into the socket (a system call, no round trip): a connection
	// that the upstream closed while the session sat idle, or bytes that
	// no command asked for, retire the session here, where another is
	// taken at no cost to the transaction, not at its first command, which
	// would fail and cost the transaction a retry and its pause.
	if s.client.Unsolicited() {
		s.broken = true
		p.destroy(res, closeBroken)
		return false
	}
	if res.IdleDuration() > p.cfg.PingAfterIdle {
		stop := s.bind(ctx)
		err := s.client.Noop()
		stop()
		if err != nil {
			p.log.Debug("upstream session failed NOOP", "session", s.id, "err", err)
			s.broken = true
			p.destroy(res, closeBroken)
			return false
		}
		s.upstream.probe.up.Store(true)
	}
	return true
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
	closeShutdown
	closeCap
	closeErrors
	closeJunk
	numCloseReasons
)

var closeReasonNames = [numCloseReasons]string{"", "broken", "lifetime", "idle", "messages", "discarded", "shutdown", "cap", "errors", "junk"}

// An upstream holds a client's errors and junk commands against it until
// it accepts a message from it, and past its limits slows down or
// disconnects. Postfix's smtpd, with its defaults: every command it
// refuses (4xx or 5xx, a refused recipient too) is an error; RSET, NOOP,
// VRFY and ETRN are junk commands, and each past smtpd_junk_command_limit
// (100) is an error too; from smtpd_soft_error_limit (10) errors on it
// sleeps smtpd_error_sleep_time (1 s) before every reply, and at
// smtpd_hard_error_limit (20) it disconnects. A session gathers them from
// transactions that end without a message: refused recipients (an error,
// and an RSET to end the transaction), and transactions a client abandons
// or whose message smtppool refuses itself (an RSET each), and the NOOP of
// a check after an idle spell. So a session that has made maxErrorReplies
// errors or maxJunkCommands junk commands since the upstream last accepted
// a message from it is retired (closed with QUIT, and another dialled when
// needed; the count starts again on the new one): 8 errors leave room for
// a transaction that makes two more before Postfix's sleep (a refused
// recipient and a refused message), and 50 junk commands are half of
// Postfix's limit. Ordinary traffic, where messages are accepted in
// between, never reaches them.
const (
	maxErrorReplies = 8
	maxJunkCommands = 50
)

func (r closeReason) String() string { return closeReasonNames[r] }

// retireReason says whether a session has reached a limit and must not be
// used again. The idle limit is checkIdle's.
func (p *Pool) retireReason(res *puddle.Resource[*session]) closeReason {
	s := res.Value()
	switch {
	case s.broken:
		return closeBroken
	case s.client.OutOfStep():
		// A reply nobody asked for, or one that broke the protocol: the
		// next command would take the next reply for its own. (What
		// arrives later, or a close, the look into the socket when the
		// session is taken again, or by the background loop, finds: none
		// is spent here.)
		s.broken = true
		return closeBroken
	case time.Since(res.CreationTime()) >= p.cfg.MaxConnLifetime:
		return closeLifetime
	case s.messages >= p.cfg.MaxMessagesPerConn:
		return closeMessages
	case s.client.Tally.Errors >= maxErrorReplies:
		return closeErrors
	case s.client.Tally.Junk >= maxJunkCommands:
		return closeJunk
	}
	return closeNone
}

// destroy closes an acquired session. Puddle frees its slot only after the
// destructor has closed the connection, so the cap holds while it closes.
func (p *Pool) destroy(res *puddle.Resource[*session], reason closeReason) {
	s := res.Value()
	s.closeReason = reason
	p.log.Debug("upstream session closing", "session", s.id, "reason", reason.String(),
		"messages", s.messages, "age", time.Since(res.CreationTime()).Round(time.Millisecond).String(),
		"errors", s.client.Tally.Errors, "junk", s.client.Tally.Junk)
	res.Destroy()
}

// closeSession is puddle's destructor: it counts the session's reason for
// closing (shutdown, when the pool closed it) and ends it.
func (p *Pool) closeSession(s *session) {
	if s.closeReason == closeNone {
		s.closeReason = closeShutdown
	}
	p.stats.closed[s.closeReason].Add(1)
	s.close()
	if s.afterClose != nil {
		s.afterClose()
	}
}

func (p *Pool) healthLoop() {
	defer close(p.done)
	t := time.NewTicker(p.cfg.HealthCheckPeriod)
	defer t.Stop()
	drainTick := time.NewTicker(max(min(time.Second, p.cfg.AcquireTimeout/20), time.Millisecond))
	defer drainTick.Stop()
	for {
		select {
		case <-p.closed:
			p.idleTimer.Stop()
			return
		case now := <-drainTick.C:
			p.judgeQueue(now)
		case <-p.idleTimer.C:
			p.idleMu.Lock()
			p.idleAt = time.Time{}
			p.idleMu.Unlock()
			p.checkIdle()
			p.fillIdle()
		case <-t.C:
			p.checkIdle()
			p.recover()
			p.fillIdle()
		}
	}
}

// judgeQueue judges, at now, whether the Acquire calls waiting can all
// get a session within AcquireTimeout at the pace of the last minute, and
// warns when they cannot, before their clients time out: at most once a
// minute. A late queue is fine again once it would drain within three
// quarters of the timeout, so that a queue near the limit does not flap.
func (p *Pool) judgeQueue(now time.Time) {
	e := p.drain.observe(now, p.stats.handedOut.Load(), p.waiting.Load())
	p.drainTime.Store(int64(e.time))
	was := p.drainLate.Load()
	late := e.late || was && e.time > p.cfg.AcquireTimeout/4*3
	p.drainLate.Store(late)
	switch {
	case late && now.Sub(p.drainLog) >= time.Minute:
		p.drainLog, p.drainSaid = now, true
		drain := "never: no session was handed out"
		if e.time != math.MaxInt64 {
			drain = e.time.Round(time.Second).String()
		}
		p.log.Warn("transactions waiting for an upstream session cannot all get one within the acquire timeout at the pace of the last minute; the last of them will time out",
			"waiting", e.waiting, "sessions_per_minute", math.Round(e.perMinute), "drain_time", drain,
			"acquire_timeout", p.cfg.AcquireTimeout.String(), "open_conns", p.established(),
			"effective_max_conns", p.gate.current(), "max_conns", p.cfg.MaxConns)
	case !late && p.drainSaid:
		p.drainSaid = false
		p.log.Info("transactions waiting for an upstream session can all get one within the acquire timeout again", "waiting", e.waiting)
	}
}

// checkIdleAt makes the background loop check the idle sessions at t,
// unless it is due to check them sooner.
func (p *Pool) checkIdleAt(t time.Time) {
	p.idleMu.Lock()
	defer p.idleMu.Unlock()
	if !p.idleAt.IsZero() && !t.Before(p.idleAt) {
		return
	}
	p.idleAt = t
	p.idleTimer.Reset(time.Until(t))
}

// checkIdle closes idle sessions that have expired, those that are out
// of step or that the upstream closed (it looks into their sockets: off
// the hot path, so that a transaction seldom meets such a session), and
// those that have idled MaxConnIdleTime but for the MinIdleConns used
// last, and arranges
// to check again when the next one will have idled that long. An idle
// session holds one of the upstream's connections, which other clients of
// a shared upstream (other replicas) may need: it is kept for the next
// transactions of a burst, not for the next burst.
func (p *Pool) checkIdle() {
	idle := p.p.AcquireAllIdle()
	slices.SortFunc(idle, func(a, b *puddle.Resource[*session]) int { return cmp.Compare(a.IdleDuration(), b.IdleDuration()) })
	var kept int32
	next := time.Duration(-1)
	for _, res := range idle {
		reason := p.retireReason(res)
		if s := res.Value(); reason == closeNone && s.client.Unsolicited() {
			s.broken = true
			reason = closeBroken
		}
		idleFor := res.IdleDuration()
		if reason == closeNone && kept >= p.cfg.MinIdleConns && idleFor >= p.cfg.MaxConnIdleTime {
			reason = closeIdle
		}
		if reason != closeNone {
			p.destroy(res, reason)
			continue
		}
		if kept < p.cfg.MinIdleConns {
			kept++
		} else if left := p.cfg.MaxConnIdleTime - idleFor; next < 0 || left < next {
			next = left
		}
		res.ReleaseUnused()
	}
	if next >= 0 {
		p.checkIdleAt(time.Now().Add(next))
	}
}

// fillIdle starts setting up sessions, in the background, until
// MinIdleConns are idle or being set up, within MaxConns. Set-ups go
// through the prober like any other.
func (p *Pool) fillIdle() {
	st := p.p.Stat()
	missing := p.cfg.MinIdleConns - st.IdleResources() - st.ConstructingResources()
	missing = min(missing, p.gate.current()-st.TotalResources())
	for range max(missing, 0) {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), p.cfg.ConnectTimeout)
			defer cancel()
			if err := p.p.CreateResource(ctx); err != nil && !errors.Is(err, puddle.ErrNotAvailable) &&
				!errors.Is(err, puddle.ErrClosedPool) {
				p.log.Debug("could not open an idle upstream session", "err", err)
			}
		}()
	}
}

// lowerCap lowers the effective cap to open sessions (at least 1) after
// the upstream refused a connection over its limit, and reports whether it
// did; idle sessions over the new cap are closed.
func (p *Pool) lowerCap(open int32, reply error) bool {
	open = max(open, 1)
	p.throttle.Lock()
	p.capSignal = time.Now()
	p.growing = false
	p.throttle.Unlock()
	if open >= p.gate.current() {
		return false
	}
	p.gate.setLimit(open)
	p.log.Warn("upstream refused a connection over its limit; lowering the effective cap",
		"effective_max_conns", open, "max_conns", p.cfg.MaxConns, "reply", reply)
	p.trimToCap()
	return true
}

// Reachable returns a channel that is closed the next time an upstream
// entry that could not be reached accepts a session again. A caller that
// waits out a pause after Acquire failed (ErrUpstreamDown, or the dial
// error of a failed probe) can try again then, at once, instead of at the
// end of its pause: after an outage, the first session set up (for an
// acquirer, or to keep MinIdleConns warm) wakes them. Taken before the attempt that failed, it also
// covers a recovery that happened during that attempt.
func (p *Pool) Reachable() <-chan struct{} {
	return *p.back.Load()
}

// reachableAgain wakes the callers waiting on Reachable.
func (p *Pool) reachableAgain() {
	next := make(chan struct{})
	close(*p.back.Swap(&next))
}

// lockoutEnded is called when a probe of an entry that had refused a
// session over its connection limit succeeds. If the pool had no other
// session open, the upstream refused every one of its sessions (others,
// such as other replicas, held all its places): the room it has now is
// unknown, so the cap grows while transactions wait (see grow).
func (p *Pool) lockoutEnded() {
	if p.established() > 0 {
		return
	}
	p.throttle.Lock()
	p.growing = true
	p.throttle.Unlock()
	p.grow()
}

// grow raises the effective cap by one, after a session was set up, while
// the pool grows after a lockout and transactions wait for a place under
// the cap: the place lets one more set-up through, whose success raises
// the cap again. So the pool takes the upstream's room one session at a
// time, and a refusal (which lowers the cap and ends the growth) costs one
// refused connection.
func (p *Pool) grow() {
	p.throttle.Lock()
	defer p.throttle.Unlock()
	if !p.growing {
		return
	}
	c := p.gate.current()
	if c >= p.cfg.MaxConns || p.gate.queued() == 0 {
		p.growing = false
		return
	}
	p.capRaised = time.Now()
	p.gate.setLimit(c + 1)
	p.log.Info("upstream took a session again; raising the effective cap while transactions wait", "effective_max_conns", c+1, "max_conns", p.cfg.MaxConns)
}

// overCap reports whether more sessions are open than the effective cap
// allows, as after the cap was lowered. (Never more than MaxConns are
// open: at MaxConns, the cap needs no count, which allocates.)
func (p *Pool) overCap() bool {
	limit := p.gate.current()
	return limit < p.cfg.MaxConns && p.established() > limit
}

// connected returns the sessions whose connections the upstream counts
// when it refuses one already set up, over its concurrency limit (432
// 4.3.2 at DATA): those established and those being set up, whose
// connections it has accepted. A refusal while a session is set up (a 421
// banner) counts established sessions instead: the others being set up
// then may be refused just the same.
func (p *Pool) connected() int32 { return p.p.Stat().TotalResources() }

// established returns the sessions open now, lent out or idle; those
// still being set up are not yet known to the upstream's limit.
func (p *Pool) established() int32 {
	st := p.p.Stat()
	return st.AcquiredResources() + st.IdleResources()
}

// trimToCap closes idle sessions over the effective cap; sessions in use
// over it are closed when they are released.
func (p *Pool) trimToCap() {
	excess := p.established() - p.gate.current()
	for _, res := range p.p.AcquireAllIdle() {
		if excess > 0 {
			excess--
			p.destroy(res, closeCap)
			continue
		}
		res.ReleaseUnused()
	}
}

// slowDown halves the rate limit for SlowDown, after the upstream refused
// the sending rate.
func (p *Pool) slowDown(reply error) {
	p.throttle.Lock()
	defer p.throttle.Unlock()
	already := time.Now().Before(p.slowUntil)
	p.slowUntil = time.Now().Add(p.cfg.SlowDown)
	if p.limiter != nil && !already {
		p.limiter.SetLimit(rate.Limit(p.cfg.RateLimit / 60 / 2))
	}
	if !already {
		p.log.Warn("upstream refused the sending rate; slowing down", "for", p.cfg.SlowDown.String(), "reply", reply)
	}
}

// recover raises the effective cap by one after each quiet CapRecovery,
// and restores the rate limit once SlowDown has passed.
func (p *Pool) recover() {
	p.throttle.Lock()
	defer p.throttle.Unlock()
	now := time.Now()
	if c := p.gate.current(); c < p.cfg.MaxConns && now.Sub(p.capSignal) >= p.cfg.CapRecovery && now.Sub(p.capRaised) >= p.cfg.CapRecovery {
		p.capRaised = now
		p.gate.setLimit(c + 1)
		p.log.Info("no connection refused for a while; raising the effective cap", "effective_max_conns", c+1, "max_conns", p.cfg.MaxConns)
	}
	if p.limiter != nil && !p.slowUntil.IsZero() && now.After(p.slowUntil) {
		p.slowUntil = time.Time{}
		p.limiter.SetLimit(rate.Limit(p.cfg.RateLimit / 60))
		p.log.Info("sending rate restored")
	}
}
