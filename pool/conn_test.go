package pool_test

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
)

// TestUnfinishedTransactionIsResetWhenAuthenticated: an authenticated
// session left mid-transaction is reset with RSET alone (an EHLO after it
// would make some upstreams forget the AUTH) and reused, authenticated.
func TestUnfinishedTransactionIsResetWhenAuthenticated(t *testing.T) {
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
	if c.ID() != first {
		t.Error("session left mid-transaction was not reused")
	}
	if err := send(c, 1); err != nil {
		t.Fatal(err)
	}
	cmds := up.Stats().Commands
	if cmds["RSET"] != 1 || cmds["EHLO"] != 1 || cmds["AUTH"] != 1 {
		t.Errorf("upstream saw %d RSET, %d EHLO, %d AUTH; want 1 of each", cmds["RSET"], cmds["EHLO"], cmds["AUTH"])
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
	first := c.ID()
	c.Release()
	again := acquire(t, p)
	defer again.Release()
	if again.ID() != first || p.Stat().ClosedBroken != 0 {
		t.Errorf("session %d was not reused after refused arguments (got %d; %d closed broken)", first, again.ID(), p.Stat().ClosedBroken)
	}
}

// TestAny2xxAtEndOfDataIsAcceptance: go-smtp's client wants exactly 250;
// a 251 is still the upstream taking the message, not an error. (Its
// enhanced code is not of the addressing class, 2.1.x, which answers MAIL
// or RCPT and shows replies out of step where a verdict is due.)
func TestAny2xxAtEndOfDataIsAcceptance(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	up.Inject(memsmtp.Data, memsmtp.Fault{Deliver: true, Reply: &smtp.SMTPError{Code: 251, EnhancedCode: smtp.EnhancedCode{2, 0, 0}, Message: "Will forward"}})
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

// TestRepliesAreReported: Config.OnReply sees each reply by stage. The
// upstream offers no CHUNKING, so that the message goes with DATA and its
// 354; TestRepliesAreReportedWithBDAT has the other case.
func TestRepliesAreReported(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{Hide: []string{"CHUNKING"}})
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
