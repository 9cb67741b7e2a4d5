//go:build e2e

package e2e

import (
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// TestSlowUpstreamExactAck proves that the client's 250 is the upstream's
// 250, not an early one: smtp-sink waits 2 seconds before it answers the
// final dot, so the client's answer must take at least as long.
func TestSlowUpstreamExactAck(t *testing.T) {
	const delay = 2 * time.Second
	sink := startSink(t, false, "-W", ".:2")
	proxy := startProxy(t, sink.Addr, nil)

	msgs := peers.NewMessages("slow", 2)
	for _, m := range msgs {
		r := peers.SendMail(proxy.Addr, m, peers.SendOptions{Timeout: 30 * time.Second})
		t.Logf("%s: %d at %s after %v from the final dot (upstream delay %v)",
			m.ID, r.Code, r.Stage, r.DotToReply.Round(time.Millisecond), delay)
		if !r.Accepted() {
			t.Fatalf("client not accepted: %v", r)
		}
		if r.DotToReply < delay {
			t.Errorf("the client got 250 %v after its final dot, sooner than the upstream's %v delay: the proxy answered before the upstream did",
				r.DotToReply.Round(time.Millisecond), delay)
		}
	}
	waitFor(t, 5*time.Second, "smtp-sink to count the messages", func() (bool, string) {
		c := sink.Counters()
		return c.Mesg == len(msgs), c.String()
	})
	t.Logf("smtp-sink: %v", sink.Counters())
}
