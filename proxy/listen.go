package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Listener accepts client connections. It turns off TCP keep-alive (a
// silent client is dropped after ClientTimeout anyway, and the socket
// options cost four system calls per connection), holds the lines of each
// reply until the server reads again, so that a multi-line reply such as
// EHLO's leaves in one system call, lets the proxy notice a client that
// leaves while it waits on the client's behalf, and keeps track of open
// connections so that a shutdown can close them.
type Listener struct {
	net.Listener
	mu    sync.Mutex
	conns map[*clientConn]struct{}
}

// Listen opens a Listener on the TCP address addr.
func Listen(ctx context.Context, addr string) (*Listener, error) {
	lc := net.ListenConfig{KeepAlive: -1}
	l, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	return &Listener{Listener: l, conns: map[*clientConn]struct{}{}}, nil
}

// Accept implements net.Listener.
func (l *Listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	cc := &clientConn{Conn: c, l: l}
	l.mu.Lock()
	l.conns[cc] = struct{}{}
	l.mu.Unlock()
	return cc, nil
}

// CloseConnections closes the socket of every open client connection, for
// a shutdown whose grace period has passed. Each client's session then ends
// as if the client had gone: its transaction, if any, fails and its
// upstream session is released, on the session's own goroutine.
func (l *Listener) CloseConnections() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for c := range l.conns {
		c.Conn.Close() // the socket only: a stalled flush must not hold this up
	}
}

// CheckAccepting proves that the listener still accepts and greets: it
// connects to it as a client would, reads the greeting and says QUIT. It
// is a liveness check; it never reaches the upstream.
func (l *Listener) CheckAccepting(ctx context.Context) error {
	addr := l.Addr().(*net.TCPAddr)
	target := addr
	if addr.IP.IsUnspecified() {
		target = &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: addr.Port}
		if addr.IP.To4() == nil {
			target.IP = net.IPv6loopback
		}
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", target.String())
	if err != nil {
		return fmt.Errorf("connect to the SMTP listener: %w", err)
	}
	defer c.Close()
	if deadline, ok := ctx.Deadline(); ok {
		c.SetDeadline(deadline)
	}
	greeting, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read the SMTP greeting: %w", err)
	}
	// A busy smtppool may refuse with 421; its accept loop still works.
	if !strings.HasPrefix(greeting, "220") && !strings.HasPrefix(greeting, "421") {
		return fmt.Errorf("unexpected SMTP greeting %q", strings.TrimSpace(greeting))
	}
	c.Write([]byte("QUIT\r\n"))
	return nil
}

// Open returns the number of client connections open now.
func (l *Listener) Open() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.conns)
}

func (l *Listener) forget(c *clientConn) {
	l.mu.Lock()
	delete(l.conns, c)
	l.mu.Unlock()
}

// maxHeldBytes bounds what a clientConn holds before writing anyway.
const maxHeldBytes = 4096

// maxStashedBytes bounds what a watch reads ahead of the server; beyond
// it, the watch stops reading and the client's data waits in the socket.
const maxStashedBytes = 64 << 10

// clientConn is one client's connection.
//
// It delays writes until the next Read or Close. go-smtp writes and
// flushes every reply line separately, and always reads (or closes) after a
// whole reply, so this joins the lines of a reply without delaying any
// reply.
//
// While the proxy waits on the client's behalf inside a go-smtp callback
// (for an upstream session, say), go-smtp does not read the connection, so
// it would not notice the client leaving. watch reads in its place: what it
// reads is kept for the server's next Read, and the end of the stream is
// reported at once.
type clientConn struct {
	net.Conn
	l *Listener

	wmu  sync.Mutex // guards held; a Close waits for a flush in progress
	held []byte

	rmu          sync.Mutex // guards the fields below
	stash        []byte     // read by a watch, not yet by the server
	stashErr     error      // the error that ended a watch, returned after stash
	readDeadline time.Time  // as last set by the server

	eof atomic.Bool // the client has closed its side of the connection
}

// clientConnOf returns the clientConn under a go-smtp connection's
// net.Conn (through TLS, after STARTTLS), or nil.
func clientConnOf(c net.Conn) *clientConn {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	cc, _ := c.(*clientConn)
	return cc
}

func (c *clientConn) Write(b []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.held = append(c.held, b...)
	if len(c.held) >= maxHeldBytes {
		return len(b), c.flushLocked()
	}
	return len(b), nil
}

func (c *clientConn) Read(b []byte) (int, error) {
	if err := c.flush(); err != nil {
		return 0, err
	}
	c.rmu.Lock()
	switch {
	case len(c.stash) > 0:
		n := copy(b, c.stash)
		c.stash = c.stash[n:]
		c.rmu.Unlock()
		return n, nil
	case c.stashErr != nil:
		err := c.stashErr
		c.rmu.Unlock()
		return 0, err
	}
	c.rmu.Unlock()
	n, err := c.Conn.Read(b)
	if err == io.EOF {
		c.eof.Store(true)
	}
	return n, err
}

// SetReadDeadline records the server's deadline, which a watch borrows.
func (c *clientConn) SetReadDeadline(t time.Time) error {
	c.rmu.Lock()
	c.readDeadline = t
	c.rmu.Unlock()
	return c.Conn.SetReadDeadline(t)
}

// SetDeadline records the server's read deadline, which a watch borrows.
func (c *clientConn) SetDeadline(t time.Time) error {
	c.rmu.Lock()
	c.readDeadline = t
	c.rmu.Unlock()
	return c.Conn.SetDeadline(t)
}

// closedByClient reports whether the client has closed its side of the
// connection (it may still read replies).
func (c *clientConn) closedByClient() bool { return c.eof.Load() }

// watch reads the connection in the server's place until stop is called,
// and calls gone if the client closes the connection or it fails meanwhile.
// It must be called only while the server is not reading, from the
// server's goroutine (inside a go-smtp callback).
func (c *clientConn) watch(gone func()) (stop func()) {
	var stopping atomic.Bool
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			n, err := c.Conn.Read(buf)
			c.rmu.Lock()
			c.stash = append(c.stash, buf[:n]...)
			full := len(c.stash) >= maxStashedBytes
			var netErr net.Error
			timeout := errors.As(err, &netErr) && netErr.Timeout()
			if err != nil && !timeout {
				c.stashErr = err
			}
			c.rmu.Unlock()
			switch {
			case err == io.EOF:
				c.eof.Store(true)
				gone()
				return
			case err != nil && !(timeout || stopping.Load()):
				gone()
				return
			case err != nil, full:
				return
			}
		}
	}()
	return func() {
		stopping.Store(true)
		c.Conn.SetReadDeadline(time.Unix(1, 0)) // interrupts the watch's Read
		<-done
		c.rmu.Lock()
		c.Conn.SetReadDeadline(c.readDeadline)
		c.rmu.Unlock()
	}
}

func (c *clientConn) Close() error {
	c.flush()
	c.l.forget(c)
	return c.Conn.Close()
}

func (c *clientConn) flush() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.flushLocked()
}

func (c *clientConn) flushLocked() error {
	if len(c.held) == 0 {
		return nil
	}
	_, err := c.Conn.Write(c.held)
	c.held = c.held[:0]
	return err
}
