package pool

import (
	"testing"
	"time"

	"github.com/smtppool/smtppool/internal/memsmtp"
)

// TestWaitingCountsInTheQueue: a caller that waits for its turn before it
// calls Acquire (the proxy's transactions waiting for buffer space) counts
// among the transactions waiting, in PendingAcquires and in the drain
// estimate: a queue that nobody serves is judged late.
func TestWaitingCountsInTheQueue(t *testing.T) {
	p, err := New(Config{Addr: "127.0.0.1:1", TLS: TLSNone, AcquireTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	var dones []func()
	for range 5 {
		dones = append(dones, p.Waiting())
	}
	if n := p.Stat().PendingAcquires; n != 5 {
		t.Errorf("PendingAcquires %d with 5 waiting for their turn, want 5", n)
	}
	memsmtp.WaitFor(t, "the queue to be judged late", func() bool { return p.Stat().DrainLate })
	for _, done := range dones {
		done()
	}
	if n := p.Stat().PendingAcquires; n != 0 {
		t.Errorf("PendingAcquires %d once they are done, want 0", n)
	}
}
