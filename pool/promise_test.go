package pool_test

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
)

// dialCounter counts dials and the most in progress at once.
type dialCounter struct {
	dials, inFlight, maxInFlight atomic.Int64
}

func (d *dialCounter) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d.dials.Add(1)
	n := d.inFlight.Add(1)
	defer d.inFlight.Add(-1)
	for m := d.maxInFlight.Load(); n > m && !d.maxInFlight.CompareAndSwap(m, n); m = d.maxInFlight.Load() {
	}
	time.Sleep(5 * time.Millisecond) // a dial takes a moment, so dials can overlap
	return (&net.Dialer{}).DialContext(ctx, network, addr)
}

// TestOneProbeAtATimeWhileTheUpstreamIsDown: many transactions waiting
// through an outage dial one at a time, with backoff, instead of each
// hammering the upstream; the first probe after it returns succeeds.
func TestOneProbeAtATimeWhileTheUpstreamIsDown(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	addr := up.Addr
	up.Close()
	var dc dialCounter
	p, err := pool.New(pool.Config{Addr: addr, TLS: pool.TLSNone, MaxConns: 10, Dial: dc.dial,
		ProbeBackoff: 50 * time.Millisecond, ProbeBackoffMax: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	// 50 waiters retry for a second, as transactions in their retry window do.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for range 50 {
		wg.Go(func() {
			for ctx.Err() == nil {
				if c, err := p.Acquire(ctx); err == nil {
					c.Release()
				}
				time.Sleep(time.Millisecond)
			}
		})
	}
	wg.Wait()
	// At most MaxConns dials before the first failure is known, then one
	// probe per backoff: 50, 100, 200, 200, ... ms, each plus up to half.
	if n := dc.dials.Load(); n > 10+12 {
		t.Errorf("%d dials in a one-second outage, want one probe at a time with backoff", n)
	}
	if st := p.Stat(); st.UpstreamUp {
		t.Error("Stat.UpstreamUp during the outage")
	}

	up2 := startUpstream(t, memsmtp.Options{Addr: addr})
	waitFor(t, "a probe to reach the restarted upstream", func() bool {
		c, err := p.Acquire(context.Background())
		if err != nil {
			return false
		}
		c.Release()
		return true
	})
	if !p.Stat().UpstreamUp || up2.Stats().Conns != 1 {
		t.Errorf("after the outage: upstream up %v, %d connections; want up, 1", p.Stat().UpstreamUp, up2.Stats().Conns)
	}
}

// TestCredentialsNeverGoInClearTextBecauseOfAnEarlierSession: in
// opportunistic mode with credentials, an upstream seen once without
// STARTTLS is asked again by every new session; when it offers STARTTLS
// again, sessions work.
func TestCredentialsNeverGoInClearTextBecauseOfAnEarlierSession(t *testing.T) {
	serverTLS, roots, err := memsmtp.SelfSigned("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	plain := startUpstream(t, memsmtp.Options{Username: "app", Password: "s3cret"})
	addr := plain.Addr
	p := newPool(t, plain, pool.Config{TLS: pool.TLSOpportunistic, TLSConfig: &tls.Config{RootCAs: roots},
		Auth: pool.PasswordAuth{Username: "app", Password: "s3cret"}, ProbeBackoff: time.Millisecond})
	if _, err := p.Acquire(context.Background()); !errors.Is(err, pool.ErrTLSUnavailable) {
		t.Fatalf("Acquire from an upstream without STARTTLS: %v, want ErrTLSUnavailable", err)
	}
	if n := plain.Stats().Auths; n != 0 {
		t.Fatalf("credentials sent in clear text %d times", n)
	}
	plain.Close()

	secure := startUpstream(t, memsmtp.Options{Addr: addr, TLS: serverTLS, Username: "app", Password: "s3cret"})
	var c *pool.Conn
	waitFor(t, "a session over STARTTLS", func() bool {
		c, err = p.Acquire(context.Background())
		return err == nil
	})
	defer c.Release()
	if !c.TLS() || secure.Stats().Auths != 1 {
		t.Errorf("session TLS %v with %d AUTH, want TLS and 1", c.TLS(), secure.Stats().Auths)
	}
}

// TestPlainTextKnowledgeExpires: without credentials, an upstream seen
// without STARTTLS is asked again once the knowledge expires.
func TestPlainTextKnowledgeExpires(t *testing.T) {
	defer pool.SetPlainTextMemory(50 * time.Millisecond)()
	serverTLS, roots, err := memsmtp.SelfSigned("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	plain := startUpstream(t, memsmtp.Options{})
	addr := plain.Addr
	p := newPool(t, plain, pool.Config{TLS: pool.TLSOpportunistic, TLSConfig: &tls.Config{RootCAs: roots},
		MaxConnLifetime: time.Nanosecond})
	c := acquire(t, p)
	if c.TLS() {
		t.Fatal("TLS with an upstream that has none")
	}
	c.Release()
	plain.Close()
	startUpstream(t, memsmtp.Options{Addr: addr, TLS: serverTLS})
	waitFor(t, "a session over STARTTLS once the knowledge expired", func() bool {
		c, err := p.Acquire(context.Background())
		if err != nil {
			return false
		}
		defer c.Release()
		return c.TLS()
	})
}

// TestUnfinishedTransactionIsClosedWhenAuthenticated: RSET and the EHLO
// go-smtp sends after it could lose the AUTH on some upstreams, so an
// authenticated session left mid-transaction is closed, not reused.
func TestUnfinishedTransactionIsClosedWhenAuthenticated(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{Username: "app", Password: "s3cret"})
	p := newPool(t, up, pool.Config{Auth: pool.PasswordAuth{Username: "app", Password: "s3cret"}, AllowInsecureAuth: true})
	c := acquire(t, p)
	first := c.ID()
	if err := c.Mail(context.Background(), "sender@example.com", nil); err != nil {
		t.Fatal(err)
	}
	c.Release()
	c.Release() // a second Release does nothing
	c = acquire(t, p)
	defer c.Release()
	if c.ID() == first {
		t.Error("session left mid-transaction was reused")
	}
	if err := send(c, 1); err != nil {
		t.Fatal(err)
	}
	st := p.Stat()
	if st.ClosedUnfinished != 1 || up.Stats().Commands["RSET"] != 0 {
		t.Errorf("ClosedUnfinished %d, upstream RSET %d; want 1, 0", st.ClosedUnfinished, up.Stats().Commands["RSET"])
	}
}

// TestCommandGivesUpWhenItsContextEnds: a command waiting for a slow
// reply returns when its context ends, and the session is not reused.
func TestCommandGivesUpWhenItsContextEnds(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	up.Inject(memsmtp.Mail, memsmtp.Fault{Delay: 5 * time.Second})
	p := newPool(t, up, pool.Config{})
	c := acquire(t, p)
	first := c.ID()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := c.Mail(ctx, "sender@example.com", nil)
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 2*time.Second {
		t.Fatalf("Mail: %v after %v, want the context's deadline at once", err, time.Since(start))
	}
	c.Release()
	c = acquire(t, p)
	defer c.Release()
	if c.ID() == first {
		t.Error("a session whose command was cut short was reused")
	}
}

// stallingDialer hands out connections whose reads can be stalled, as an
// upstream that stops answering.
type stallingDialer struct {
	stalled chan struct{} // closed: reads block until the connection closes
	mu      sync.Mutex
	conns   []*stallConn
}

type stallConn struct {
	net.Conn
	d      *stallingDialer
	closed chan struct{}
	once   sync.Once
}

func (d *stallingDialer) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &stallConn{Conn: c, d: d, closed: make(chan struct{})}, nil
}

func (c *stallConn) Read(b []byte) (int, error) {
	select {
	case <-c.d.stalled:
		<-c.closed
		return 0, net.ErrClosed
	default:
		return c.Conn.Read(b)
	}
}

func (c *stallConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// TestHealthCheckAtAcquireHonoursTheContext: the NOOP to a session that
// idled gives up when Acquire's context ends.
func TestHealthCheckAtAcquireHonoursTheContext(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	d := &stallingDialer{stalled: make(chan struct{})}
	p := newPool(t, up, pool.Config{Dial: d.dial, PingAfterIdle: time.Nanosecond, CommandTimeout: time.Minute})
	acquire(t, p).Release()
	close(d.stalled) // the upstream stops answering
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := p.Acquire(ctx); err == nil {
		t.Fatal("Acquire succeeded with a stalled upstream")
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("Acquire took %v with a 100ms context", took)
	}
}

// TestInvalidArgumentLeavesTheSessionHealthy: an address with CR, LF or
// NUL is refused before it is sent, and the session stays usable.
func TestInvalidArgumentLeavesTheSessionHealthy(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	p := newPool(t, up, pool.Config{})
	c := acquire(t, p)
	defer c.Release()
	ctx := context.Background()
	for _, addr := range []string{"a\rb@example.com", "a\nb@example.com", "a\x00b@example.com"} {
		if err := c.Mail(ctx, addr, nil); !errors.Is(err, pool.ErrInvalidArgument) {
			t.Errorf("Mail(%q): %v, want ErrInvalidArgument", addr, err)
		}
	}
	if err := c.Mail(ctx, "sender@example.com", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt(ctx, "rcpt\r@example.com", nil); !errors.Is(err, pool.ErrInvalidArgument) {
		t.Errorf("Rcpt with a CR: %v, want ErrInvalidArgument", err)
	}
	if err := c.Rcpt(ctx, "rcpt@example.com", nil); err != nil {
		t.Fatalf("Rcpt after a refused argument: %v", err)
	}
	reply, err := c.Data(ctx, strings.NewReader("Subject: x\r\n\r\nbody\r\n"))
	if err != nil || reply == "" {
		t.Fatalf("Data after a refused argument: %q, %v", reply, err)
	}
}

// TestAny2xxAtEndOfDataIsAcceptance: go-smtp's client wants exactly 250;
// a 251 is still the upstream taking the message, not an error.
func TestAny2xxAtEndOfDataIsAcceptance(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	up.Inject(memsmtp.Data, memsmtp.Fault{Deliver: true, Reply: &smtp.SMTPError{Code: 251, EnhancedCode: smtp.EnhancedCode{2, 1, 5}, Message: "Will forward"}})
	p := newPool(t, up, pool.Config{})
	c := acquire(t, p)
	defer c.Release()
	ctx := context.Background()
	if err := c.Mail(ctx, "sender@example.com", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt(ctx, "rcpt@example.com", nil); err != nil {
		t.Fatal(err)
	}
	reply, err := c.Data(ctx, strings.NewReader("Subject: x\r\n\r\nbody\r\n"))
	if err != nil || !strings.Contains(reply, "Will forward") {
		t.Fatalf("Data: %q, %v; want the 251's text and no error", reply, err)
	}
	if st := p.Stat(); st.Messages != 1 {
		t.Errorf("Stat.Messages = %d, want 1", st.Messages)
	}
}

// TestMinIdleConnsAreKeptWarm: MinIdleConns sessions are set up without
// waiting for work, and replaced when they close.
func TestMinIdleConnsAreKeptWarm(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	p := newPool(t, up, pool.Config{MinIdleConns: 2, MaxConns: 3, HealthCheckPeriod: 10 * time.Millisecond})
	waitFor(t, "two warm sessions", func() bool { return p.Stat().IdleConns == 2 })
	if n := up.Stats().Conns; n != 2 {
		t.Errorf("upstream saw %d connections for 2 warm sessions", n)
	}
	c := acquire(t, p)
	defer c.Release()
	if n := up.Stats().Conns; n != 2 {
		t.Errorf("Acquire dialled although a warm session was idle (%d connections)", n)
	}
	waitFor(t, "the pool to refill to two idle sessions", func() bool { return p.Stat().IdleConns == 2 })
}

// TestRepliesAreReported: Config.OnReply sees each reply by stage.
func TestRepliesAreReported(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	up.Inject(memsmtp.Rcpt, memsmtp.Fault{Reply: &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no"}})
	var mu sync.Mutex
	seen := map[string]int{}
	p := newPool(t, up, pool.Config{OnReply: func(stage string, code int) {
		mu.Lock()
		seen[stage+" "+strconv.Itoa(code)]++
		mu.Unlock()
	}})
	c := acquire(t, p)
	ctx := context.Background()
	c.Mail(ctx, "sender@example.com", nil)
	c.Rcpt(ctx, "bad@example.com", nil)
	c.Rcpt(ctx, "good@example.com", nil)
	c.Data(ctx, strings.NewReader("Subject: x\r\n\r\nbody\r\n"))
	c.Release()
	want := map[string]int{"MAIL 250": 1, "RCPT 550": 1, "RCPT 250": 1, "DATA 354": 1, "end of DATA 250": 1}
	mu.Lock()
	defer mu.Unlock()
	for k, n := range want {
		if seen[k] != n {
			t.Errorf("OnReply saw %q %d times, want %d (all: %v)", k, seen[k], n, seen)
		}
	}
}
