package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
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

	if o.proxy.RetryBackoff == 0 {
		o.proxy.RetryBackoff = time.Millisecond
	}
	if o.proxy.RetryBackoffMax == 0 {
		o.proxy.RetryBackoffMax = 5 * time.Millisecond
	}
	ctx, cancel := context.WithCancel(context.Background())
	srv := proxy.NewServer(ctx, p, o.proxy)
	ln, err := proxy.Listen(ctx, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() {
		srv.Close()
		cancel()
		p.Close()
	})
	return &testEnv{up: up, pool: p, srv: srv, addr: ln.Addr().String()}
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

func times(f memsmtp.Fault, n int) []memsmtp.Fault {
	fs := make([]memsmtp.Fault, n)
	for i := range fs {
		fs[i] = f
	}
	return fs
}

// TestUpstreamReplyReachesClient maps what the upstream does to what the
// client hears, with 4 tries per transaction.
func TestUpstreamReplyReachesClient(t *testing.T) {
	tests := []struct {
		name   string
		faults map[memsmtp.Command][]memsmtp.Fault
		// The client's outcome: wantStep "" means 250 for the message.
		wantStep string
		want     *smtp.SMTPError
		// The upstream's view.
		wantCopies int
		wantConns  int64
	}{
		{name: "accepted", wantCopies: 1, wantConns: 1},
		{
			name:     "RCPT 550 passes through",
			faults:   map[memsmtp.Command][]memsmtp.Fault{memsmtp.Rcpt: {{Reply: reply(550, [3]int{5, 1, 1}, "No such user")}}},
			wantStep: "RCPT", want: reply(550, [3]int{5, 1, 1}, "No such user"), wantConns: 1,
		},
		{
			name:     "MAIL 553 passes through",
			faults:   map[memsmtp.Command][]memsmtp.Fault{memsmtp.Mail: {{Reply: reply(553, [3]int{5, 7, 1}, "Sender not allowed")}}},
			wantStep: "MAIL", want: reply(553, [3]int{5, 7, 1}, "Sender not allowed"), wantConns: 1,
		},
		{
			name:     "end of DATA 554 passes through",
			faults:   map[memsmtp.Command][]memsmtp.Fault{memsmtp.Data: {{Reply: reply(554, [3]int{5, 7, 1}, "Spam")}}},
			wantStep: "end of DATA", want: reply(554, [3]int{5, 7, 1}, "Spam"), wantConns: 1,
		},
		{
			// A wrong password is the operator's to fix; the message must
			// not bounce for it.
			name:     "AUTH 535 is a set-up failure, not a bounce",
			faults:   map[memsmtp.Command][]memsmtp.Fault{memsmtp.Auth: {{Reply: reply(535, [3]int{5, 7, 8}, "Bad credentials")}}},
			wantStep: "MAIL", want: reply(451, [3]int{4, 3, 5}, "Cannot set up a session with the upstream server as configured; see smtppool's log"), wantConns: 1,
		},
		{
			name:       "421 banner is retried",
			faults:     map[memsmtp.Command][]memsmtp.Fault{memsmtp.Banner: {{Reply: reply(421, [3]int{4, 7, 0}, "Too many connections")}}},
			wantCopies: 1, wantConns: 2,
		},
		{
			name:       "AUTH 454 is retried",
			faults:     map[memsmtp.Command][]memsmtp.Fault{memsmtp.Auth: {{Reply: reply(454, [3]int{4, 7, 0}, "Too many login attempts")}}},
			wantCopies: 1, wantConns: 2,
		},
		{
			// A 4xx to RCPT concerns that recipient: the healthy session
			// is kept and the RCPT retried on it.
			name:       "RCPT 451 is retried on the same session",
			faults:     map[memsmtp.Command][]memsmtp.Fault{memsmtp.Rcpt: {{Reply: reply(451, [3]int{4, 3, 0}, "Try later")}}},
			wantCopies: 1, wantConns: 1,
		},
		{
			name:       "connection dropped at RCPT is retried",
			faults:     map[memsmtp.Command][]memsmtp.Fault{memsmtp.Rcpt: {{Drop: true}}},
			wantCopies: 1, wantConns: 2,
		},
		{
			name:       "end of DATA 451 is retried",
			faults:     map[memsmtp.Command][]memsmtp.Fault{memsmtp.Data: {{Reply: reply(451, [3]int{4, 3, 0}, "Queue full")}}},
			wantCopies: 1, wantConns: 2,
		},
		{
			name:       "connection dropped mid-DATA is retried",
			faults:     map[memsmtp.Command][]memsmtp.Fault{memsmtp.Data: {{Drop: true}}},
			wantCopies: 1, wantConns: 2,
		},
		{
			// The documented ambiguous case: the upstream kept the message
			// but its reply was lost. The resend makes a duplicate; nothing
			// is lost.
			name:       "connection dropped after the final dot is retried, may duplicate",
			faults:     map[memsmtp.Command][]memsmtp.Fault{memsmtp.Data: {{Drop: true, Deliver: true}}},
			wantCopies: 2, wantConns: 2,
		},
		{
			name:     "MAIL 450 until tries run out",
			faults:   map[memsmtp.Command][]memsmtp.Fault{memsmtp.Mail: times(memsmtp.Fault{Reply: reply(450, [3]int{4, 2, 1}, "Mailbox busy")}, 4)},
			wantStep: "MAIL", want: reply(450, [3]int{4, 2, 1}, "Mailbox busy"), wantConns: 4,
		},
		{
			name:     "421 at end of DATA until tries run out becomes 451",
			faults:   map[memsmtp.Command][]memsmtp.Fault{memsmtp.Data: times(memsmtp.Fault{Reply: reply(421, [3]int{4, 3, 2}, "Shutting down")}, 4)},
			wantStep: "end of DATA", want: reply(451, [3]int{4, 3, 2}, "Shutting down"), wantConns: 4,
		},
		{
			// go-smtp's client expects exactly 250; resending after a 251
			// would deliver twice.
			name:       "any 2xx at end of DATA accepts the message",
			faults:     map[memsmtp.Command][]memsmtp.Fault{memsmtp.Data: {{Deliver: true, Reply: reply(251, [3]int{2, 1, 5}, "Accepted")}}},
			wantCopies: 1, wantConns: 1,
		},
		{
			name:     "452 to RCPT without an enhanced code is not retried",
			faults:   map[memsmtp.Command][]memsmtp.Fault{memsmtp.Rcpt: {{Reply: reply(452, smtp.NoEnhancedCode, "Too many recipients")}}},
			wantStep: "RCPT", want: reply(452, [3]int{4, 0, 0}, "Too many recipients"), wantConns: 1,
		},
		{
			name:     "452 4.5.3 too many recipients is not retried",
			faults:   map[memsmtp.Command][]memsmtp.Fault{memsmtp.Rcpt: {{Reply: reply(452, [3]int{4, 5, 3}, "Too many recipients")}}},
			wantStep: "RCPT", want: reply(452, [3]int{4, 5, 3}, "Too many recipients"), wantConns: 1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, options{proxy: proxy.Config{MaxAttempts: 4}})
			for cmd, faults := range tt.faults {
				e.up.Inject(cmd, faults...)
			}
			c := e.dial(t)
			err := send(c, "app@example.com", []string{"user@example.com"}, message("m1"))

			var se *sendErr
			var got *smtp.SMTPError
			switch {
			case tt.wantStep == "" && err != nil:
				t.Fatalf("send: %v, want success", err)
			case tt.wantStep != "" && (!errors.As(err, &se) || se.step != tt.wantStep || !errors.As(err, &got)):
				t.Fatalf("send: %v, want an SMTP error at %s", err, tt.wantStep)
			case tt.wantStep != "" && (got.Code != tt.want.Code || got.EnhancedCode != tt.want.EnhancedCode || got.Message != tt.want.Message):
				t.Errorf("client got %d %v %q, want %d %v %q", got.Code, got.EnhancedCode, got.Message,
					tt.want.Code, tt.want.EnhancedCode, tt.want.Message)
			}
			if err := c.Quit(); err != nil {
				t.Errorf("QUIT: %v", err)
			}

			msgs := e.up.Messages()
			if len(msgs) != tt.wantCopies {
				t.Errorf("upstream has %d copies, want %d", len(msgs), tt.wantCopies)
			}
			for _, m := range msgs {
				if m.MessageID() != "<m1@test>" || m.From != "app@example.com" || strings.Join(m.To, ",") != "user@example.com" {
					t.Errorf("upstream message %q from %q to %q is not the one sent", m.MessageID(), m.From, m.To)
				}
			}
			if n := e.up.Stats().Conns; n != tt.wantConns {
				t.Errorf("upstream saw %d connections, want %d", n, tt.wantConns)
			}
		})
	}
}

// TestPoolingProof: 200 clients at once, three upstream sessions.
func TestPoolingProof(t *testing.T) {
	const clients = 200
	// The busiest session may carry more than the default 100 messages
	// (idle sessions are reused last-in, first-out); renewing it would be
	// a fourth AUTH, correct but not what this test is about.
	e := newEnv(t, options{pool: pool.Config{MaxConns: 3, MaxMessagesPerConn: clients}})
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := smtp.Dial(e.addr)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			if err := send(c, "app@example.com", []string{fmt.Sprintf("user%d@example.com", i)}, message(fmt.Sprint(i))); err != nil {
				errs <- fmt.Errorf("client %d: %w", i, err)
				return
			}
			errs <- c.Quit()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	st := e.up.Stats()
	t.Logf("upstream: %d messages, %d connections, at most %d at once, %d AUTHs", st.Messages, st.Conns, st.MaxOpen, st.Auths)
	if st.MaxOpen > 3 || st.Auths > 3 || st.Conns > 3 {
		t.Errorf("upstream saw %d concurrent connections, %d connections, %d AUTHs; want at most 3 each", st.MaxOpen, st.Conns, st.Auths)
	}
	seen := map[string]bool{}
	for _, m := range e.up.Messages() {
		seen[m.MessageID()] = true
	}
	for i := range clients {
		if !seen[fmt.Sprintf("<%d@test>", i)] {
			t.Errorf("message %d not delivered", i)
		}
	}
	if st.Messages != clients {
		t.Errorf("upstream has %d messages, want %d", st.Messages, clients)
	}
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

func TestGreetingDoesNotWaitForThePool(t *testing.T) {
	e := newEnv(t, options{pool: pool.Config{MaxConns: 1}})
	holder := holdSession(t, e)
	defer holder.Close()

	c, err := smtp.Dial(e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Hello("second.test"); err != nil { // reads the greeting first
		t.Fatalf("greeting and EHLO while the pool is exhausted: %v", err)
	}
	if st := e.pool.Stat(); st.AcquiredConns != 1 {
		t.Fatalf("session was released during the test: %+v", st)
	}
}

func TestBackpressureWaitsForAFreeSession(t *testing.T) {
	e := newEnv(t, options{pool: pool.Config{MaxConns: 1}})
	holder := holdSession(t, e)

	waiter := e.dial(t)
	done := make(chan error, 1)
	go func() {
		done <- send(waiter, "app@example.com", []string{"second@example.com"}, message("second"))
	}()
	waitFor(t, "the second transaction to queue for a session", func() bool { return e.pool.Stat().PendingAcquires == 1 })

	if err := holder.Rcpt("first@example.com", nil); err != nil {
		t.Fatal(err)
	}
	w, err := holder.Data()
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte(message("first")))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := holder.Quit(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("queued transaction: %v", err)
	}
	if st := e.up.Stats(); st.Messages != 2 || st.Conns != 1 {
		t.Errorf("upstream: %d messages over %d connections, want 2 over 1", st.Messages, st.Conns)
	}
}

func TestBackpressureGivesUpAfterAcquireTimeout(t *testing.T) {
	e := newEnv(t, options{pool: pool.Config{MaxConns: 1}, proxy: proxy.Config{AcquireTimeout: 50 * time.Millisecond}})
	holder := holdSession(t, e)
	defer holder.Close()

	c := e.dial(t)
	err := c.Mail("app@example.com", nil)
	var got *smtp.SMTPError
	if !errors.As(err, &got) || got.Code != 451 || got.EnhancedCode != (smtp.EnhancedCode{4, 4, 5}) {
		t.Fatalf("MAIL with the pool exhausted: %v, want 451 4.4.5", err)
	}
	if !strings.Contains(got.Message, "busy") {
		t.Errorf("reply text %q does not say the upstream sessions are busy", got.Message)
	}
}

// TestAcknowledgementIsExact: the client's 250 comes after the upstream
// kept the message, never before.
func TestAcknowledgementIsExact(t *testing.T) {
	e := newEnv(t, options{})
	e.up.Inject(memsmtp.Data, memsmtp.Fault{Delay: 100 * time.Millisecond})
	c := e.dial(t)
	if err := send(c, "app@example.com", []string{"user@example.com"}, message("slow")); err != nil {
		t.Fatal(err)
	}
	if n := e.up.Stats().Messages; n != 1 {
		t.Fatalf("client got 250 while the upstream had %d messages, want 1", n)
	}
}

func TestRejectedRecipientIsNotDropped(t *testing.T) {
	e := newEnv(t, options{})
	e.up.Inject(memsmtp.Rcpt, memsmtp.Fault{}, memsmtp.Fault{Reply: reply(550, [3]int{5, 1, 1}, "No such user")})
	c := e.dial(t)
	if err := c.Mail("app@example.com", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("good@example.com", nil); err != nil {
		t.Fatal(err)
	}
	var got *smtp.SMTPError
	if err := c.Rcpt("gone@example.com", nil); !errors.As(err, &got) || got.Code != 550 {
		t.Fatalf("RCPT of a rejected recipient: %v, want 550", err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte(message("partial")))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	msgs := e.up.Messages()
	if len(msgs) != 1 || strings.Join(msgs[0].To, ",") != "good@example.com" {
		t.Errorf("upstream got %v, want one message to good@example.com", msgs)
	}
}

// TestRetryReplaysAcceptedRecipients: a failure at the third RCPT replays
// MAIL and the first two on a fresh session.
func TestRetryReplaysAcceptedRecipients(t *testing.T) {
	e := newEnv(t, options{})
	e.up.Inject(memsmtp.Rcpt, memsmtp.Fault{}, memsmtp.Fault{}, memsmtp.Fault{Drop: true})
	c := e.dial(t)
	to := []string{"a@example.com", "b@example.com", "c@example.com"}
	if err := send(c, "app@example.com", to, message("replay")); err != nil {
		t.Fatal(err)
	}
	msgs := e.up.Messages()
	if len(msgs) != 1 || strings.Join(msgs[0].To, ",") != strings.Join(to, ",") {
		t.Errorf("upstream got %v, want one message to %v", msgs, to)
	}
}

func TestManyTransactionsOverOneClientConnection(t *testing.T) {
	e := newEnv(t, options{})
	c := e.dial(t)
	for i := range 3 {
		if err := send(c, "app@example.com", []string{"user@example.com"}, message(fmt.Sprint(i))); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
	}
	if err := c.Quit(); err != nil {
		t.Fatal(err)
	}
	st := e.up.Stats()
	if st.Messages != 3 || st.Conns != 1 || st.Auths != 1 || st.Commands["EHLO"] != 1 {
		t.Errorf("upstream: %d messages, %d connections, %d AUTH, %d EHLO; want 3, 1, 1, 1",
			st.Messages, st.Conns, st.Auths, st.Commands["EHLO"])
	}
}

func TestUpstreamDownGivesTemporaryFailureWithoutDetails(t *testing.T) {
	e := newEnv(t, options{proxy: proxy.Config{MaxAttempts: 2}})
	e.up.Close()
	c := e.dial(t)
	err := c.Mail("app@example.com", nil)
	var got *smtp.SMTPError
	if !errors.As(err, &got) || got.Code != 451 || got.EnhancedCode != (smtp.EnhancedCode{4, 4, 0}) {
		t.Fatalf("MAIL with the upstream down: %v, want 451 4.4.0", err)
	}
	if host, _, _ := net.SplitHostPort(e.up.Addr); strings.Contains(got.Message, host) || strings.Contains(got.Message, "dial") {
		t.Errorf("reply %q leaks internal details", got.Message)
	}
}

func TestLimits(t *testing.T) {
	e := newEnv(t, options{proxy: proxy.Config{MaxMessageBytes: 1024, MaxRecipients: 2}})
	c := e.dial(t)
	if ok, size := c.Extension("SIZE"); !ok || size != "1024" {
		t.Errorf("SIZE extension = %v %q, want 1024", ok, size)
	}

	var got *smtp.SMTPError
	err := c.Mail("app@example.com", &smtp.MailOptions{Size: 2048})
	if !errors.As(err, &got) || got.Code != 552 || got.EnhancedCode != (smtp.EnhancedCode{5, 3, 4}) {
		t.Errorf("MAIL SIZE=2048: %v, want 552 5.3.4", err)
	}

	err = send(c, "app@example.com", []string{"user@example.com"}, message("big")+strings.Repeat("xxxxxxx\r\n", 256))
	if !errors.As(err, &got) || got.Code != 552 || got.EnhancedCode != (smtp.EnhancedCode{5, 3, 4}) {
		t.Errorf("2 KiB message: %v, want 552 5.3.4", err)
	}

	err = send(c, "app@example.com", []string{"a@example.com", "b@example.com", "c@example.com"}, message("many"))
	if !errors.As(err, &got) || got.Code != 452 || got.EnhancedCode != (smtp.EnhancedCode{4, 5, 3}) {
		t.Errorf("third recipient: %v, want 452 4.5.3", err)
	}
	if n := e.up.Stats().Messages; n != 0 {
		t.Errorf("upstream got %d messages, want none", n)
	}

	c = e.dial(t)
	err = send(c, "app@example.com", []string{"user@example.com"}, message("long line")+strings.Repeat("x", 3000)+"\r\n")
	if !errors.As(err, &got) || got.Code != 554 || got.EnhancedCode != (smtp.EnhancedCode{5, 6, 0}) {
		t.Errorf("3000-byte line: %v, want 554 5.6.0", err)
	}
}

func TestExtensionsAdvertised(t *testing.T) {
	e := newEnv(t, options{})
	c := e.dial(t)
	for _, ext := range []string{"SIZE", "8BITMIME", "SMTPUTF8", "PIPELINING"} {
		if ok, _ := c.Extension(ext); !ok {
			t.Errorf("EHLO reply lacks %s", ext)
		}
	}
	if ok, _ := c.Extension("AUTH"); ok {
		t.Errorf("EHLO reply offers AUTH, which the proxy does not implement")
	}
}

// TestExtensionsCarriedThrough: MAIL parameters reach an upstream that
// supports them; one that does not gets the message unaltered where the
// parameter changes nothing, and the client gets an error otherwise.
func TestExtensionsCarriedThrough(t *testing.T) {
	ascii := message("ascii")
	eightBitBody := message("8bit") + "Grüße\r\n"
	utf8Header := "Subject: Grüße\r\n\r\nbody\r\n"
	tests := []struct {
		name     string
		hide     []string
		upSize   int64
		from     string
		opts     smtp.MailOptions
		msg      string
		wantStep string
		want     *smtp.SMTPError
		wantOpts smtp.MailOptions
	}{
		{name: "all supported", from: "josé@example.com", opts: smtp.MailOptions{UTF8: true, Size: 500}, msg: utf8Header,
			wantOpts: smtp.MailOptions{UTF8: true, Size: 500, Body: smtp.Body8BitMIME}},
		{name: "SMTPUTF8 on an ASCII message", hide: []string{"SMTPUTF8"}, from: "app@example.com", opts: smtp.MailOptions{UTF8: true}, msg: ascii,
			wantOpts: smtp.MailOptions{Body: smtp.Body8BitMIME}},
		{name: "non-ASCII sender without SMTPUTF8", hide: []string{"SMTPUTF8"}, from: "josé@example.com", opts: smtp.MailOptions{UTF8: true}, msg: ascii,
			wantStep: "MAIL", want: reply(553, [3]int{5, 6, 7}, "")},
		{name: "non-ASCII header without SMTPUTF8", hide: []string{"SMTPUTF8"}, from: "app@example.com", opts: smtp.MailOptions{UTF8: true}, msg: utf8Header,
			wantStep: "end of DATA", want: reply(554, [3]int{5, 6, 9}, "")},
		{name: "7-bit message without 8BITMIME", hide: []string{"8BITMIME"}, from: "app@example.com", msg: ascii},
		{name: "8-bit message without 8BITMIME", hide: []string{"8BITMIME"}, from: "app@example.com", msg: eightBitBody,
			wantStep: "end of DATA", want: reply(554, [3]int{5, 6, 3}, "")},
		{name: "SIZE over the upstream's limit", upSize: 400, from: "app@example.com", opts: smtp.MailOptions{Size: 500}, msg: ascii,
			wantStep: "MAIL", want: reply(552, [3]int{5, 3, 4}, "")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, options{upstream: memsmtp.Options{Hide: tt.hide, MaxMessageBytes: tt.upSize}})
			c := e.dial(t)
			err := c.Mail(tt.from, &tt.opts)
			step := "MAIL"
			if err == nil {
				step = "RCPT"
				if err = c.Rcpt("user@example.com", nil); err == nil {
					var w *smtp.DataCommand
					if w, err = c.Data(); err == nil {
						w.Write([]byte(tt.msg))
						step, err = "end of DATA", w.Close()
					}
				}
			}
			var got *smtp.SMTPError
			switch {
			case tt.want == nil && err != nil:
				t.Fatalf("%s: %v", step, err)
			case tt.want != nil && (step != tt.wantStep || !errors.As(err, &got) || got.Code != tt.want.Code || got.EnhancedCode != tt.want.EnhancedCode):
				t.Fatalf("%s: %v, want %d %v at %s", step, err, tt.want.Code, tt.want.EnhancedCode, tt.wantStep)
			}
			msgs := e.up.Messages()
			if tt.want != nil {
				if len(msgs) != 0 {
					t.Errorf("upstream got %d messages, want none", len(msgs))
				}
				return
			}
			if len(msgs) != 1 {
				t.Fatalf("upstream got %d messages, want 1", len(msgs))
			}
			m := msgs[0]
			if string(m.Data) != tt.msg {
				t.Errorf("upstream got %q, want the message unaltered: %q", m.Data, tt.msg)
			}
			if m.Opts.UTF8 != tt.wantOpts.UTF8 || m.Opts.Size != tt.wantOpts.Size || m.Opts.Body != tt.wantOpts.Body {
				t.Errorf("upstream MAIL options = %+v, want %+v", m.Opts, tt.wantOpts)
			}
		})
	}
}

func TestClientAuthIdentityIsNotForwarded(t *testing.T) {
	e := newEnv(t, options{})
	c := e.dial(t)
	boss := "ceo@example.com"
	if err := c.Mail("app@example.com", &smtp.MailOptions{Auth: &boss}); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("user@example.com", nil); err != nil {
		t.Fatal(err)
	}
	w, _ := c.Data()
	w.Write([]byte(message("auth")))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if m := e.up.Messages(); len(m) != 1 || m[0].Opts.Auth != nil {
		t.Errorf("upstream MAIL AUTH= parameter = %v, want none", m[0].Opts.Auth)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestMultiLineReplyLeavesInOneWrite: the EHLO reply's lines reach the
// client together, not one system call each.
func TestMultiLineReplyLeavesInOneWrite(t *testing.T) {
	e := newEnv(t, options{})
	conn, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	buf := make([]byte, 4096)
	n, err := conn.Read(buf)
	if err != nil || !strings.HasPrefix(string(buf[:n]), "220 ") {
		t.Fatalf("greeting: %q, %v", buf[:n], err)
	}
	if _, err := conn.Write([]byte("EHLO client.test\r\n")); err != nil {
		t.Fatal(err)
	}
	n, err = conn.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(string(buf[:n]), "\r\n"), "\r\n")
	if len(lines) < 5 || !strings.HasPrefix(lines[len(lines)-1], "250 ") {
		t.Errorf("one read returned %d lines %q, want the whole EHLO reply", len(lines), lines)
	}
	if _, err := conn.Write([]byte("QUIT\r\n")); err != nil {
		t.Fatal(err)
	}
	n, _ = conn.Read(buf)
	if !strings.HasPrefix(string(buf[:n]), "221 ") {
		t.Errorf("QUIT reply %q, want 221 before the close", buf[:n])
	}
}

// TestBareLineFeedsCannotSmuggleMessages: a bare LF ends no line and no
// message on the way in; on the way out it becomes CRLF and a line that
// starts with a dot is dot-stuffed, so "\n.\n" cannot end the message early
// at the upstream (SMTP smuggling).
func TestBareLineFeedsCannotSmuggleMessages(t *testing.T) {
	e := newEnv(t, options{})
	conn, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := smtp.NewClient(conn)
	if err := c.Hello("client.test"); err != nil {
		t.Fatal(err)
	}
	if err := c.Mail("app@example.com", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("user@example.com", nil); err != nil {
		t.Fatal(err)
	}
	// DATA by hand: go-smtp's client would fix the line endings itself.
	body := "Subject: smuggle\r\n\r\nhello\n.\nMAIL FROM:<evil@example.com>\nRCPT TO:<victim@example.com>\nDATA\nforged\n.\n\r\n.\r\n"
	fmt.Fprintf(conn, "DATA\r\n")
	buf := make([]byte, 512)
	if n, _ := conn.Read(buf); !strings.HasPrefix(string(buf[:n]), "354") {
		t.Fatalf("DATA reply %q", buf[:n])
	}
	fmt.Fprint(conn, body)
	if n, _ := conn.Read(buf); !strings.HasPrefix(string(buf[:n]), "250") {
		t.Fatalf("end of DATA reply %q", buf[:n])
	}
	msgs := e.up.Messages()
	if len(msgs) != 1 || strings.Join(msgs[0].To, ",") != "user@example.com" {
		t.Fatalf("upstream got %d messages %v, want exactly the one sent", len(msgs), msgs)
	}
	want := "Subject: smuggle\r\n\r\nhello\r\n.\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nforged\r\n.\r\n\r\n"
	if got := string(msgs[0].Data); got != want {
		t.Errorf("upstream message %q, want %q", got, want)
	}
}

// TestNestedMailIsRefused: MAIL inside a transaction gets 503 and leaves the
// transaction as it was.
func TestNestedMailIsRefused(t *testing.T) {
	e := newEnv(t, options{})
	c := e.dial(t)
	if err := c.Mail("first@example.com", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("a@example.com", nil); err != nil {
		t.Fatal(err)
	}
	var got *smtp.SMTPError
	if err := c.Mail("second@example.com", nil); !errors.As(err, &got) || got.Code != 503 {
		t.Fatalf("nested MAIL: %v, want 503", err)
	}
	if err := c.Rcpt("b@example.com", nil); err != nil {
		t.Fatal(err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte(message("nested")))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	m := e.up.Messages()
	if len(m) != 1 || m[0].From != "first@example.com" || strings.Join(m[0].To, ",") != "a@example.com,b@example.com" {
		t.Errorf("upstream got %+v, want one message from first@ to a@ and b@", m)
	}
}
