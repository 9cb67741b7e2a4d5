//go:build e2e

package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
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
		wantCode int
		wantKept int
	}{
		{"dropped before every reply", "", 451, 2},
		{"a 250 of 2,100 bytes", "250 2.0.0 Ok: queued as " + strings.Repeat("Q", 2100), 250, 1},
		// Neither acceptance nor refusal: a lost reply (before, the
		// message was sent 34 times in the retry window).
		{"a 354 to the whole message", "354 Go ahead", 451, 2},
		// The code arrived: the verdict (before, a lost reply, and a
		// second copy).
		{"a 250 cut short after its code", cutVerdict + "250 2.0.0 Ok: qu", 250, 1},
	}
	for _, tt := range tests {
		for _, chunking := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s, chunking %v", tt.name, chunking), func(t *testing.T) {
				up := startScriptedUpstream(t, chunking, tt.verdict)
				proxy := startProxy(t, up.addr(), map[string]string{"SMTPPOOL_UPSTREAM_TLS": "none"})
				msg := peers.NewMessages("lost-reply", 1)[0]
				c, err := peers.Open(proxy.Addr, 10*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Quit()
				c.SetDeadline(time.Now().Add(60 * time.Second))
				if err := c.Begin(msg); err != nil {
					t.Fatal(err)
				}
				if err := c.WriteData(msg.Bytes()); err != nil {
					t.Fatal(err)
				}
				start := time.Now()
				code, text, err := c.Cmd("")
				t.Logf("client: %d %.80s (after %v); upstream kept %d copies over %d connections",
					code, text, time.Since(start).Round(time.Millisecond), up.kept(), up.conns())
				if err != nil || code != tt.wantCode {
					t.Fatalf("end of data: %d %s (err %v), want %d", code, text, err, tt.wantCode)
				}
				if n := up.kept(); n != tt.wantKept {
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
	c, err := peers.Open(proxy.Addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Quit()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	if err := c.Begin(msg); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteData(msg.Bytes()); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	code, text, err := c.Cmd("")
	t.Logf("client: %d %s (after %v)", code, text, time.Since(start).Round(time.Millisecond))
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

// scriptedUpstream is an SMTP server on a raw socket that gives every
// message the same verdict: a reply line as written, or "" to keep the
// message and drop the connection instead.
type scriptedUpstream struct {
	ln       net.Listener
	chunking bool
	verdict  string

	mu            sync.Mutex
	nKept, nConns int
	wg            sync.WaitGroup
	open          map[net.Conn]bool
}

func startScriptedUpstream(t *testing.T, chunking bool, verdict string) *scriptedUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &scriptedUpstream{ln: ln, chunking: chunking, verdict: verdict, open: map[net.Conn]bool{}}
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			u.mu.Lock()
			u.nConns++
			u.open[conn] = true
			u.mu.Unlock()
			u.wg.Add(1)
			go func() {
				defer u.wg.Done()
				u.serve(conn)
				conn.Close()
				u.mu.Lock()
				delete(u.open, conn)
				u.mu.Unlock()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		u.mu.Lock()
		for c := range u.open {
			c.Close()
		}
		u.mu.Unlock()
		u.wg.Wait()
	})
	return u
}

func (u *scriptedUpstream) addr() string { return u.ln.Addr().String() }

func (u *scriptedUpstream) kept() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.nKept
}

func (u *scriptedUpstream) conns() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.nConns
}

func (u *scriptedUpstream) serve(conn net.Conn) {
	conn.SetDeadline(time.Now().Add(2 * time.Minute))
	r := bufio.NewReader(conn)
	say := func(s string) bool { _, err := io.WriteString(conn, s+"\r\n"); return err == nil }
	if !say("220 scripted.e2e.test ESMTP") {
		return
	}
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		verb, arg, _ := strings.Cut(strings.TrimRight(line, "\r\n"), " ")
		reply := "250 2.0.0 Ok"
		switch strings.ToUpper(verb) {
		case "EHLO":
			reply = "250-scripted.e2e.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
			if u.chunking {
				reply += "250-CHUNKING\r\n"
			}
			reply += "250 SIZE 10485760"
		case "QUIT":
			say("221 2.0.0 Bye")
			return
		case "DATA":
			if !say("354 Go ahead") {
				return
			}
			for {
				l, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if l == ".\r\n" {
					break
				}
			}
			if !u.finish(conn, say) {
				return
			}
			continue
		case "BDAT":
			fields := strings.Fields(arg)
			size, err := strconv.Atoi(fields[0])
			if err != nil {
				return
			}
			if _, err := io.CopyN(io.Discard, r, int64(size)); err != nil {
				return
			}
			if len(fields) < 2 {
				break // not the last chunk
			}
			if !u.finish(conn, say) {
				return
			}
			continue
		}
		if !say(reply) {
			return
		}
	}
}

// cutVerdict in front of a verdict has it written without its line end,
// and the connection closed: a reply cut short.
const cutVerdict = "cut:"

// finish keeps the whole message and gives the verdict; false drops the
// connection.
func (u *scriptedUpstream) finish(conn net.Conn, say func(string) bool) bool {
	u.mu.Lock()
	u.nKept++
	u.mu.Unlock()
	if cut, ok := strings.CutPrefix(u.verdict, cutVerdict); ok {
		io.WriteString(conn, cut)
		return false
	}
	return u.verdict != "" && say(u.verdict)
}
