package proxy

import (
	"context"
	"fmt"
	"net"
	"sync"
)

// Listen opens the TCP listener for client connections. Client connections
// get no TCP keep-alive (a silent client is dropped after ClientTimeout
// anyway, and the socket options cost four system calls per connection),
// and each one holds the lines of a reply until the server reads again, so
// that a multi-line reply, such as EHLO's, leaves in one system call.
func Listen(ctx context.Context, addr string) (net.Listener, error) {
	lc := net.ListenConfig{KeepAlive: -1}
	l, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	return coalescingListener{l}, nil
}

type coalescingListener struct{ net.Listener }

func (l coalescingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &coalescingConn{Conn: c}, nil
}

// maxHeldBytes bounds what a coalescingConn holds before writing anyway.
const maxHeldBytes = 4096

// coalescingConn delays writes until the next Read or Close. go-smtp writes
// and flushes every reply line separately, and always reads (or closes)
// after a whole reply, so this joins the lines of a reply without delaying
// any reply. It is safe for a Close concurrent with reads and writes.
type coalescingConn struct {
	net.Conn
	mu   sync.Mutex
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
