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

// outage is an upstream that can be taken down and brought back on the
// same address, in front of a proxy.
type outage struct {
	t    *testing.T
	addr string
	mu   sync.Mutex
	up   *memsmtp.Server
}

func (o *outage) start() {
	o.t.Helper()
	up, err := memsmtp.Start(memsmtp.Options{Addr: o.addr})
	if err != nil {
		o.t.Fatal(err)
	}
	o.mu.Lock()
	o.up, o.addr = up, up.Addr
	o.mu.Unlock()
}

func (o *outage) stop() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.up.Close()
}

// newOutageEnv starts an upstream and a proxy relaying to it without AUTH.
func newOutageEnv(t *testing.T, pc pool.Config, xc proxy.Config) (*outage, string) {
	o := &outage{t: t, addr: "127.0.0.1:0"}
	o.start()
	t.Cleanup(o.stop)
	pc.Addr, pc.TLS = o.addr, pool.TLSNone
	p, err := pool.New(pc)
	if err != nil {
		t.Fatal(err)
	}
	_, addr := serve(t, p, xc)
	return o, addr
}

// TestRetryWindowRidesOutAnOutage: an upstream that is down for a second
// costs the client a wait, not its message.
func TestRetryWindowRidesOutAnOutage(t *testing.T) {
	o, addr := newOutageEnv(t, pool.Config{ProbeBackoff: 20 * time.Millisecond, ProbeBackoffMax: 100 * time.Millisecond},
		proxy.Config{RetryBackoff: 10 * time.Millisecond, RetryBackoffMax: 100 * time.Millisecond})
	o.stop()
	restarted := make(chan struct{})
	go func() {
		defer close(restarted)
		time.Sleep(time.Second) // the outage itself
		o.start()
	}()
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := send(c, "app@example.com", []string{"user@example.com"}, message("outage")); err != nil {
		t.Fatalf("send during a one-second outage: %v", err)
	}
	<-restarted
	if n := len(o.up.Messages()); n != 1 {
		t.Errorf("upstream has %d messages after the outage, want 1", n)
	}
}

// TestClosedIdleSessionCostsNoRetry: a session whose connection the
// upstream closed while it sat idle (an upstream restart, an idle timeout
// shorter than ours) is replaced when a transaction takes it at MAIL, not
// lent to fail the first write: the transaction is delivered with no
// retry, and so no pause of SMTPPOOL_RETRY_BACKOFF.
func TestClosedIdleSessionCostsNoRetry(t *testing.T) {
	retries := &retryCounter{reasons: map[string]int{}}
	e := newEnv(t, options{pool: pool.Config{MaxConns: 1, PingAfterIdle: time.Hour}, proxy: proxy.Config{Observer: retries}})
	c := e.dial(t)
	if err := send(c, "app@example.com", []string{"user@example.com"}, message("before")); err != nil {
		t.Fatal(err)
	}
	e.up.CloseConns()
	memsmtp.WaitFor(t, "the upstream to close the connection", func() bool { return e.up.Stats().Open == 0 })
	if err := send(c, "app@example.com", []string{"user@example.com"}, message("after")); err != nil {
		t.Fatal(err)
	}
	if retries.String() != "map[]" {
		t.Errorf("retries %v after the upstream closed an idle session; want none", retries)
	}
	if n := len(e.up.Messages()); n != 2 {
		t.Errorf("upstream has %d messages, want 2", n)
	}
}

// TestRecoveryEndsTheRetryPause: a transaction that failed to get a
// session while the upstream was down waits out its pause (here a minute)
// only until the upstream is back: the first transaction that gets a
// session then wakes it. Before, it slept its whole pause, and after an
// outage the transactions holding the buffer budget slept up to
// RetryBackoffMax each while sessions stood idle.
func TestRecoveryEndsTheRetryPause(t *testing.T) {
	const pause = time.Minute
	retries := &retryCounter{reasons: map[string]int{}}
	// A probe is due at once after a failure, so that the second
	// transaction probes rather than pauses too.
	o, addr := newOutageEnv(t, pool.Config{ProbeBackoff: time.Nanosecond, ProbeBackoffMax: time.Nanosecond},
		proxy.Config{RetryBackoff: pause, RetryBackoffMax: pause, RetryTimeout: 2 * pause, Observer: retries})
	o.stop()
	sent := make(chan error, 1)
	go func() {
		c, err := smtp.Dial(addr)
		if err != nil {
			sent <- err
			return
		}
		defer c.Close()
		sent <- send(c, "app@example.com", []string{"user@example.com"}, message("waits out the outage"))
	}()
	memsmtp.WaitFor(t, "the first transaction to pause after failing to connect", func() bool { return retries.count("connect") > 0 })
	o.start()

	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := send(c, "app@example.com", []string{"user@example.com"}, message("after the outage")); err != nil {
		t.Fatalf("send once the upstream is back: %v", err)
	}
	select {
	case err := <-sent:
		if err != nil {
			t.Fatalf("the transaction that paused: %v", err)
		}
	case <-time.After(pause / 2):
		t.Fatalf("the transaction that paused was still waiting %v after the upstream came back (retries: %v)", pause/2, retries)
	}
	if n := len(o.up.Messages()); n != 2 {
		t.Errorf("upstream has %d messages, want 2", n)
	}
}

// TestRetryWindowEnds: past SMTPPOOL_RETRY_TIMEOUT the client hears of the
// failure, as a 4xx.
func TestRetryWindowEnds(t *testing.T) {
	o, addr := newOutageEnv(t, pool.Config{ProbeBackoff: 10 * time.Millisecond},
		proxy.Config{RetryTimeout: 300 * time.Millisecond, RetryBackoff: 10 * time.Millisecond, RetryBackoffMax: 50 * time.Millisecond})
	o.stop()
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	err = c.Mail("app@example.com", nil)
	took := time.Since(start)
	var got *smtp.SMTPError
	if !errors.As(err, &got) || got.Code != 451 || got.EnhancedCode != (smtp.EnhancedCode{4, 4, 0}) {
		t.Fatalf("MAIL with the upstream down: %v, want 451 4.4.0", err)
	}
	if took < 300*time.Millisecond {
		t.Errorf("client told after %v, before the retry window of 300ms", took)
	}
}

// TestReplayRefusalIsNotBlamedOnTheNextRecipient: recipients a and b were
// accepted, the connection drops at c, and on the replay the upstream
// refuses b. The client was told b was accepted: it gets a 4xx for c and
// for the message, never a 5xx, and nothing is delivered.
func TestReplayRefusalIsNotBlamedOnTheNextRecipient(t *testing.T) {
	e := newEnv(t, options{})
	e.up.Inject(memsmtp.Rcpt, memsmtp.Fault{}, memsmtp.Fault{}, memsmtp.Fault{Drop: true},
		memsmtp.Fault{}, memsmtp.Fault{Reply: reply(550, [3]int{5, 1, 1}, "No such user b")})
	c := e.dial(t)
	err := send(c, "app@example.com", []string{"a@example.com", "b@example.com", "c@example.com"}, message("replay"))
	var se *sendErr
	var got *smtp.SMTPError
	if !errors.As(err, &se) || se.step != "RCPT" || !errors.As(err, &got) || got.Code != 451 || got.EnhancedCode != (smtp.EnhancedCode{4, 3, 0}) {
		t.Fatalf("send: %v, want 451 4.3.0 at RCPT c", err)
	}
	// The client may go on to DATA with a and b: still a 4xx.
	w, err := c.Data()
	if err == nil {
		w.Write([]byte(message("replay")))
		err = w.Close()
	}
	if !errors.As(err, &got) || got.Code/100 != 4 {
		t.Errorf("DATA after the refused replay: %v, want a 4xx", err)
	}
	if n := e.up.Stats().Messages; n != 0 {
		t.Errorf("upstream has %d messages, want 0", n)
	}
}

// TestPooledSessionThatLostItsAuthIsRetired: a 530 to MAIL on a session
// that carried mail before means it lost its AUTH (some upstreams drop it
// on a repeated EHLO): a fresh session carries the message.
func TestPooledSessionThatLostItsAuthIsRetired(t *testing.T) {
	e := newEnv(t, options{})
	c := e.dial(t)
	if err := send(c, "app@example.com", []string{"user@example.com"}, message("first")); err != nil {
		t.Fatal(err)
	}
	e.up.Inject(memsmtp.Mail, memsmtp.Fault{Reply: reply(530, [3]int{5, 7, 0}, "Authentication required")})
	if err := send(c, "app@example.com", []string{"user@example.com"}, message("second")); err != nil {
		t.Fatalf("send on a pooled session that lost its AUTH: %v", err)
	}
	if st := e.up.Stats(); st.Messages != 2 || st.Conns != 2 {
		t.Errorf("upstream: %d messages over %d connections, want 2 over 2", st.Messages, st.Conns)
	}
}

// TestClientsThatLeaveWhileWaitingDoNotUseTheUpstream: during a burst,
// clients that give up while queued for a session must not take one.
func TestClientsThatLeaveWhileWaitingDoNotUseTheUpstream(t *testing.T) {
	e := newEnv(t, options{pool: pool.Config{MaxConns: 1}})
	holder := holdSession(t, e)
	for range 5 {
		c := rawDial(t, e.addr)
		c.must("EHLO leaver.test", 250)
		c.write("MAIL FROM:<leaver@example.com>\r\n")
		memsmtp.WaitFor(t, "the client to queue for a session", func() bool { return e.pool.Stat().PendingAcquires == 1 })
		c.conn.Close()
		memsmtp.WaitFor(t, "the departed client to leave the queue", func() bool { return e.pool.Stat().PendingAcquires == 0 })
	}
	finish(t, holder, "user@example.com", message("held"))
	c := e.dial(t)
	if err := send(c, "app@example.com", []string{"user@example.com"}, message("live")); err != nil {
		t.Fatal(err)
	}
	if n := e.up.Stats().Commands["MAIL"]; n != 2 {
		t.Errorf("upstream saw %d MAIL, want 2: the departed clients' must not be sent", n)
	}
}

// TestBufferBudgetHoldsWhileRetrying: messages whose relay is being
// retried keep their buffers, but never more than the budget, and
// everything is delivered. (The upstream refuses the messages with 451:
// a drop, with messages this small, would come after the whole message
// was sent, the ambiguous case, which is sent only once more.)
func TestBufferBudgetHoldsWhileRetrying(t *testing.T) {
	const (
		clients  = 12
		maxBytes = 4096
	)
	e := newEnv(t, options{pool: pool.Config{MaxConns: 1},
		proxy: proxy.Config{MaxMessageBytes: maxBytes, RetryBackoff: 20 * time.Millisecond, RetryBackoffMax: 50 * time.Millisecond}})
	e.up.Inject(memsmtp.Data, memsmtp.Repeat(memsmtp.Fault{Reply: reply(451, [3]int{4, 3, 0}, "Queue write failed")}, 2*clients)...)
	sendAtOnce(t, e.addr, clients, "budget")
	if n := e.up.Stats().Messages; n != clients {
		t.Errorf("upstream has %d messages, want %d", n, clients)
	}
	// Default budget: 2 × MaxMessageBytes × MaxConns.
	if peak := proxy.ReservedPeak(e.srv); peak > 2*maxBytes || peak == 0 {
		t.Errorf("buffers held %d bytes at most, want at most 2 × %d", peak, maxBytes)
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

// TestCapSettlesAtTheUpstreamsSessionLimit: against an upstream that lets
// 3 sessions send at once and answers 432 4.3.2 beyond (Exchange Online's
// per-mailbox limit), a pool capped at 10 delivers every message, the
// refused tries do not count against the clients, and the effective cap
// settles at 3, or at 2 now and then: the upstream still counts a
// connection the pool has closed until it has read the close, so a
// refusal may come with 3 open on the pool's side. (The cap drops to one
// below the sessions open at a refusal; a first burst may end with a cap
// of 4 whose fourth session never sent, so a second burst finds the
// limit.)
func TestCapSettlesAtTheUpstreamsSessionLimit(t *testing.T) {
	const clients = 40
	e := newEnv(t, options{upstream: memsmtp.Options{SessionLimit: 3}, pool: pool.Config{MaxConns: 10},
		proxy: proxy.Config{MaxAttempts: 2}})
	sendAtOnce(t, e.addr, clients, "limit")
	sendAtOnce(t, e.addr, clients, "limit-again")
	st := e.pool.Stat()
	if n := e.up.Stats().Messages; n != 2*clients {
		t.Errorf("upstream has %d messages, want %d", n, 2*clients)
	}
	if st.EffectiveMaxConns != 3 && st.EffectiveMaxConns != 2 {
		t.Errorf("effective cap settled at %d, want 3 (or 2)", st.EffectiveMaxConns)
	}
	t.Logf("upstream connections: %d, most open at once: %d; pool: %+v", e.up.Stats().Conns, e.up.Stats().MaxOpen, st)
}

// sendAtOnce sends n messages at once, each from its own client
// connection, and fails the test for each that is not accepted.
func sendAtOnce(t *testing.T, addr string, n int, prefix string) {
	t.Helper()
	errs := make(chan error, n)
	for i := range n {
		go func() {
			c, err := smtp.Dial(addr)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			errs <- send(c, "app@example.com", []string{"user@example.com"}, message(fmt.Sprint(prefix, i)))
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Errorf("send: %v", err)
		}
	}
}

// TestPermanentRefusalsKeepTheSession: a permanent refusal says nothing
// against the upstream session. A refused recipient leaves the
// transaction on its session, and a MAIL refused before it reached the
// upstream (too large for its SIZE) gives the session back to the pool:
// neither costs a new connection and AUTH, which count against an
// upstream's limits.
func TestPermanentRefusalsKeepTheSession(t *testing.T) {
	t.Run("refused recipient", func(t *testing.T) {
		e := newEnv(t, options{})
		c := e.dial(t)
		e.up.Inject(memsmtp.Rcpt, memsmtp.Fault{}, memsmtp.Fault{Reply: reply(550, [3]int{5, 1, 1}, "No such user")})
		if err := c.Mail("app@example.com", nil); err != nil {
			t.Fatal(err)
		}
		if err := c.Rcpt("a@example.com", nil); err != nil {
			t.Fatal(err)
		}
		var smtpErr *smtp.SMTPError
		if err := c.Rcpt("bad@example.com", nil); !errors.As(err, &smtpErr) || smtpErr.Code != 550 {
			t.Fatalf("RCPT of an unknown user: %v, want the upstream's 550", err)
		}
		finish(t, c, "b@example.com", message("refused-rcpt"))
		msgs := e.up.Messages()
		if len(msgs) != 1 || strings.Join(msgs[0].To, ",") != "a@example.com,b@example.com" {
			t.Errorf("upstream got %+v, want one message to a and b", msgs)
		}
		if st := e.up.Stats(); st.Conns != 1 || st.Auths != 1 || st.Commands["MAIL"] != 1 {
			t.Errorf("upstream saw %d connections, %d AUTH, %d MAIL; want 1 of each", st.Conns, st.Auths, st.Commands["MAIL"])
		}
	})
	t.Run("MAIL too large for the upstream", func(t *testing.T) {
		e := newEnv(t, options{upstream: memsmtp.Options{MaxMessageBytes: 1000}})
		c := e.dial(t)
		if err := send(c, "app@example.com", []string{"warm@example.com"}, message("warm")); err != nil {
			t.Fatal(err)
		}
		for range 3 {
			var smtpErr *smtp.SMTPError
			if err := c.Mail("app@example.com", &smtp.MailOptions{Size: 5000}); !errors.As(err, &smtpErr) || smtpErr.Code/100 != 5 {
				t.Fatalf("MAIL SIZE=5000 to an upstream that takes 1000: %v, want a 5xx", err)
			}
		}
		if err := send(c, "app@example.com", []string{"u@example.com"}, message("after")); err != nil {
			t.Fatal(err)
		}
		if st := e.up.Stats(); st.Conns != 1 || st.Auths != 1 {
			t.Errorf("upstream saw %d connections and %d AUTH, want 1 and 1", st.Conns, st.Auths)
		}
	})
}
