package proxy

import (
	"testing"
	"time"
)

func TestBackoffDoublesWithJitterUpToMax(t *testing.T) {
	const base, max = 250 * time.Millisecond, 4 * time.Second
	for failures, least := range map[int]time.Duration{1: base, 2: 2 * base, 3: 4 * base, 4: 8 * base, 5: max, 40: max} {
		for range 100 {
			d := backoff(failures, base, max)
			if d < least || d > max || d > least*3/2 {
				t.Fatalf("backoff after %d failures = %v, want within [%v, %v] and at most %v", failures, d, least, least*3/2, max)
			}
		}
	}
}

func TestBackoffDoesNotOverflow(t *testing.T) {
	for _, failures := range []int{31, 64, 1000} {
		if d := backoff(failures, 20*time.Second, time.Minute); d != time.Minute {
			t.Errorf("backoff(%d, 20s, 1m) = %v, want 1m", failures, d)
		}
	}
}
