package peers

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestGroupRunsCleanupsNewestFirstOnce(t *testing.T) {
	g := NewGroup(context.Background())
	var order []int
	for i := range 3 {
		g.Cleanup(func() { order = append(order, i) })
	}
	g.Errorf("stop %s", "failed")
	err := g.Close()
	if want := []int{2, 1, 0}; !slices.Equal(order, want) {
		t.Errorf("cleanups ran in order %v; want %v", order, want)
	}
	if err == nil || err.Error() != "stop failed" {
		t.Errorf("Close returned %v; want the failure a cleanup reported", err)
	}
	g.Close()
	if len(order) != 3 {
		t.Errorf("a second Close ran cleanups again: %v", order)
	}
	ran := false
	g.Cleanup(func() { ran = true })
	if !ran {
		t.Errorf("a cleanup registered after Close did not run at once")
	}
}

func TestGroupClosesWhenItsContextEnds(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	g := NewGroup(ctx)
	stopped := make(chan struct{})
	g.Cleanup(func() { close(stopped) })
	cancel()
	<-stopped // the process a cleanup stops is stopped without Close
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() { g.Close() }) // each returns only once every cleanup has run
	}
	wg.Wait()
}

func TestPollGivesUpWhenTheContextEnds(t *testing.T) {
	ctx, cancel := context.WithCancelCause(context.Background())
	cause := errors.New("interrupted")
	cancel(cause)
	err := Poll(ctx, time.Hour, "nothing", func() (bool, string) { return false, "3/4 done" })
	if !errors.Is(err, cause) || !strings.Contains(err.Error(), "3/4 done") {
		t.Errorf("Poll returned %v; want the cause and the last status", err)
	}
}

func TestParseCounters(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want SinkCounters
	}{
		{"", SinkCounters{}},
		{"sess=1 quit=1 mesg=1\r", SinkCounters{1, 1, 1}},
		{"sess=1 quit=1 mesg=1\rsess=2 quit=1 mesg=5\r", SinkCounters{2, 1, 5}},
		{"sess=1 quit=1 mesg=1\rsess=2 qu", SinkCounters{1, 1, 1}}, // the last record is not whole yet
	} {
		if got := parseCounters([]byte(tc.in)); got != tc.want {
			t.Errorf("parseCounters(%q) = %v; want %v", tc.in, got, tc.want)
		}
	}
}

func TestPaddedMessage(t *testing.T) {
	m := NewMessages("padded", 1)[0]
	for _, size := range []int{0, 1000, 256 << 10} {
		b := m.Padded(size).Bytes()
		if len(b) < size || len(b) > max(size, len(m.Bytes()))+78 {
			t.Errorf("Padded(%d) is %d bytes long", size, len(b))
		}
		if !strings.HasSuffix(string(b), "\r\n") {
			t.Errorf("Padded(%d) does not end in CRLF", size)
		}
	}
}

func TestTail(t *testing.T) {
	if got, want := Tail("a\nb\nc\n", 2), "[... 1 lines before]\nb\nc"; got != want {
		t.Errorf("Tail = %q; want %q", got, want)
	}
	if got := Tail("a\nb", 5); got != "a\nb" {
		t.Errorf("Tail of a short text = %q; want it whole", got)
	}
}

// A dump that ran while connections churned lists more than were ever open
// together; the sockets of two dumps in a row were open together.
func TestTogetherCountsOnlySocketsOfTwoDumpsInARow(t *testing.T) {
	const header = "0      0      127.0.0.1:%d 127.0.0.1:2526 ino:%d sk:%x cgroup:/ <->\n"
	dump := func(ids ...int) map[string]bool {
		var b strings.Builder
		for _, id := range ids {
			fmt.Fprintf(&b, header, 40000+id, 7000+id, id)
		}
		socks, err := parseSockets(b.String())
		if err != nil {
			t.Fatal(err)
		}
		if len(socks) != len(ids) {
			t.Fatalf("parsed %d sockets, want %d: %v", len(socks), len(ids), socks)
		}
		return socks
	}
	// Three sessions, one renewed during the second dump: the second dump
	// lists the old one (closed after it was listed) and the new one.
	first, second, third := dump(1, 2, 3), dump(1, 2, 3, 4), dump(1, 2, 4)
	if n := together(first, second); n != 3 {
		t.Errorf("together(first, second) = %d, want 3", n)
	}
	if n := together(second, third); n != 3 {
		t.Errorf("together(second, third) = %d, want 3", n)
	}
	if n := together(nil, first); n != 0 {
		t.Errorf("together(nil, first) = %d, want 0", n)
	}
	if _, err := parseSockets("0 0 127.0.0.1:40001 127.0.0.1:2526 ino:1\n"); err == nil {
		t.Errorf("a socket without its cookie was parsed")
	}
}
