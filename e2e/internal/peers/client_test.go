package peers

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/smtppool/smtppool/internal/memsmtp"
)

// TestSendBurstLimitedKeepsItsLimit sends 40 messages, 5 at a time, to an
// in-memory server that holds each end of DATA for 20 ms: every message is
// accepted, the server never holds more than 5 messages at once, and it
// does hold several, so the limit is what held the clients back. (The
// server's count of open connections would lag: it sees a close a moment
// after the client has moved on.)
func TestSendBurstLimitedKeepsItsLimit(t *testing.T) {
	const messages, limit = 40, 5
	var holding, most atomic.Int64
	srv, err := memsmtp.Start(memsmtp.Options{OnMessage: func(memsmtp.Message) {
		n := holding.Add(1)
		for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
		}
		time.Sleep(20 * time.Millisecond)
		holding.Add(-1)
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	results := SendBurstLimited(srv.Addr, NewMessages("limited", messages), limit, SendOptions{Timeout: 10 * time.Second})
	for _, r := range results {
		if !r.Accepted() {
			t.Errorf("not accepted: %v", r)
		}
		if r.Local == "" {
			t.Errorf("%s: no local address recorded", r.Msg.ID)
		}
	}
	t.Logf("%d messages, limit %d: the server held at most %d at once", messages, limit, most.Load())
	if most.Load() > limit {
		t.Errorf("the server held %d messages at once; want at most %d", most.Load(), limit)
	}
	if most.Load() < 2 {
		t.Errorf("the server held at most %d message at once: the clients did not run concurrently", most.Load())
	}
}
