package pool

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// probeState is what the last session set-up of an upstream entry said
// about it.
type probeState int

const (
	// stateOK: the last set-up succeeded (or none was tried): dials go
	// straight through.
	stateOK probeState = iota
	// stateDown: the last set-up failed; the entry could not be reached
	// or would not set a session up. One dial at a time probes it, with
	// backoff; while none is due, other dials fail at once, and their
	// transactions retry in their own time.
	stateDown
	// stateFull: the last set-up was refused over the entry's connection
	// limit (a 421 banner "too many connections"). The entry is up but
	// has no room: one dial at a time probes it, with backoff, and the
	// acquirers of other dials wait for that probe (a *probeWait) instead
	// of failing, since nothing is wrong with their transactions.
	stateFull
)

// prober lets one dial at a time probe an upstream that failed to set up a
// session, or refused one over its connection limit, with backoff between
// probes. While a probe is in flight, other dials return a *probeWait,
// and their acquirers wait for its outcome; while none is due, they fail
// at once with the last error (the entry is down) or their acquirers wait
// until one is (the entry is full).
type prober struct {
	base, max time.Duration
	// fullMax caps the pause while the entry is full: a full upstream
	// frees places within seconds (other clients' bursts end, their idle
	// sessions close), and whoever probes first takes them.
	fullMax time.Duration
	up      atomic.Bool // the last dial or health check succeeded
	log     *slog.Logger
	// recovered, if set, is called when a probe succeeds after the entry
	// was full.
	recovered func()
	// reachable, if set, is called when a probe succeeds after the entry
	// could not be reached.
	reachable func()

	mu       sync.Mutex
	state    probeState
	lastErr  error         // why the last set-up failed
	inFlight chan struct{} // closed when the probe in flight ends; nil if none
	next     time.Time     // when the next probe is due
	delay    time.Duration // the pause before the next probe after a failure
}

// errBackingOff says that a dial was not tried because the entry refused
// a session over its connection limit and its next probe is not due yet.
var errBackingOff = errors.New("upstream refused a session over its connection limit; backing off")

// dial sets up a session with connect, through the prober's gate, with
// ctx. Where the prober makes a dial wait (a probe is in flight, or the
// entry is full and its next probe is not due), dial does not wait: it
// returns a *probeWait, which the acquirer waits for with its own context
// before it tries again (see Pool.take), so that puddle's constructor,
// which an acquirer that gives up does not stop, never waits. With noWait,
// it fails at once instead, so that the caller can turn to another
// upstream.
func (pr *prober) dial(ctx context.Context, connect func(context.Context) (*session, error), noWait bool) (*session, error) {
	pr.mu.Lock()
	switch {
	case pr.state == stateOK:
		pr.mu.Unlock()
		s, err := connect(ctx)
		pr.record(ctx, err, false)
		return s, err
	case pr.inFlight != nil && noWait:
		full := pr.state == stateFull
		pr.mu.Unlock()
		if full {
			return nil, fmt.Errorf("%w: probe in flight", errBackingOff)
		}
		return nil, fmt.Errorf("%w: probe in flight", ErrUpstreamDown)
	case pr.inFlight != nil:
		done := pr.inFlight
		pr.mu.Unlock()
		return nil, &probeWait{done: done}
	case time.Now().Before(pr.next):
		err, next := pr.lastErr, pr.next
		state := pr.state
		pr.mu.Unlock()
		switch {
		case state == stateDown:
			return nil, fmt.Errorf("%w: %w", ErrUpstreamDown, err)
		case noWait:
			return nil, fmt.Errorf("%w: %w", errBackingOff, err)
		}
		return nil, &probeWait{until: next}
	}
	done := make(chan struct{})
	pr.inFlight = done
	pr.mu.Unlock()
	s, err := connect(ctx)
	pr.record(ctx, err, true)
	pr.mu.Lock()
	pr.inFlight = nil
	pr.mu.Unlock()
	close(done)
	return s, err
}

// probeWait is a dial's answer when it must wait for the prober: until the
// probe in flight ends (done), or else until the next probe is due
// (until). The acquirer waits for it and tries again.
type probeWait struct {
	done  <-chan struct{}
	until time.Time
}

func (w *probeWait) Error() string { return "waiting for the upstream's next probe" }

// wait waits for w, or for ctx to end (and then returns an error that
// wraps ctx's cause).
func (w *probeWait) wait(ctx context.Context) error {
	var due <-chan time.Time // nil, which never fires, while a probe is in flight
	if w.done == nil {
		t := time.NewTimer(time.Until(w.until))
		defer t.Stop()
		due = t.C
	}
	select {
	case <-w.done:
	case <-due:
	case <-ctx.Done():
		return fmt.Errorf("waiting for the upstream's next probe: %w", context.Cause(ctx))
	}
	return nil
}

// record notes the outcome of a session set-up; a failure caused by ctx
// ending says nothing about the upstream. The pause before the next probe
// starts at base and doubles with each failed probe, up to max.
func (pr *prober) record(ctx context.Context, err error, probe bool) {
	if err != nil && ctx.Err() != nil {
		return
	}
	pr.mu.Lock()
	if err == nil {
		was := pr.state
		switch was {
		case stateDown:
			pr.log.Info("upstream reachable again")
		case stateFull:
			pr.log.Info("upstream accepted a session again after refusing them over its connection limit")
		}
		pr.state, pr.lastErr, pr.delay = stateOK, nil, 0
		pr.up.Store(true)
		pr.mu.Unlock()
		switch {
		case was == stateFull && pr.recovered != nil:
			pr.recovered()
		case was == stateDown && pr.reachable != nil:
			pr.reachable()
		}
		return
	}
	defer pr.mu.Unlock()
	state := stateDown
	if errors.Is(err, ErrConnLimit) {
		// An upstream that refuses a connection over its limit is up:
		// it has no room for another session now.
		state = stateFull
	}
	switch {
	case pr.state == stateOK && state == stateFull:
		pr.log.Warn("upstream refused a session over its connection limit; waiting transactions wait for one dial at a time, with backoff", "err", err)
	case pr.state != stateDown && state == stateDown:
		pr.log.Warn("upstream unreachable; probing it, one dial at a time", "err", err)
	}
	ceiling := pr.max
	if state == stateFull {
		ceiling = min(pr.max, pr.fullMax)
	}
	switch {
	case pr.state == stateOK:
		pr.delay = min(pr.base, ceiling)
	case probe:
		pr.delay = min(2*pr.delay, ceiling)
	}
	pr.state, pr.lastErr = state, err
	if state == stateDown {
		pr.up.Store(false)
	}
	pr.next = time.Now().Add(pr.delay + rand.N(pr.delay/2+1))
}
