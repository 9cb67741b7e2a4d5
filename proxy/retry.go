package proxy

import (
	"context"
	"math/rand/v2"
	"time"
)

// backoff returns the pause after the given number of failures: base
// doubled for each failure after the first, plus up to half again at
// random so that clients failing together spread out, and at most max.
func backoff(failures int, base, max time.Duration) time.Duration {
	d := min(base, max)
	for i := 1; i < failures && d < max; i++ {
		d = min(2*d, max)
	}
	return min(d+rand.N(d/2+1), max)
}

// sleep waits d, or less if ctx ends or wake is closed (a nil wake never
// is); it reports false if ctx ended.
func sleep(ctx context.Context, d time.Duration, wake <-chan struct{}) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-wake:
		return true
	case <-ctx.Done():
		return false
	}
}
