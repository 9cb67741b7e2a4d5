package pool

import (
	"math"
	"testing"
	"time"
)

// TestDrainWatch: the queue is judged by the pace at which sessions were
// handed out since it formed (within the last minute), not diluted by the
// quiet time before it, and is late when it cannot drain within the
// acquire timeout at that pace.
func TestDrainWatch(t *testing.T) {
	d := drainWatch{timeout: 3 * time.Minute, minSpan: 10 * time.Second}
	t0 := time.Unix(1_000_000, 0)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	type step struct {
		at       float64 // seconds after t0
		acquired int64
		waiting  int32
		want     drainEstimate
	}
	steps := []step{
		// A quiet minute: 10 sessions handed out, none waiting.
		{0, 0, 0, drainEstimate{}},
		{30, 5, 0, drainEstimate{}},
		{60, 10, 0, drainEstimate{}},
		// A burst: 2,000 clients wait; too early to judge.
		{61, 10, 2000, drainEstimate{waiting: 2000}},
		{65, 50, 1960, drainEstimate{waiting: 1960}},
		// 10 s on, 100 handed out since the queue formed (the sample
		// before it, at 60 s): 600 a minute, 1,900 drain in 190 s.
		{70, 110, 1900, drainEstimate{waiting: 1900, perMinute: 600, time: 190 * time.Second, late: true}},
		// The pace rises: 1,000 a minute since 60 s; 1,000 drain in 60 s.
		{90, 510, 1000, drainEstimate{waiting: 1000, perMinute: 1000, time: time.Minute}},
		// The queue is gone.
		{95, 600, 0, drainEstimate{}},
		// A new queue that nobody serves: it never drains.
		{100, 600, 5, drainEstimate{waiting: 5}},
		{111, 600, 5, drainEstimate{waiting: 5, time: math.MaxInt64, late: true}},
	}
	for _, s := range steps {
		got := d.observe(at(s.at), s.acquired, s.waiting)
		if got != s.want {
			t.Errorf("at %vs (%d handed out, %d waiting): %+v, want %+v", s.at, s.acquired, s.waiting, got, s.want)
		}
	}
	// A long queue is judged over the last minute only.
	d = drainWatch{timeout: 3 * time.Minute, minSpan: 10 * time.Second}
	for i := range 181 { // three minutes, a sample a second
		// 2 a second for the first two minutes, then 1 a second.
		acquired := int64(min(i, 120)*2 + max(i-120, 0))
		got := d.observe(at(float64(i)), acquired, 1000)
		if i == 180 && (got.perMinute != 60 || got.time != 1000*time.Second || !got.late) {
			t.Errorf("after three minutes at 120, then 60 a minute: %+v, want the last minute's 60 a minute, 1,000 s, late", got)
		}
	}
}
