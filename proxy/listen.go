package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
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
//
// It also decides who may connect at all: a client whose address is not in
// ListenConfig.AllowedNetworks, or one beyond ListenConfig.MaxClientConns
// open connections, is answered by the Listener itself (554 5.7.1, or 421
// 4.7.0) and disconnected; Accept never returns it, so the SMTP server
// never sees it and no session is created.
type Listener struct {
	net.Listener
	cfg   ListenConfig
	mu    sync.Mutex
	conns map[*clientConn]struct{}

	refusing           atomic.Int32 // refused connections lingering now
	denied, overloaded refusalLog

	departures departures // notices waiting clients that leave
}

// Close stops accepting. Connections already accepted stay open; their
// watches work until they end.
func (l *Listener) Close() error {
	err := l.Listener.Close()
	l.departures.close()
	return err
}

// ListenConfig says who may connect to a Listener. Every field has a
// default, used when the field is left at its zero value.
type ListenConfig struct {
	// AllowedNetworks are the client addresses that may connect; any other
	// client gets 554 5.7.1 instead of the greeting and is disconnected.
	// Default loopback only: 127.0.0.0/8 and ::1/128.
	AllowedNetworks []netip.Prefix

	// MaxClientConns is the most client connections open at once; a
	// client beyond it gets 421 4.7.0 instead of the greeting and is
	// disconnected. Default 10,000.
	MaxClientConns int

	// Logger receives the refusals as warnings, at most one line per kind
	// every refusalLogInterval (loopback clients outside AllowedNetworks
	// at debug, each); default discards them.
	Logger *slog.Logger
}

// DefaultListenConfig returns the defaults that Listen applies to the
// fields of a ListenConfig left at their zero value.
func DefaultListenConfig() ListenConfig {
	return ListenConfig{
		AllowedNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")},
		MaxClientConns:  10_000,
	}
}

func (c ListenConfig) withDefaults() ListenConfig {
	d := DefaultListenConfig()
	if len(c.AllowedNetworks) == 0 {
		c.AllowedNetworks = d.AllowedNetworks
	}
	setDefault(&c.MaxClientConns, d.MaxClientConns)
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// The Listener's own replies, sent instead of the greeting.
const (
	greetingDenied  = "554 5.7.1 Access denied: this relay does not accept connections from your address\r\n"
	greetingTooMany = "421 4.7.0 Too many connections; try again later\r\n"
)

// Listen opens a Listener on the TCP address addr.
func Listen(ctx context.Context, addr string, cfg ListenConfig) (*Listener, error) {
	lc := net.ListenConfig{KeepAlive: -1}
	l, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	return &Listener{Listener: l, cfg: cfg.withDefaults(), conns: map[*clientConn]struct{}{},
		denied: refusalLog{loopbackAtDebug: true}}, nil
}

// Accept implements net.Listener. It returns only clients that may
// connect; it answers the others itself, in the background, and goes on
// accepting.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if !l.allowed(c.RemoteAddr()) {
			l.refuse(c, greetingDenied, &l.denied, "client refused: its address is not in SMTPPOOL_ALLOWED_NETWORKS")
			continue
		}
		cc := &clientConn{Conn: c, l: l}
		l.mu.Lock()
		if len(l.conns) >= l.cfg.MaxClientConns {
			l.mu.Unlock()
			l.refuse(c, greetingTooMany, &l.overloaded, "client refused: SMTPPOOL_MAX_CLIENT_CONNS connections are open")
			continue
		}
		l.conns[cc] = struct{}{}
		l.mu.Unlock()
		return cc, nil
	}
}

// allowed reports whether a client at addr may connect.
func (l *Listener) allowed(addr net.Addr) bool {
	ip, ok := remoteIP(addr)
	if !ok {
		return false
	}
	for _, p := range l.cfg.AllowedNetworks {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// remoteIP returns the IP address of a TCP peer, an IPv4-mapped IPv6
// address as IPv4.
func remoteIP(addr net.Addr) (netip.Addr, bool) {
	ta, ok := addr.(*net.TCPAddr)
	if !ok {
		return netip.Addr{}, false
	}
	ip, ok := netip.AddrFromSlice(ta.IP)
	return ip.Unmap(), ok
}

// A refusal is written at once, on the accepting goroutine: a fresh
// connection's kernel send buffer takes the one line without blocking, and
// refuseWriteTimeout guards against anything else. The connection is then
// half-closed, so that the reply is followed by the end of the stream, and
// kept open for up to refuseLinger while the client reads the reply and
// closes its side, on one of at most maxLingering goroutines; beyond those,
// it is closed at once (the client has its reply either way, unless it
// sent something the kernel then answers with a reset). Refusals are thus
// bounded in time and goroutines however many clients come at once.
const (
	refuseWriteTimeout = 100 * time.Millisecond
	refuseLinger       = 2 * time.Second
	maxLingering       = 256
)

// refuse answers c with reply instead of the greeting and closes it, so
// that a flood of clients holds up neither Accept nor anything else. It
// then waits, bounded, for the client to close, reading what it sends, so
// that the reply is not lost to a reset.
func (l *Listener) refuse(c net.Conn, reply string, rl *refusalLog, msg string) {
	rl.note(l.cfg.Logger, msg, c.RemoteAddr())
	c.SetWriteDeadline(time.Now().Add(refuseWriteTimeout))
	if _, err := io.WriteString(c, reply); err != nil {
		c.Close()
		return
	}
	if tc, ok := c.(*net.TCPConn); ok {
		tc.CloseWrite()
	}
	if l.refusing.Add(1) > maxLingering {
		l.refusing.Add(-1)
		c.Close()
		return
	}
	go func() {
		defer l.refusing.Add(-1)
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(refuseLinger))
		io.Copy(io.Discard, io.LimitReader(c, 4096))
	}()
}

// refusalLogInterval is the least time between two log lines of one kind
// of refusal; the refusals in between are counted in the next line.
const refusalLogInterval = 10 * time.Second

// refusalLog throttles the log lines of one kind of refusal: a scan or a
// flood must not flood the log too.
type refusalLog struct {
	loopbackAtDebug bool

	mu         sync.Mutex
	last       time.Time
	suppressed int
}

// note logs a refusal of client, unless one was logged less than
// refusalLogInterval ago. With loopbackAtDebug, a loopback client is logged
// only at debug: with loopback left out of the allowed networks, it is most
// likely smtppool's own liveness check (CheckAccepting), every few seconds.
func (r *refusalLog) note(log *slog.Logger, msg string, client net.Addr) {
	if ip, ok := remoteIP(client); ok && ip.IsLoopback() && r.loopbackAtDebug {
		log.Debug(msg, "client", client.String())
		return
	}
	r.mu.Lock()
	if time.Since(r.last) < refusalLogInterval {
		r.suppressed++
		r.mu.Unlock()
		return
	}
	suppressed := r.suppressed
	r.last, r.suppressed = time.Now(), 0
	r.mu.Unlock()
	log.Warn(msg, "client", client.String(), "refused_since_last_line", suppressed)
}

// CloseConnections closes the socket of every open client connection, for
// a shutdown whose grace period has passed. Each client's session then ends
// as if the client had gone: its transaction, if any, fails and its
// upstream session is released, on the session's own goroutine.
func (l *Listener) CloseConnections() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for c := range l.conns {
		l.departures.closing(c)
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
	// A busy smtppool may refuse with 421, and one whose allowed networks
	// leave out loopback with 554; its accept loop still works.
	if !strings.HasPrefix(greeting, "220") && !strings.HasPrefix(greeting, "421") && !strings.HasPrefix(greeting, "554") {
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
	tail         []byte     // the last bytes the client sent

	eof     atomic.Bool  // a read met the end of the client's stream
	hungUp  atomic.Bool  // see hangUp
	closing atomic.Bool  // Close was called
	reading atomic.Int32 // reads of the connection in progress, the server's or a watch's

	// encrypted says the client's stream is TLS (after STARTTLS): what a
	// watch reads are TLS records.
	encrypted atomic.Bool

	// inMessage says the client is in the middle of a message, from the
	// start of Data until the transaction ends; interrupted says the read
	// deadline is interruptRead's, not the server's. See Read.
	inMessage, interrupted atomic.Bool

	watchID int32 // the Listener's departures watch in force, 0 for none; guarded by departures.mu
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
	if c.hungUp.Load() {
		return 0, io.EOF
	}
	c.reading.Add(1)
	defer c.reading.Add(-1)
	if c.closing.Load() {
		// go-smtp reads on after it closes the connection from within a
		// command (QUIT), and must not take what a lingering Close reads.
		return 0, net.ErrClosed
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
	if n > 0 {
		c.rmu.Lock()
		c.keepTail(b[:n])
		c.rmu.Unlock()
	}
	if err == io.EOF {
		c.eof.Store(true)
	}
	if errors.Is(err, os.ErrDeadlineExceeded) && !c.interrupted.Load() {
		err = c.timedOut(err)
	}
	return n, err
}

// timedOut handles the client timeout (the server's read deadline), err:
// the connection ends once the reply being written has been sent. go-smtp
// ends it itself after a command's timeout, but in a message it answers
// and reads on (the rest of a DATA body it drains, a BDAT chunk it copies
// or discards), and would take the rest of the message, once the client
// resumed, for commands: a message hidden in it would be relayed. In a
// message, the read fails with the client's reply, 421 4.4.2, which go-smtp
// gives the client for a BDAT chunk as it is (and, for a plain error, a
// 554 that names the connection's addresses).
func (c *clientConn) timedOut(err error) error {
	c.hangUp()
	if c.inMessage.Load() {
		return replyMessageTimeout
	}
	return err
}

// keepTail remembers the last bytes the client sent; rmu must be held.
func (c *clientConn) keepTail(b []byte) {
	c.tail = append(c.tail, b[max(0, len(b)-len(quitLine)):]...)
	if extra := len(c.tail) - len(quitLine); extra > 0 {
		c.tail = append(c.tail[:0], c.tail[extra:]...)
	}
}

// quitLine is what a client's stream ends with when it pipelined a whole
// session.
const quitLine = "QUIT\r\n"

// endsWithQuit reports whether the client's stream so far ends with QUIT;
// rmu must be held.
func (c *clientConn) endsWithQuit() bool {
	return strings.EqualFold(string(c.tail), quitLine) || strings.HasSuffix(strings.ToUpper(string(c.tail)), "QUIT\n")
}

// SetReadDeadline records the server's deadline, which a watch borrows.
// Once the connection is closing it fails, as on a closed connection: the
// deadline is the lingering's, and go-smtp, which sets it before it reads
// each command, stops there rather than serve commands it has buffered
// with a session it has ended.
func (c *clientConn) SetReadDeadline(t time.Time) error {
	if c.closing.Load() {
		return net.ErrClosed
	}
	c.rmu.Lock()
	c.readDeadline = t
	c.rmu.Unlock()
	return c.Conn.SetReadDeadline(t)
}

// SetDeadline records the server's read deadline, which a watch borrows.
func (c *clientConn) SetDeadline(t time.Time) error {
	if c.closing.Load() {
		return net.ErrClosed
	}
	c.rmu.Lock()
	c.readDeadline = t
	c.rmu.Unlock()
	return c.Conn.SetDeadline(t)
}

// interruptRead makes a read of the connection in progress, the server's,
// return at once with a timeout, which is not the client's.
func (c *clientConn) interruptRead() {
	c.interrupted.Store(true)
	c.Conn.SetReadDeadline(time.Unix(1, 0))
}

// restoreReadDeadline gives the server's read deadline back after
// interruptRead.
func (c *clientConn) restoreReadDeadline() {
	c.rmu.Lock()
	c.Conn.SetReadDeadline(c.readDeadline)
	c.rmu.Unlock()
	c.interrupted.Store(false)
}

// hangUp ends the connection once the reply being written has been sent:
// the server's next read finds the end of the stream, and go-smtp closes
// the connection.
func (c *clientConn) hangUp() { c.hungUp.Store(true) }

// watch notices, until stop is called, a client that closes the
// connection or resets it, and then calls gone (unless the client
// pipelined its session up to QUIT, or, over TLS, for a close, which may
// come after a QUIT that cannot be seen). It must be called only while the
// server is not reading, from the server's goroutine (inside a go-smtp
// callback). On Linux it costs no goroutine while the client stays (see
// departures); elsewhere, or if that fails, it reads (readWatch).
func (c *clientConn) watch(gone func()) (stop func()) {
	if !c.closing.Load() {
		if stop, err := c.l.departures.watch(c, gone); err == nil {
			return stop
		}
	}
	return c.readWatch(gone)
}

// readWatch reads the connection in the server's place until stop is
// called, and calls gone if the client closes the connection or it fails
// meanwhile. What it reads is kept for the server's next Read. It must be
// called only while the server is not reading.
func (c *clientConn) readWatch(gone func()) (stop func()) {
	var stopping atomic.Bool
	done := make(chan struct{})
	c.reading.Add(1)
	go func() {
		defer close(done)
		defer c.reading.Add(-1)
		if c.closing.Load() {
			return
		}
		buf := make([]byte, 4096)
		for {
			n, err := c.Conn.Read(buf)
			c.rmu.Lock()
			c.stash = append(c.stash, buf[:n]...)
			c.keepTail(buf[:n])
			quitLast := c.endsWithQuit()
			full := len(c.stash) >= maxStashedBytes
			var netErr net.Error
			timeout := errors.As(err, &netErr) && netErr.Timeout()
			if err != nil && !timeout {
				c.stashErr = err
			}
			c.rmu.Unlock()
			switch {
			case err == io.EOF:
				// A client that pipelined its commands up to QUIT and
				// then closed its side still waits for the replies; any
				// other that closes while the proxy waits has gone. Over
				// TLS, a QUIT cannot be seen in the records: the end of
				// the stream is the server's to find, once it reads again.
				c.eof.Store(true)
				if !quitLast && !c.encrypted.Load() {
					gone()
				}
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

// closeFlushTimeout bounds the write of what is held when the connection
// closes: the last reply (221 to QUIT, say) and, over TLS, the close_notify
// alert. crypto/tls sets the write deadline to the present once it has
// written that alert, which here is only held, so Close sets its own.
const closeFlushTimeout = 2 * time.Second

// A connection that closes while the client may still be sending lingers:
// it sends its last reply, ends its side of the stream, and reads and
// discards what the client still sends, until the client closes its side
// too, for at most lingerTimeout and lingerMaxBytes. Closed at once, a
// socket with unread data is reset, and the reset makes the client lose the
// reply: go-smtp ends the connection after a message line over its limit
// (554 5.6.0) while the client is still writing the rest of the message,
// which then fails with "connection reset by peer".
const (
	lingerTimeout  = 30 * time.Second
	lingerMaxBytes = 64 << 20
)

// Close sends what is held and closes the connection. It lingers in the
// background (see lingerTimeout), counting against the Listener's cap
// meanwhile, unless the client has already ended its side or a read is in
// progress: the Close then comes from outside the server's reading (a
// server's Close, say), which must end at once. A Listener's
// CloseConnections ends the lingering at once too.
func (c *clientConn) Close() error {
	if c.closing.Swap(true) {
		return nil // go-smtp closes twice when the server closes it
	}
	c.wmu.Lock()
	if len(c.held) > 0 {
		c.Conn.SetWriteDeadline(time.Now().Add(closeFlushTimeout))
		c.flushLocked()
	}
	c.wmu.Unlock()
	tc, ok := c.Conn.(*net.TCPConn)
	if !ok || c.eof.Load() || c.reading.Load() > 0 {
		c.l.departures.closing(c)
		c.l.forget(c)
		return c.Conn.Close()
	}
	go c.linger(tc)
	return nil
}

// linger ends the server's side of the stream, discards what the client
// still sends until it ends its side, and closes.
func (c *clientConn) linger(tc *net.TCPConn) {
	defer func() {
		c.l.forget(c)
		c.Conn.Close()
	}()
	if tc.CloseWrite() != nil {
		return
	}
	tc.SetReadDeadline(time.Now().Add(lingerTimeout))
	io.Copy(io.Discard, io.LimitReader(tc, lingerMaxBytes))
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
