package proxy

import (
	"context"
	"fmt"
	"net"
	"sync"
)

// Listener accepts client connections. It turns off TCP keep-alive (a
// silent client is dropped after ClientTimeout anyway, and the socket
// options cost four system calls per connection), holds the lines of each
// reply until the server reads again, so that a multi-line reply such as
// EHLO's leaves in one system call, and keeps track of open connections so
// that a shutdown can close them.
type Listener struct {
	net.Listener
	mu    sync.Mutex
	conns map[*coalescingConn]struct{}
}

// Listen opens a Listener on the TCP address addr.
func Listen(ctx context.Context, addr string) (*Listener, error) {
	lc := net.ListenConfig{KeepAlive: -1}
	l, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	return &Listener{Listener: l, conns: map[*coalescingConn]struct{}{}}, nil
}

// Accept implements net.Listener.
func (l *Listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	cc := &coalescingConn{Conn: c, l: l}
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

func (l *Listener) forget(c *coalescingConn) {
	l.mu.Lock()
	delete(l.conns, c)
	l.mu.Unlock()
}

// maxHeldBytes bounds what a coalescingConn holds before writing anyway.
const maxHeldBytes = 4096

// coalescingConn delays writes until the next Read or Close. go-smtp writes
// and flushes every reply line separately, and always reads (or closes)
// after a whole reply, so this joins the lines of a reply without delaying
// any reply.
type coalescingConn struct {
	net.Conn
	l    *Listener
	mu   sync.Mutex // guards held; a Close waits for a flush in progress
	held []byte
}

func (c *coalescingConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.held = append(c.held, b...)
	if len(c.held) >= maxHeldBytes {
		return len(b), c.flushLocked()
	}
	return len(b), nil
}

func (c *coalescingConn) Read(b []byte) (int, error) {
	if err := c.flush(); err != nil {
		return 0, err
	}
	return c.Conn.Read(b)
}

func (c *coalescingConn) Close() error {
	c.flush()
	c.l.forget(c)
	return c.Conn.Close()
}

func (c *coalescingConn) flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.flushLocked()
}

func (c *coalescingConn) flushLocked() error {
	if len(c.held) == 0 {
		return nil
	}
	_, err := c.Conn.Write(c.held)
	c.held = c.held[:0]
	return err
}
