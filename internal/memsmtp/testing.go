package memsmtp

import (
	"testing"
	"time"
)

// Repeat returns n copies of f, for Inject.
func Repeat(f Fault, n int) []Fault {
	fs := make([]Fault, n)
	for i := range fs {
		fs[i] = f
	}
	return fs
}

// WaitFor polls cond until it holds, and fails the test if it does not
// within 10 seconds.
func WaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
