package proxy_test

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
	"github.com/smtppool/smtppool/proxy"
)

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
	memsmtp.WaitFor(t, "the second transaction to queue for a session", func() bool { return e.pool.Stat().PendingAcquires == 1 })

	finish(t, holder, "first@example.com", message("first"))
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

// TestAcquireTimeoutWhileTheUpstreamIsFull: a transaction waiting for the
// pool's next probe of an upstream that refuses every session over its
// connection limit (the pool's wait since 4727273, outside puddle) still
// gets 451 4.4.5 at SMTPPOOL_ACQUIRE_TIMEOUT; no dial is made for it but
// the first refused ones, and every acquire given up is counted
// (acquires_canceled_total), wherever it waited.
func TestAcquireTimeoutWhileTheUpstreamIsFull(t *testing.T) {
	const timeout = 300 * time.Millisecond
	e := newEnv(t, options{
		pool:  pool.Config{MaxConns: 3, ProbeBackoff: time.Minute, ProbeBackoffMax: time.Minute},
		proxy: proxy.Config{AcquireTimeout: timeout},
	})
	e.up.Inject(memsmtp.Banner, memsmtp.Repeat(memsmtp.Fault{Reply: reply(421, [3]int{4, 7, 0}, "Error: too many connections from 127.0.0.1")}, 100)...)
	errs := make(chan error, 3)
	start := time.Now()
	for range 3 {
		go func() {
			c, err := smtp.Dial(e.addr)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			errs <- c.Mail("app@example.com", nil)
		}()
	}
	for range 3 {
		err := <-errs
		var got *smtp.SMTPError
		if !errors.As(err, &got) || got.Code != 451 || got.EnhancedCode != (smtp.EnhancedCode{4, 4, 5}) {
			t.Errorf("MAIL while the upstream refuses every session: %v, want 451 4.4.5", err)
		}
	}
	if waited := time.Since(start); waited > 10*timeout {
		t.Errorf("replies after %v, want about the acquire timeout, %v", waited.Round(time.Millisecond), timeout)
	}
	if st := e.pool.Stat(); st.ConnectFailures > 3 || st.CanceledAcquireCount != 3 {
		t.Errorf("%d connect failures, %d acquires counted as given up; want at most the first refused set-ups, and 3", st.ConnectFailures, st.CanceledAcquireCount)
	}
}
