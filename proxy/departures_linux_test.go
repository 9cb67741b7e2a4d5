//go:build linux

package proxy_test

import (
	"crypto/tls"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
	"github.com/smtppool/smtppool/proxy"
)

// waitingClients opens n clients to addr that each send EHLO and MAIL at
// once and then wait for an upstream session of e's pool (the test holds
// the only one), and returns them once all wait.
func waitingClients(t *testing.T, e *testEnv, addr string, n int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, 0, n)
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for range n {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		if _, err := c.Write([]byte("EHLO waiter.test\r\nMAIL FROM:<app@example.com>\r\n")); err != nil {
			t.Fatal(err)
		}
	}
	memsmtp.WaitFor(t, "every client to wait for the upstream session", func() bool { return e.pool.Stat().PendingAcquires == int32(n) })
	return conns
}

// TestWaitingClientCostsOneGoroutine: a client waiting for an upstream
// session costs its connection's goroutine and nothing more; the proxy
// still notices when it leaves (TestClientsThatLeaveWhileWaitingDoNotUseTheUpstream).
// The code before watched each waiting client with a goroutine of its own,
// reading its connection into a 4 KiB buffer: two goroutines per client.
func TestWaitingClientCostsOneGoroutine(t *testing.T) {
	const n = 300
	e := newEnv(t, options{pool: pool.Config{MaxConns: 1}})
	holder := holdSession(t, e)
	before := runtime.NumGoroutine()
	waitingClients(t, e, e.addr, n)
	if extra := runtime.NumGoroutine() - before; extra > n+20 {
		t.Errorf("%d clients waiting for an upstream session run %d more goroutines, want about one each", n, extra)
	}
	finish(t, holder, "user@example.com", message("held"))
}

// TestClientThatResetsWhileWaitingLeavesTheQueue: a client that aborts its
// connection (a reset, not a close) while it waits for an upstream session
// stops waiting at once and never reaches the upstream.
func TestClientThatResetsWhileWaitingLeavesTheQueue(t *testing.T) {
	e := newEnv(t, options{pool: pool.Config{MaxConns: 1}})
	holder := holdSession(t, e)
	conns := waitingClients(t, e, e.addr, 3)
	for _, c := range conns {
		c.(*net.TCPConn).SetLinger(0) // Close sends a reset
		c.Close()
	}
	memsmtp.WaitFor(t, "the reset clients to leave the queue", func() bool { return e.pool.Stat().PendingAcquires == 0 })
	finish(t, holder, "user@example.com", message("held"))
	if n := e.up.Stats().Commands["MAIL"]; n != 1 {
		t.Errorf("upstream saw %d MAIL, want only the holder's", n)
	}
}

// TestClosingTheServerEndsTheWaits: when the server closes the connections
// of clients that wait for an upstream session, they stop waiting at once,
// not at the acquire timeout, and the watching machinery stops with the
// listener.
func TestClosingTheServerEndsTheWaits(t *testing.T) {
	e := newEnv(t, options{pool: pool.Config{MaxConns: 1}, proxy: proxy.Config{AcquireTimeout: time.Minute}})
	holdSession(t, e)
	waitingClients(t, e, e.addr, 20)
	start := time.Now()
	e.srv.Close()
	memsmtp.WaitFor(t, "the waiting clients to stop waiting", func() bool { return e.pool.Stat().PendingAcquires == 0 })
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("the waits ended %v after the server closed", took)
	}
	memsmtp.WaitFor(t, "the departures loop to end with the listener", func() bool {
		buf := make([]byte, 1<<20)
		return !strings.Contains(string(buf[:runtime.Stack(buf, true)]), "(*departures).loop")
	})
}

// TestClosingConnectionsEndsTheWaits: a shutdown's CloseConnections, which
// closes the sockets under the SMTP server, ends the waits of the clients
// whose connections it closes at once, as a client that left would (the
// epoll registration goes with the socket, without an event).
func TestClosingConnectionsEndsTheWaits(t *testing.T) {
	e := newEnv(t, options{pool: pool.Config{MaxConns: 1}})
	holdSession(t, e)
	_, ln := serveListening(t, e.pool, proxy.Config{AcquireTimeout: time.Minute}, "127.0.0.1:0", proxy.ListenConfig{})
	waitingClients(t, e, ln.Addr().String(), 20)
	ln.CloseConnections()
	memsmtp.WaitFor(t, "the waits to end once their connections were closed", func() bool { return e.pool.Stat().PendingAcquires == 0 })
}

// TestTLSClientThatLeavesWhileWaiting: over TLS, a client that resets its
// connection while it waits stops waiting at once, as in plain text. One
// that closes its side (close_notify and a FIN) may have pipelined a QUIT
// that the proxy cannot see in the TLS records
// (TestPipelinedSessionOverTLSIsServedWhileWaiting), so it keeps its place;
// when its turn comes, go-smtp finds the end of its stream, and with an
// upstream that offers PIPELINING (its MAIL waits for a RCPT) nothing of it
// reaches the upstream.
func TestTLSClientThatLeavesWhileWaiting(t *testing.T) {
	e := newEnv(t, options{pool: pool.Config{MaxConns: 1}})
	serverTLS, roots, err := memsmtp.SelfSigned("localhost")
	if err != nil {
		t.Fatal(err)
	}
	_, ln := serveListening(t, e.pool, proxy.Config{Access: proxy.AccessConfig{TLSConfig: serverTLS}}, "127.0.0.1:0", proxy.ListenConfig{})
	holder := holdSession(t, e)
	clientTLS := &tls.Config{RootCAs: roots, ServerName: "localhost"}
	var clients []*tlsClient
	for range 2 {
		c := startTLS(t, rawDial(t, ln.Addr().String()), clientTLS)
		c.must(t, "EHLO waiter.test", 250)
		c.write(t, "MAIL FROM:<app@example.com>\r\n")
		clients = append(clients, c)
	}
	memsmtp.WaitFor(t, "both clients to wait", func() bool { return e.pool.Stat().PendingAcquires == 2 })

	clients[0].raw.conn.SetLinger(0)
	clients[0].raw.conn.Close()
	memsmtp.WaitFor(t, "the client that reset to leave the queue", func() bool { return e.pool.Stat().PendingAcquires == 1 })

	clients[1].conn.CloseWrite()
	clients[1].raw.conn.CloseWrite()
	memsmtp.WaitFor(t, "smtppool to read the end of the stream", func() bool { return proxy.StreamsEnded(ln) == 1 })
	if n := e.pool.Stat().PendingAcquires; n != 1 {
		t.Errorf("%d transactions wait after the TLS client closed its side, want it still waiting", n)
	}
	finish(t, holder, "user@example.com", message("held"))
	if code, msg := clients[1].reply(); code != 250 {
		t.Errorf("the closed TLS client's MAIL, on its turn: %d %s, want 250", code, msg)
	}
	memsmtp.WaitFor(t, "its connection to end", func() bool { return ln.Open() == 0 })
	if n := e.up.Stats().Commands["MAIL"]; n != 1 {
		t.Errorf("upstream saw %d MAIL, want only the holder's", n)
	}
}
