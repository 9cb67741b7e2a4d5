package pool

import (
	"math"
	"time"
)

// drainWindow is how far back the rate at which sessions are handed out
// is measured: the last minute.
const drainWindow = time.Minute

// drainWatch judges whether the transactions waiting for a session can all
// get one within the acquire timeout, at the rate at which sessions were
// handed out over the last minute (or since the queue formed, if later: a
// burst is judged by its own pace, not by the quiet minute before it). It
// is fed by the pool's background loop; the pool's lock-free counters are
// its input.
type drainWatch struct {
	// timeout is the acquire timeout the waiting transactions have.
	timeout time.Duration
	// minSpan is the least time the queue must have existed before it is
	// judged: a rate needs some observation.
	minSpan time.Duration

	samples   []drainSample // (time, sessions handed out) over the window, oldest first
	busySince time.Time     // when the queue formed; zero while there is none
}

type drainSample struct {
	at       time.Time
	acquired int64
}

// drainEstimate is what drainWatch makes of the queue.
type drainEstimate struct {
	// waiting is the number of transactions waiting.
	waiting int32
	// perMinute is the rate at which sessions were handed out.
	perMinute float64
	// time is how long the waiting transactions would take to get a
	// session at that rate: 0 with none waiting or not judged yet,
	// math.MaxInt64 when no session was handed out.
	time time.Duration
	// late says time is above the acquire timeout.
	late bool
}

// observe records, at now, the sessions handed out so far and the
// transactions waiting, and judges the queue.
func (d *drainWatch) observe(now time.Time, acquired int64, waiting int32) drainEstimate {
	d.samples = append(d.samples, drainSample{now, acquired})
	for len(d.samples) > 1 && now.Sub(d.samples[1].at) >= drainWindow {
		d.samples = d.samples[1:]
	}
	if waiting <= 0 {
		d.busySince = time.Time{}
		return drainEstimate{}
	}
	if d.busySince.IsZero() {
		d.busySince = now
	}
	// The oldest sample in the window, from the last one taken without
	// a queue on: the rate counts from then.
	from := d.samples[0]
	for _, s := range d.samples {
		if !s.at.Before(d.busySince) {
			break
		}
		from = s
	}
	span := now.Sub(from.at)
	e := drainEstimate{waiting: waiting}
	if span < d.minSpan || span <= 0 {
		return e
	}
	e.perMinute = float64(acquired-from.acquired) / span.Minutes()
	if e.perMinute <= 0 {
		e.time = math.MaxInt64
	} else {
		e.time = time.Duration(float64(waiting) / e.perMinute * float64(time.Minute))
	}
	e.late = e.time > d.timeout
	return e
}
