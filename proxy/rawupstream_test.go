package proxy_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smtppool/smtppool/pool"
	"github.com/smtppool/smtppool/proxy"
)

// rawUpstream is an upstream on a raw socket, for replies that go-smtp's
// server cannot make: a final reply line of any length or shape, a reply
// no command asked for, a connection dropped after the message was kept.
// It speaks just enough SMTP for the proxy: EHLO (with PIPELINING, and
// CHUNKING if chunking), MAIL, RCPT, DATA, BDAT, RSET, NOOP and QUIT.
type rawUpstream struct {
	t        *testing.T
	ln       net.Listener
	chunking bool
	// rcptDelay delays the reply to each RCPT, so that it comes in a
	// packet of its own.
	rcptDelay time.Duration
	// verdict gives the final reply to the n-th message (from 1, over all
	// connections), as written, CRLF added; "" drops the connection
	// instead. A message is kept unless its verdict starts with 4 or 5.
	verdict func(n int, msg string) string
	// cut writes each verdict without its line end and then closes the
	// connection, as a connection cut in the middle of the reply.
	cut bool
	// after, if set, runs on the connection once the n-th message's
	// verdict is written.
	after func(n int, conn net.Conn)
	// onCommand, if set, runs before the reply to each command (its verb
	// in upper case) on the conn-th connection (from 1): it may write a
	// reply no command asked for, or wait for what the client sends next
	// (r.Peek) before the reply goes out.
	onCommand func(conn int, verb string, r *bufio.Reader, write func(string) error)

	mu    sync.Mutex
	n     int      // messages received whole
	kept  []string // messages kept, in order
	conns int
	live  map[net.Conn]bool
	wg    sync.WaitGroup
}

// startRawUpstream listens on 127.0.0.1:0 and serves until the test ends.
func startRawUpstream(t *testing.T, u *rawUpstream) *rawUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u.t, u.ln, u.live = t, ln, map[net.Conn]bool{}
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			u.mu.Lock()
			u.conns++
			n := u.conns
			u.live[conn] = true
			u.mu.Unlock()
			u.wg.Add(1)
			go func() {
				defer u.wg.Done()
				u.serve(conn, n)
				u.mu.Lock()
				delete(u.live, conn)
				u.mu.Unlock()
				conn.Close()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		u.mu.Lock()
		for c := range u.live {
			c.Close()
		}
		u.mu.Unlock()
		u.wg.Wait()
	})
	return u
}

func (u *rawUpstream) addr() string { return u.ln.Addr().String() }

// Kept returns the messages kept so far.
func (u *rawUpstream) Kept() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]string(nil), u.kept...)
}

// Conns returns the connections accepted so far.
func (u *rawUpstream) Conns() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.conns
}

func (u *rawUpstream) serve(conn net.Conn, n int) {
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(conn)
	var wmu sync.Mutex // after may write from another goroutine
	write := func(s string) error {
		wmu.Lock()
		defer wmu.Unlock()
		_, err := io.WriteString(conn, s)
		return err
	}
	if write("220 raw.test ESMTP\r\n") != nil {
		return
	}
	var body strings.Builder
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		line = strings.TrimRight(line, "\r\n")
		verb, arg, _ := strings.Cut(line, " ")
		verb = strings.ToUpper(verb)
		if u.onCommand != nil {
			u.onCommand(n, verb, r, write)
		}
		var reply string
		switch verb {
		case "EHLO":
			reply = "250-raw.test\r\n250-PIPELINING\r\n"
			if u.chunking {
				reply += "250-CHUNKING\r\n"
			}
			reply += "250 8BITMIME\r\n"
		case "MAIL":
			body.Reset()
			reply = "250 2.1.0 Ok\r\n" // as Postfix, Exchange and Gmail answer MAIL
		case "RSET", "NOOP":
			body.Reset()
			reply = "250 2.0.0 Ok\r\n"
		case "RCPT":
			if u.rcptDelay > 0 {
				time.Sleep(u.rcptDelay) // what the fake is for: a reply in its own packet
			}
			reply = "250 2.1.5 Ok\r\n"
		case "QUIT":
			write("221 2.0.0 Bye\r\n")
			return
		case "DATA":
			if write("354 Go ahead\r\n") != nil {
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
				body.WriteString(strings.TrimPrefix(l, "."))
			}
			if !u.finish(conn, body.String(), write) {
				return
			}
			continue
		case "BDAT":
			size, last, ok := parseBDAT(arg) // as in the fuzz test
			if !ok {
				reply = "501 5.5.4 Bad BDAT\r\n"
				break
			}
			chunk := make([]byte, size)
			if _, err := io.ReadFull(r, chunk); err != nil {
				return
			}
			body.Write(chunk)
			if !last {
				reply = fmt.Sprintf("250 2.0.0 %d bytes\r\n", size)
				break
			}
			if !u.finish(conn, body.String(), write) {
				return
			}
			body.Reset()
			continue
		default:
			reply = "502 5.5.2 Unknown command\r\n"
		}
		if write(reply) != nil {
			return
		}
	}
}

// finish gives the verdict on a whole message; false means the
// connection is to be dropped.
func (u *rawUpstream) finish(conn net.Conn, msg string, write func(string) error) bool {
	u.mu.Lock()
	u.n++
	n := u.n
	u.mu.Unlock()
	verdict := u.verdict(n, msg)
	if verdict == "" || verdict[0] != '4' && verdict[0] != '5' {
		u.mu.Lock()
		u.kept = append(u.kept, msg)
		u.mu.Unlock()
	}
	if verdict == "" {
		return false
	}
	if u.cut {
		write(verdict)
		return false
	}
	if write(verdict+"\r\n") != nil {
		return false
	}
	if u.after != nil {
		u.after(n, conn)
	}
	return true
}

// newRawEnv runs a proxy in front of u, with no AUTH and no TLS, and the
// short retry pauses of newEnv.
func newRawEnv(t *testing.T, u *rawUpstream, pc pool.Config, cfg proxy.Config) *testEnv {
	t.Helper()
	pc.Addr, pc.TLS = u.addr(), pool.TLSNone
	if pc.ProbeBackoff == 0 {
		pc.ProbeBackoff, pc.ProbeBackoffMax = time.Millisecond, 5*time.Millisecond
	}
	p, err := pool.New(pc)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.RetryBackoff == 0 {
		cfg.RetryBackoff, cfg.RetryBackoffMax = time.Millisecond, 5*time.Millisecond
	}
	srv, addr := serve(t, p, cfg)
	return &testEnv{pool: p, srv: srv, addr: addr}
}
