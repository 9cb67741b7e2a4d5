package pool_test

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/textproto"
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

// writeRecorder is a Config.Dial that records the writes on the
// connections it makes, each as written: a write is one flight of commands
// to the upstream (or, after STARTTLS, of encrypted records).
type writeRecorder struct {
	mu     sync.Mutex
	writes []string
}

func (r *writeRecorder) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &recordingConn{Conn: c, r: r}, nil
}

// count is the number of writes so far.
func (r *writeRecorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.writes)
}

// ehlo is the EHLO lines written in clear text.
func (r *writeRecorder) ehlo() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var lines []string
	for _, w := range r.writes {
		if strings.HasPrefix(w, "EHLO ") {
			lines = append(lines, strings.TrimSpace(w))
		}
	}
	return lines
}

type recordingConn struct {
	net.Conn
	r *writeRecorder
}

func (c *recordingConn) Write(b []byte) (int, error) {
	c.r.mu.Lock()
	c.r.writes = append(c.r.writes, string(b))
	c.r.mu.Unlock()
	return c.Conn.Write(b)
}

var recipients = []pool.Recipient{{Addr: "a@example.com"}, {Addr: "b@example.com"}, {Addr: "c@example.com"}}

// TestEnvelopeIsOneWrite: with PIPELINING, MAIL and every RCPT go in one
// write; each recipient gets its own verdict, and the message goes to the
// accepted ones as one BDAT write.
func TestEnvelopeIsOneWrite(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	up.Inject(memsmtp.Rcpt, memsmtp.Fault{}, memsmtp.Fault{Reply: &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}})
	w := &writeRecorder{}
	p := newPool(t, up, pool.Config{Dial: w.dial})
	c := acquire(t, p)
	defer c.Release()
	if !c.Pipelining() {
		t.Fatal("memsmtp offers PIPELINING; Pipelining() says no")
	}
	ctx := context.Background()
	before := w.count()
	errs, err := c.Envelope(ctx, "sender@example.com", nil, recipients)
	if err != nil {
		t.Fatal(err)
	}
	var smtpErr *smtp.SMTPError
	if errs[0] != nil || !errors.As(errs[1], &smtpErr) || smtpErr.Code != 550 || errs[2] != nil {
		t.Fatalf("recipients' verdicts %v, want nil, 550, nil", errs)
	}
	if n := w.count() - before; n != 1 {
		t.Errorf("envelope took %d writes, want 1", n)
	}
	before = w.count()
	if _, err := c.Data(ctx, strings.NewReader("Message-ID: <env@test>\r\n\r\nbody\r\n")); err != nil {
		t.Fatal(err)
	}
	if n := w.count() - before; n != 1 {
		t.Errorf("message took %d writes, want 1 (BDAT LAST)", n)
	}
	msgs := up.Messages()
	if len(msgs) != 1 || strings.Join(msgs[0].To, ",") != "a@example.com,c@example.com" {
		t.Errorf("upstream got %+v, want one message to a and c", msgs)
	}
	if st := up.Stats(); st.Commands["BDAT"] != 1 || st.Commands["DATA"] != 0 {
		t.Errorf("upstream saw %d BDAT and %d DATA, want 1 and 0", st.Commands["BDAT"], st.Commands["DATA"])
	}
}

// TestEnvelopeWithoutPipelining: one command at a time, same verdicts.
func TestEnvelopeWithoutPipelining(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{Hide: []string{"PIPELINING", "CHUNKING"}})
	up.Inject(memsmtp.Rcpt, memsmtp.Fault{}, memsmtp.Fault{Reply: &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}})
	w := &writeRecorder{}
	p := newPool(t, up, pool.Config{Dial: w.dial})
	c := acquire(t, p)
	defer c.Release()
	if c.Pipelining() {
		t.Fatal("Pipelining() with PIPELINING hidden")
	}
	before := w.count()
	errs, err := c.Envelope(context.Background(), "sender@example.com", nil, recipients)
	if err != nil || errs[0] != nil || errs[1] == nil || errs[2] != nil {
		t.Fatalf("Envelope: %v, %v; want nil, 550, nil", errs, err)
	}
	if n := w.count() - before; n != 4 {
		t.Errorf("envelope took %d writes, want 4, one per command", n)
	}
	if _, err := c.Data(context.Background(), strings.NewReader("Subject: x\r\n\r\nbody\r\n")); err != nil {
		t.Fatal(err)
	}
	if st := up.Stats(); st.Commands["DATA"] != 1 || st.Commands["BDAT"] != 0 {
		t.Errorf("upstream saw %d DATA and %d BDAT, want 1 and 0", st.Commands["DATA"], st.Commands["BDAT"])
	}
}

// TestEnvelopeWithRefusedMail: MAIL's refusal is the error, the
// recipients' replies to a refused MAIL are not reported, and the session
// stays healthy.
func TestEnvelopeWithRefusedMail(t *testing.T) {
	for _, pipelining := range []bool{true, false} {
		t.Run("pipelining "+strconv.FormatBool(pipelining), func(t *testing.T) {
			opts := memsmtp.Options{}
			if !pipelining {
				opts.Hide = []string{"PIPELINING"}
			}
			up := startUpstream(t, opts)
			up.Inject(memsmtp.Mail, memsmtp.Fault{Reply: &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "sender refused"}})
			var mu sync.Mutex
			seen := map[string]int{}
			p := newPool(t, up, pool.Config{OnReply: func(stage string, code int) {
				mu.Lock()
				seen[stage+" "+strconv.Itoa(code)]++
				mu.Unlock()
			}})
			c := acquire(t, p)
			first := c.ID()
			errs, err := c.Envelope(context.Background(), "sender@example.com", nil, recipients)
			var smtpErr *smtp.SMTPError
			if !errors.As(err, &smtpErr) || smtpErr.Code != 553 || errs != nil {
				t.Fatalf("Envelope: %v, %v; want MAIL's 553 and no recipient verdicts", errs, err)
			}
			c.Release()
			mu.Lock()
			if len(seen) != 1 || seen["MAIL 553"] != 1 {
				t.Errorf("OnReply saw %v, want MAIL 553 only", seen)
			}
			mu.Unlock()
			c = acquire(t, p)
			defer c.Release()
			if c.ID() != first {
				t.Error("session not reused after a refused MAIL")
			}
			if err := send(c, 1); err != nil {
				t.Fatalf("send after a refused MAIL: %v", err)
			}
			if n := up.Stats().Commands["RCPT"]; pipelining && n != 4 || !pipelining && n != 1 {
				t.Errorf("upstream saw %d RCPT; want the 3 pipelined ones and the next message's, or only the next message's", n)
			}
		})
	}
}

// TestRefusalsAndRSET: a refusal leaves the session in the pool, reset
// with RSET only where the upstream's state needs it. A refused MAIL
// starts no transaction, with pipelining or without (so the client's
// refusal need not wait for an RSET round trip); DATA's final reply ends
// the transaction, whatever it is; after a refused BDAT the upstream's
// state is indeterminate and wants RSET (RFC 3030).
func TestRefusalsAndRSET(t *testing.T) {
	refused := memsmtp.Fault{Reply: &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "refused"}}
	tests := []struct {
		name     string
		hide     []string
		at       memsmtp.Command
		wantRSET int64
	}{
		{name: "MAIL, pipelined", at: memsmtp.Mail},
		{name: "MAIL, one command at a time", hide: []string{"PIPELINING"}, at: memsmtp.Mail},
		{name: "message with DATA", hide: []string{"CHUNKING"}, at: memsmtp.Data},
		{name: "message with BDAT", at: memsmtp.Data, wantRSET: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			up := startUpstream(t, memsmtp.Options{Hide: tt.hide})
			up.Inject(tt.at, refused)
			p := newPool(t, up, pool.Config{})
			c := acquire(t, p)
			_, err := c.Envelope(context.Background(), "sender@example.com", nil, recipients[:1])
			if err == nil {
				_, err = c.Data(context.Background(), strings.NewReader("Subject: x\r\n\r\nbody\r\n"))
			}
			if err == nil {
				t.Fatal("the transaction succeeded despite the 554")
			}
			first := c.ID()
			c.Release()
			if n := up.Stats().Commands["RSET"]; n != tt.wantRSET {
				t.Errorf("upstream saw %d RSET after the refusal, want %d", n, tt.wantRSET)
			}
			c = acquire(t, p)
			defer c.Release()
			if c.ID() != first {
				t.Error("the session was not reused")
			}
			if err := send(c, 2); err != nil {
				t.Errorf("next transaction: %v", err)
			}
		})
	}
}

// TestRepliesAreReportedWithBDAT: with CHUNKING the verdict on the message
// is reported as the end of DATA, and there is no 354.
func TestRepliesAreReportedWithBDAT(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	var mu sync.Mutex
	seen := map[string]int{}
	p := newPool(t, up, pool.Config{OnReply: func(stage string, code int) {
		mu.Lock()
		seen[stage+" "+strconv.Itoa(code)]++
		mu.Unlock()
	}})
	c := acquire(t, p)
	if err := send(c, 1); err != nil {
		t.Fatal(err)
	}
	c.Release()
	mu.Lock()
	defer mu.Unlock()
	want := map[string]int{"MAIL 250": 1, "RCPT 250": 1, "end of DATA 250": 1}
	if len(seen) != len(want) {
		t.Errorf("OnReply saw %v, want %v", seen, want)
	}
	for k, n := range want {
		if seen[k] != n {
			t.Errorf("OnReply saw %q %d times, want %d (all: %v)", k, seen[k], n, seen)
		}
	}
}

// TestSessionLimitSignalAtTheEndOfABDATMessage: Exchange Online's 432
// 4.3.2, which comes at DATA, comes at the end of a BDAT message and is
// still read as the connection-limit signal.
func TestSessionLimitSignalAtTheEndOfABDATMessage(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{SessionLimit: 1})
	p := newPool(t, up, pool.Config{MaxConns: 2})
	first := acquire(t, p)
	defer first.Release()
	second := acquire(t, p)
	defer second.Release()
	err := send(second, 2)
	if !errors.Is(err, pool.ErrConnLimit) || !errors.Is(err, pool.ErrCapLowered) {
		t.Fatalf("send over the session limit: %v, want ErrConnLimit and ErrCapLowered", err)
	}
	if st := p.Stat(); st.EffectiveMaxConns != 1 {
		t.Errorf("effective cap %d, want 1", st.EffectiveMaxConns)
	}
	if n := up.Stats().Commands["BDAT"]; n != 1 {
		t.Errorf("upstream saw %d BDAT, want 1", n)
	}
}

// TestLocalNameBeforeSTARTTLS: the EHLO before STARTTLS says LocalName
// too (go-smtp's client said "localhost"), and the upgrade happens on the
// same connection.
func TestLocalNameBeforeSTARTTLS(t *testing.T) {
	serverTLS, roots, err := memsmtp.SelfSigned("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	up := startUpstream(t, memsmtp.Options{TLS: serverTLS})
	r := &writeRecorder{}
	p := newPool(t, up, pool.Config{TLS: pool.TLSStartTLS, TLSConfig: &tls.Config{RootCAs: roots}, LocalName: "relay.corp.example", Dial: r.dial})
	c := acquire(t, p)
	defer c.Release()
	if !c.TLS() {
		t.Fatal("session not encrypted")
	}
	if err := send(c, 1); err != nil {
		t.Fatal(err)
	}
	if lines := r.ehlo(); len(lines) != 1 || lines[0] != "EHLO relay.corp.example" {
		t.Errorf("EHLO in clear text: %q, want one, with the local name", lines)
	}
	if st := up.Stats(); st.Conns != 1 || st.Commands["EHLO"] != 2 {
		t.Errorf("upstream saw %d connections and %d EHLO, want 1 and 2", st.Conns, st.Commands["EHLO"])
	}
}

// TestTryAcquireNeverDialsOrWaits: TryAcquire lends an idle session, and
// returns nil, without dialling, when none is idle or the cap is reached.
func TestTryAcquireNeverDialsOrWaits(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	p := newPool(t, up, pool.Config{MaxConns: 1})
	if c := p.TryAcquire(); c != nil {
		t.Fatal("TryAcquire lent a session from an empty pool")
	}
	c := acquire(t, p)
	id := c.ID()
	if p.TryAcquire() != nil {
		t.Fatal("TryAcquire lent a session past the cap")
	}
	c.Release()
	c = p.TryAcquire()
	if c == nil || c.ID() != id {
		t.Fatalf("TryAcquire with a session idle: %v, want session %d", c, id)
	}
	if err := send(c, 1); err != nil {
		t.Fatal(err)
	}
	c.Release()
	if st, n := p.Stat(), up.Stats().Conns; n != 1 || st.ConnsOpened != 1 || st.ConnectFailures != 0 || st.TotalConns != 1 {
		t.Errorf("upstream saw %d connections; pool %+v; want one session, no failure", n, st)
	}
}

// openCounter is a Config.Dial that counts the connections open (dialled,
// not yet closed), and records the most that were open at a dial.
type openCounter struct {
	mu               sync.Mutex
	open, mostAtDial int
}

func (o *openCounter) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	o.mu.Lock()
	o.mostAtDial = max(o.mostAtDial, o.open)
	o.open++
	o.mu.Unlock()
	return &closeCounted{Conn: c, o: o}, nil
}

func (o *openCounter) reset() {
	o.mu.Lock()
	o.mostAtDial = 0
	o.mu.Unlock()
}

type closeCounted struct {
	net.Conn
	o    *openCounter
	once sync.Once
}

func (c *closeCounted) Close() error {
	c.once.Do(func() {
		c.o.mu.Lock()
		c.o.open--
		c.o.mu.Unlock()
	})
	return c.Conn.Close()
}

// TestClosedSessionKeepsItsCapPlaceUntilItsConnectionCloses: under a cap
// lowered below MaxConns, a lent session that is closed gives its place
// back only once its connection is closed, so that no new session is
// dialled while it closes: an upstream that counts concurrent connections
// (Exchange Online, with its 432 4.3.2) counts a closing one too.
func TestClosedSessionKeepsItsCapPlaceUntilItsConnectionCloses(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{SessionLimit: 1})
	o := &openCounter{}
	p := newPool(t, up, pool.Config{MaxConns: 2, Dial: o.dial})
	first, second := acquire(t, p), acquire(t, p)
	if err := send(second, 0); !errors.Is(err, pool.ErrCapLowered) {
		t.Fatalf("send over the session limit: %v, want the cap lowered", err)
	}
	second.Discard()
	first.Discard()
	o.reset()
	for i := range 20 {
		// The upstream closes its side a moment after QUIT, so it may
		// still count the last session and refuse this one's message:
		// what the pool controls is when it dials.
		c := acquire(t, p)
		send(c, i+1)
		c.Discard()
	}
	if o.mostAtDial != 0 {
		t.Errorf("a session was dialled while %d others were still open, under a cap of 1", o.mostAtDial)
	}
}

// TestSessionOutOfStepIsNotReused: an upstream whose replies no longer
// match the commands sent has left a reply on the session that the next
// transaction would take for its own: the session is closed when it is
// released, never lent again, and the next transaction gets a fresh one.
func TestSessionOutOfStepIsNotReused(t *testing.T) {
	tests := []struct {
		name    string
		replies map[string]string // the first connection's replies, by command
		wantErr bool              // the first transaction fails
	}{
		{name: "end of message answered twice", replies: map[string]string{".": "250 2.0.0 queued\r\n250 2.0.0 queued again"}},
		{name: "refused MAIL, then a broken reply to RCPT", replies: map[string]string{"MAIL": "550 5.7.1 no", "RCPT": "25x what"}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ln.Close() })
			var conns atomic.Int64
			go func() {
				for {
					conn, err := ln.Accept()
					if err != nil {
						return
					}
					replies := tt.replies
					if conns.Add(1) > 1 {
						replies = nil
					}
					go serveScripted(conn, replies)
				}
			}()
			p, err := pool.New(pool.Config{Addr: ln.Addr().String(), TLS: pool.TLSNone})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(p.Close)
			c := acquire(t, p)
			_, err = c.Envelope(context.Background(), "sender@example.com", nil, recipients[:1])
			if err == nil {
				_, err = c.Data(context.Background(), strings.NewReader("Subject: x\r\n\r\nbody\r\n"))
			}
			if (err != nil) != tt.wantErr {
				t.Fatalf("first transaction: %v, want an error: %v", err, tt.wantErr)
			}
			c.Release()
			if st := p.Stat(); st.IdleConns != 0 {
				t.Errorf("%d idle sessions, want 0", st.IdleConns)
			}
			memsmtp.WaitFor(t, "the session closed as broken", func() bool { return p.Stat().ClosedBroken == 1 })
			c = acquire(t, p)
			defer c.Release()
			if err := send(c, 2); err != nil {
				t.Errorf("next transaction: %v", err)
			}
			if n := conns.Load(); n != 2 {
				t.Errorf("upstream saw %d connections, want 2", n)
			}
		})
	}
}

// serveScripted is a minimal upstream with PIPELINING that answers each
// command (and "." for the end of a message) from replies, or with 250.
func serveScripted(conn net.Conn, replies map[string]string) {
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	tp := textproto.NewConn(conn)
	tp.PrintfLine("220 scripted.test ESMTP")
	reply := func(cmd, otherwise string) {
		if r, ok := replies[cmd]; ok {
			otherwise = r
		}
		tp.PrintfLine("%s", otherwise)
	}
	for {
		l, err := tp.ReadLine()
		if err != nil {
			return
		}
		switch verb, _, _ := strings.Cut(l, " "); strings.ToUpper(verb) {
		case "EHLO":
			tp.PrintfLine("250-scripted.test\r\n250 PIPELINING")
		case "DATA":
			tp.PrintfLine("354 go ahead")
			if _, err := tp.ReadDotBytes(); err != nil {
				return
			}
			reply(".", "250 2.0.0 queued")
		case "QUIT":
			tp.PrintfLine("221 bye")
			return
		default:
			reply(strings.ToUpper(verb), "250 ok")
		}
	}
}
