package proxy_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/textproto"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
	"github.com/smtppool/smtppool/proxy"
)

// testEnv is a proxy listening on 127.0.0.1:0 in front of an in-memory
// upstream that requires AUTH.
type testEnv struct {
	up   *memsmtp.Server
	pool *pool.Pool
	srv  *smtp.Server
	addr string
}

// options tune a testEnv.
type options struct {
	upstream memsmtp.Options
	pool     pool.Config
	proxy    proxy.Config
	listen   proxy.ListenConfig
	// listenAddr is where the proxy listens; default 127.0.0.1:0.
	listenAddr string
}

func newEnv(t testing.TB, o options) *testEnv {
	t.Helper()
	o.upstream.Username, o.upstream.Password = "app", "s3cret"
	up, err := memsmtp.Start(o.upstream)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { up.Close() })

	o.pool.Addr = up.Addr
	o.pool.TLS = pool.TLSNone
	o.pool.Auth = pool.PasswordAuth{Username: "app", Password: "s3cret"}
	o.pool.AllowInsecureAuth = true
	if o.pool.ProbeBackoff == 0 {
		o.pool.ProbeBackoff = time.Millisecond
		o.pool.ProbeBackoffMax = 5 * time.Millisecond
	}
	p, err := pool.New(o.pool)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close) // after the proxies' and the sessions' holders' cleanups, registered later

	if o.proxy.RetryBackoff == 0 {
		o.proxy.RetryBackoff = time.Millisecond
	}
	if o.proxy.RetryBackoffMax == 0 {
		o.proxy.RetryBackoffMax = 5 * time.Millisecond
	}
	if o.listenAddr == "" {
		o.listenAddr = "127.0.0.1:0"
	}
	if o.listen.MaxClientConns == 0 {
		o.listen.MaxClientConns = 2000 // room for the 1,070 clients of the idle-clients fault test
	}
	srv, ln := serveListening(t, p, o.proxy, o.listenAddr, o.listen)
	return &testEnv{up: up, pool: p, srv: srv, addr: ln.Addr().String()}
}

// serve runs a proxy in front of p on 127.0.0.1:0 until the test ends.
func serve(t testing.TB, p *pool.Pool, cfg proxy.Config) (*smtp.Server, string) {
	t.Helper()
	t.Cleanup(p.Close)
	srv, ln := serveListening(t, p, cfg, "127.0.0.1:0", proxy.ListenConfig{MaxClientConns: 2000})
	return srv, ln.Addr().String()
}

// serveListening runs a proxy in front of p on addr, with the listener's
// settings, until the test ends. A test that runs a second proxy over an
// env's pool uses it, so that the listener's counts see only the clients
// dialled to it. It does not close p: puddle's Close waits for every
// session lent, and a test's holders of sessions give them back in
// cleanups that run after this one.
func serveListening(t testing.TB, p *pool.Pool, cfg proxy.Config, addr string, lc proxy.ListenConfig) (*smtp.Server, *proxy.Listener) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	srv := proxy.NewServer(ctx, p, cfg)
	ln, err := proxy.Listen(ctx, addr, lc)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() {
		srv.Close()
		cancel()
	})
	return srv, ln
}

// finish completes the transaction open on c with a recipient and msg.
func finish(t *testing.T, c *smtp.Client, rcpt, msg string) {
	t.Helper()
	if err := c.Rcpt(rcpt, nil); err != nil {
		t.Fatal(err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte(msg))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

// dial connects a client to the proxy and says EHLO.
func (e *testEnv) dial(t *testing.T) *smtp.Client {
	t.Helper()
	c, err := smtp.Dial(e.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.Hello("client.test"); err != nil {
		t.Fatal(err)
	}
	return c
}

// message returns a test message with Message-ID <id@test>.
func message(id string) string {
	return fmt.Sprintf("Message-ID: <%s@test>\r\nSubject: test %s\r\n\r\nHello %s.\r\n", id, id, id)
}

// sendErr is where and how a transaction failed.
type sendErr struct {
	step string // MAIL, RCPT, DATA or "end of DATA"
	err  error
}

func (e *sendErr) Error() string { return e.step + ": " + e.err.Error() }

func (e *sendErr) Unwrap() error { return e.err }

// send runs one transaction on c.
func send(c *smtp.Client, from string, to []string, msg string) error {
	if err := c.Mail(from, nil); err != nil {
		return &sendErr{"MAIL", err}
	}
	for _, rcpt := range to {
		if err := c.Rcpt(rcpt, nil); err != nil {
			return &sendErr{"RCPT", err}
		}
	}
	w, err := c.Data()
	if err != nil {
		return &sendErr{"DATA", err}
	}
	if _, err := w.Write([]byte(msg)); err != nil {
		return &sendErr{"end of DATA", err}
	}
	if err := w.Close(); err != nil {
		return &sendErr{"end of DATA", err}
	}
	return nil
}

func reply(code int, enh [3]int, msg string) *smtp.SMTPError {
	return &smtp.SMTPError{Code: code, EnhancedCode: enh, Message: msg}
}

// holdSession starts a transaction that keeps the only upstream session
// busy, and returns the client to finish it with.
func holdSession(t *testing.T, e *testEnv) *smtp.Client {
	t.Helper()
	c := e.dial(t)
	if err := c.Mail("app@example.com", nil); err != nil {
		t.Fatal(err)
	}
	if st := e.pool.Stat(); st.AcquiredConns != 1 || st.MaxConns != 1 {
		t.Fatalf("pool %+v, want its only session acquired", st)
	}
	return c
}

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
