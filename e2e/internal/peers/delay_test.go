package peers

import (
	"bufio"
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDelayLinkDelaysEachWay: a round trip through the link takes about
// twice its one-way delay, bytes arrive intact and in order, and the
// end of one direction reaches the other side after the bytes before it.
func TestDelayLinkDelaysEachWay(t *testing.T) {
	const oneWay = 15 * time.Millisecond
	c, l := dialEchoThroughLink(t, oneWay)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	for i, line := range []string{"first\n", strings.Repeat("x", 200<<10) + "\n", "last\n"} {
		start := time.Now()
		io.WriteString(c, line)
		got, err := r.ReadString('\n')
		if err != nil || got != line {
			t.Fatalf("round trip %d: got %d bytes, %v", i, len(got), err)
		}
		// The link sets its timers early by what it learnt of their
		// lateness: a crossing may be early by a millisecond or so.
		if rtt := time.Since(start); rtt < 2*oneWay-3*time.Millisecond {
			t.Errorf("round trip %d took %v, much less than twice the one-way delay %v", i, rtt, oneWay)
		}
	}
	l.SetDelay(0)
	c.(*net.TCPConn).CloseWrite()
	if rest, err := io.ReadAll(r); err != nil || len(rest) != 0 {
		t.Errorf("after the half-close: %q, %v; want the end of the echo", rest, err)
	}
}

func TestLogCounterReadsOnlyWhatIsNew(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "postfix.log")
	os.WriteFile(path, []byte("old status=sent\n"), 0o644)
	p := newPostfix(dir, 1)
	c := p.CountFromNow("status=sent")
	f, _ := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	defer f.Close()
	f.WriteString("a status=sent\nb status=deferred\nc status=se")
	if n := c.Count(); n != 1 {
		t.Errorf("Count = %d, want 1 (the old line and the unfinished one left out)", n)
	}
	f.WriteString("nt\n")
	if n := c.Count(); n != 2 {
		t.Errorf("Count = %d, want 2 once the line is whole", n)
	}
}

// TestDelayLinkIsRightOnAverage: however late the machine's timers fire,
// the mean delay of many crossings is the one set, within half a
// millisecond.
func TestDelayLinkIsRightOnAverage(t *testing.T) {
	const oneWay = 2500 * time.Microsecond
	c, l := dialEchoThroughLink(t, oneWay)
	buf := make([]byte, 1)
	for range 20 { // lets the link learn its timers
		c.Write(buf)
		io.ReadFull(c, buf)
	}
	l.SetDelay(oneWay)
	start := time.Now()
	const rounds = 100
	for range rounds {
		c.Write(buf)
		io.ReadFull(c, buf)
	}
	rtt := time.Since(start) / rounds
	mean, n := l.Measured()
	t.Logf("mean one-way delay %v over %d crossings; mean round trip %v", mean, n, rtt)
	if d := mean - oneWay; d < -500*time.Microsecond || d > 500*time.Microsecond {
		t.Errorf("mean one-way delay %v, want %v ± 0.5 ms", mean, oneWay)
	}
	if d := rtt - 2*oneWay; d < -500*time.Microsecond || d > 1500*time.Microsecond {
		t.Errorf("mean round trip %v, want %v, a little more for the echo", rtt, 2*oneWay)
	}
}

// TestDelayLinkLearnsWithinBounds: timers late because the machine is
// loaded do not make the link set them ever earlier, and early timers
// bring it back.
func TestDelayLinkLearnsWithinBounds(t *testing.T) {
	l := &DelayLink{}
	for range 100 {
		l.learn(20 * time.Millisecond)
	}
	if got := time.Duration(l.early.Load()); got != maxEarly {
		t.Errorf("after late timers, timers set %v early, want the bound %v", got, maxEarly)
	}
	for range 100 {
		l.learn(-time.Millisecond)
	}
	if got := l.early.Load(); got != 0 {
		t.Errorf("after early timers, timers set %v early, want 0", time.Duration(got))
	}
}

// dialEchoThroughLink starts an echo server, which closes once the client
// has closed its side, and a DelayLink of oneWay in front of it, and dials
// the link; all end with the test.
func dialEchoThroughLink(t *testing.T, oneWay time.Duration) (net.Conn, *DelayLink) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c)
	}()
	g := NewGroup(context.Background())
	t.Cleanup(func() { g.Close() })
	l, err := StartDelayLink(g, ln.Addr().String(), oneWay)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", l.Addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, l
}
