//go:build e2e

package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
	"github.com/smtppool/smtppool/internal/rawsmtp"
)

// TestLostRepliesAgainstTheBinary is issue 16's item 3 against the real
// binary with its default retry settings, on a raw-socket upstream (no
// Debian server can lose its reply to order or send a reply line of 2,100
// bytes):
//   - an upstream that keeps every message and drops the connection
//     before its reply (the README's ambiguous case) got 34 copies of one
//     message in 2 minutes and the client finally 451; now it gets the
//     message twice, the client gets 451 at once, and the log says
//     ambiguous;
//   - an upstream whose final reply is "250" and a line of 2,100 bytes
//     got 9 copies in 20 s, the reply taken for lost; now that 250 is the
//     verdict: one copy, and the client hears 250.
//
// Both with BDAT (the upstream offers CHUNKING) and with DATA.
func TestLostRepliesAgainstTheBinary(t *testing.T) {
	tests := []struct {
		name     string
		verdict  string // "" keeps the message and drops the connection
		cut      bool   // the verdict without its line end, then the connection closed
		wantCode int
		wantKept int
	}{
		{"dropped before every reply", "", false, 451, 2},
		{"a 250 of 2,100 bytes", "250 2.0.0 Ok: queued as " + strings.Repeat("Q", 2100), false, 250, 1},
		// Neither acceptance nor refusal: a lost reply (before, the
		// message was sent 34 times in the retry window).
		{"a 354 to the whole message", "354 Go ahead", false, 451, 2},
		// The code arrived: the verdict (before, a lost reply, and a
		// second copy).
		{"a 250 cut short after its code", "250 2.0.0 Ok: qu", true, 250, 1},
	}
	for _, tt := range tests {
		for _, chunking := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s, chunking %v", tt.name, chunking), func(t *testing.T) {
				up, err := rawsmtp.Start(rawsmtp.Options{
					Chunking: chunking,
					Cut:      tt.cut,
					Verdict:  func(int, string) string { return tt.verdict },
				})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(up.Close)
				proxy := startProxy(t, up.Addr(), map[string]string{"SMTPPOOL_UPSTREAM_TLS": "none"})
				code, text, took, err := sendForVerdict(t, proxy.Addr, peers.NewMessages("lost-reply", 1)[0])
				t.Logf("client: %d %.80s (after %v); upstream kept %d copies over %d connections",
					code, text, took, len(up.Kept()), up.Conns())
				if err != nil || code != tt.wantCode {
					t.Fatalf("end of data: %d %s (err %v), want %d", code, text, err, tt.wantCode)
				}
				if n := len(up.Kept()); n != tt.wantKept {
					t.Errorf("upstream kept the message %d times, want %d", n, tt.wantKept)
				}
				if tt.wantCode == 451 {
					if !strings.HasPrefix(text, "4.4.0 ") {
						t.Errorf("client got %q, want 451 4.4.0", text)
					}
					if !strings.Contains(proxy.Log(), "ambiguous=true") {
						t.Errorf("smtppool's log does not say ambiguous")
					}
				}
			})
		}
	}
}

// TestLostReplyWithSmtpSink is the ambiguous case with real software:
// smtp-sink -q . keeps (dumps) each message and disconnects without a
// reply to its final dot. With the default settings the message is sent
// once more, and no third time: smtp-sink has two copies, the client gets
// 451 4.4.0, and the log says ambiguous.
func TestLostReplyWithSmtpSink(t *testing.T) {
	sink := startSink(t, true, "-q", ".")
	proxy := startProxy(t, sink.Addr, map[string]string{"SMTPPOOL_UPSTREAM_TLS": "none"})
	msg := peers.NewMessages("lost-reply-sink", 1)[0]
	code, text, took, err := sendForVerdict(t, proxy.Addr, msg)
	t.Logf("client: %d %s (after %v)", code, text, took)
	if err != nil || code != 451 || !strings.HasPrefix(text, "4.4.0 ") {
		t.Fatalf("end of data: %d %s (err %v), want 451 4.4.0", code, text, err)
	}
	if !strings.Contains(proxy.Log(), "ambiguous=true") {
		t.Errorf("smtppool's log does not say ambiguous")
	}
	box, err := sink.Dumped()
	if err != nil {
		t.Fatal(err)
	}
	if n := len(box[msg.ID]); n != 2 {
		t.Errorf("smtp-sink kept %d copies, want 2 (%v)", n, sink.Counters())
	}
}

// sendForVerdict sends msg through the proxy at addr with DATA and returns
// the reply to its end of data, and how long after the message it came.
// The client waits up to 60 s for it, as long as any of these tests may
// take to give a verdict.
func sendForVerdict(t *testing.T, addr string, msg peers.Message) (code int, text string, took time.Duration, err error) {
	t.Helper()
	c, err := peers.Open(addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Quit() })
	c.SetDeadline(time.Now().Add(60 * time.Second))
	if err := c.Begin(msg); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteData(msg.Bytes()); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	code, text, err = c.Cmd("")
	return code, text, time.Since(start).Round(time.Millisecond), err
}
