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
	// has no room: one dial at a time probes it, with backoff, and other
	// dials wait for that probe instead of failing, since nothing is
	// wrong with their transactions.
	stateFull
)

// prober lets one dial at a time probe an upstream that failed to set up a
// session, or refused one over its connection limit, with backoff between
// probes. While a probe is in flight, other dials wait for its outcome;
// while none is due, they fail at once with the last error (the entry is
// down) or wait until one is (the entry is full).
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

// dial sets up a session with connect, through the prober's gate. A wait
// for a probe ends when wait ends (the caller gave up), and connect runs
// with ctx. With noWait, it does not wait for a probe at all, but fails at
// once, so that the caller can turn to another upstream.
func (pr *prober) dial(ctx, wait context.Context, connect func(context.Context) (*session, error), noWait bool) (*session, error) {
	for {
		pr.mu.Lock()
		switch {
		case pr.state == stateOK:
			pr.mu.Unlock()
			s, err := connect(ctx)
			pr.record(ctx, err, false)
			return s, err
		case pr.inFlight != nil && noWait:
			pr.mu.Unlock()
			if pr.state == stateFull {
				return nil, fmt.Errorf("%w: probe in flight", errBackingOff)
			}
			return nil, fmt.Errorf("%w: probe in flight", ErrUpstreamDown)
		case pr.inFlight != nil:
			done := pr.inFlight
			pr.mu.Unlock()
			select {
			case <-done:
				continue
			case <-wait.Done():
				return nil, fmt.Errorf("waiting for the upstream probe: %w", context.Cause(wait))
			}
		case time.Now().Before(pr.next) && pr.state == stateDown:
			err := pr.lastErr
			pr.mu.Unlock()
			return nil, fmt.Errorf("%w: %w", ErrUpstreamDown, err)
		case time.Now().Before(pr.next) && noWait:
			err := pr.lastErr
			pr.mu.Unlock()
			return nil, fmt.Errorf("%w: %w", errBackingOff, err)
		case time.Now().Before(pr.next):
			t := time.NewTimer(time.Until(pr.next))
			pr.mu.Unlock()
			select {
			case <-t.C:
				continue
			case <-wait.Done():
				t.Stop()
				return nil, fmt.Errorf("waiting to probe the upstream again: %w", context.Cause(wait))
			}
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
		if was == stateFull && pr.recovered != nil {
			pr.recovered()
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
