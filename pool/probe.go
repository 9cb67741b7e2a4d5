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

// prober lets one dial at a time probe an upstream that failed to set up a
// session, with backoff between probes. While a probe is in flight, other
// dials wait for its outcome; while none is due, they fail at once with the
// last error.
type prober struct {
	base, max time.Duration
	up        atomic.Bool // the last dial or health check succeeded
	log       *slog.Logger

	mu       sync.Mutex
	down     bool          // the last session set-up failed
	lastErr  error         // why
	inFlight chan struct{} // closed when the probe in flight ends; nil if none
	next     time.Time     // when the next probe is due
	delay    time.Duration // the pause before the next probe after a failure
}

// dial sets up a session with connect, through the prober's gate. With
// noWait, it does not wait for a probe in flight either, but fails at once,
// so that the caller can turn to another upstream.
func (pr *prober) dial(ctx context.Context, connect func(context.Context) (*session, error), noWait bool) (*session, error) {
	for {
		pr.mu.Lock()
		switch {
		case !pr.down:
			pr.mu.Unlock()
			s, err := connect(ctx)
			pr.record(ctx, err, false)
			return s, err
		case pr.inFlight != nil && noWait:
			pr.mu.Unlock()
			return nil, fmt.Errorf("%w: probe in flight", ErrUpstreamDown)
		case pr.inFlight != nil:
			wait := pr.inFlight
			pr.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-ctx.Done():
				return nil, fmt.Errorf("waiting for the upstream probe: %w", context.Cause(ctx))
			}
		case time.Now().Before(pr.next):
			err := pr.lastErr
			pr.mu.Unlock()
			return nil, fmt.Errorf("%w: %w", ErrUpstreamDown, err)
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
	// A refusal over the connection limit comes from an upstream that is
	// up: the effective cap deals with it.
	if err != nil && (ctx.Err() != nil || errors.Is(err, ErrConnLimit)) {
		return
	}
	pr.mu.Lock()
	defer pr.mu.Unlock()
	if err == nil {
		if pr.down {
			pr.log.Info("upstream reachable again")
		}
		pr.down, pr.lastErr, pr.delay = false, nil, 0
		pr.up.Store(true)
		return
	}
	if !pr.down {
		pr.log.Warn("upstream unreachable; probing it, one dial at a time", "err", err)
	}
	switch {
	case !pr.down:
		pr.delay = pr.base
	case probe:
		pr.delay = min(2*pr.delay, pr.max)
	}
	pr.down, pr.lastErr = true, err
	pr.up.Store(false)
	pr.next = time.Now().Add(pr.delay + rand.N(pr.delay/2+1))
}
