package proxy_test

import (
	"bufio"
	"net"
	"net/textproto"
	"testing"
	"time"
)

// rawClient writes exactly the bytes a test gives, for bugs that live on
// the wire, where a well-behaved client library cannot go.
type rawClient struct {
	t    *testing.T
	conn *net.TCPConn
	r    *textproto.Reader
}

// rawDial connects to addr and reads the greeting.
func rawDial(t *testing.T, addr string) *rawClient {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	c := &rawClient{t: t, conn: conn.(*net.TCPConn), r: textproto.NewReader(bufio.NewReader(conn))}
	if code, msg := c.reply(); code != 220 {
		t.Fatalf("greeting: %d %s", code, msg)
	}
	return c
}

// write sends s as it is.
func (c *rawClient) write(s string) {
	c.t.Helper()
	if _, err := c.conn.Write([]byte(s)); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// reply reads one reply; code is 0 if the connection ended first.
func (c *rawClient) reply() (code int, msg string) {
	code, msg, err := c.r.ReadResponse(0)
	if err != nil {
		if _, ok := err.(*textproto.Error); !ok {
			return 0, err.Error()
		}
	}
	return code, msg
}

// cmd sends line and returns the reply.
func (c *rawClient) cmd(line string) (int, string) {
	c.t.Helper()
	c.write(line + "\r\n")
	return c.reply()
}

// must sends line and fails the test unless the reply has code want.
func (c *rawClient) must(line string, want int) {
	c.t.Helper()
	if code, msg := c.cmd(line); code != want {
		c.t.Fatalf("%q: %d %s, want %d", line, code, msg, want)
	}
}
