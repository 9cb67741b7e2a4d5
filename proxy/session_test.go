package proxy_test

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
	"github.com/smtppool/smtppool/proxy"
)

// TestTruncatedBDATChunkIsNotRelayed: a client that declares a 1000-byte
// chunk, sends 44 bytes and closes its side must not get 250, and nothing
// may reach the upstream. (go-smtp copies a chunk with io.LimitReader,
// which takes the early end of the stream for the end of the chunk.)
func TestTruncatedBDATChunkIsNotRelayed(t *testing.T) {
	e := newEnv(t, options{})
	c := rawDial(t, e.addr)
	c.must("EHLO client.test", 250)
	c.must("MAIL FROM:<app@example.com>", 250)
	c.must("RCPT TO:<user@example.com>", 250)
	part := "Subject: cut short\r\n\r\nThe first 44 bytes of 1000.\r\n"
	c.write("BDAT 1000 LAST\r\n" + part[:44])
	if err := c.conn.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if code, msg := c.reply(); code == 250 {
		t.Fatalf("truncated BDAT chunk acknowledged: %d %s", code, msg)
	}
	if st := e.up.Stats(); st.Messages != 0 || st.Commands["DATA"] != 0 || st.Commands["BDAT"] != 0 {
		t.Errorf("upstream got %d messages (%d DATA), want nothing", st.Messages, st.Commands["DATA"])
	}
}

// TestCompleteBDATMessageIsRelayed: BDAT itself works.
func TestCompleteBDATMessageIsRelayed(t *testing.T) {
	e := newEnv(t, options{})
	c := rawDial(t, e.addr)
	c.must("EHLO client.test", 250)
	c.must("MAIL FROM:<app@example.com>", 250)
	c.must("RCPT TO:<user@example.com>", 250)
	first, last := "Message-ID: <bdat@test>\r\n", "Subject: chunks\r\n\r\nTwo chunks.\r\n"
	c.write("BDAT " + strconv.Itoa(len(first)) + "\r\n" + first)
	if code, msg := c.reply(); code != 250 {
		t.Fatalf("first chunk: %d %s", code, msg)
	}
	c.write("BDAT " + strconv.Itoa(len(last)) + " LAST\r\n" + last)
	if code, msg := c.reply(); code != 250 {
		t.Fatalf("last chunk: %d %s", code, msg)
	}
	msgs := e.up.Messages()
	if len(msgs) != 1 || string(msgs[0].Data) != first+last {
		t.Fatalf("upstream has %d messages, want the one sent: %+v", len(msgs), msgs)
	}
}

// TestBDATThenDisconnectStrandsNoSession: go-smtp runs Data on its own
// goroutine for BDAT; a client that sends an empty chunk and leaves, again
// and again, must not take the upstream sessions with it.
func TestBDATThenDisconnectStrandsNoSession(t *testing.T) {
	e := newEnv(t, options{pool: pool.Config{MaxConns: 2}})
	for range 10 {
		c := rawDial(t, e.addr)
		c.must("EHLO client.test", 250)
		c.must("MAIL FROM:<app@example.com>", 250)
		c.must("RCPT TO:<user@example.com>", 250)
		c.must("BDAT 0", 250)
		c.conn.Close()
	}
	memsmtp.WaitFor(t, "every upstream session to be released", func() bool { return e.pool.Stat().AcquiredConns == 0 })
	c := e.dial(t)
	if err := send(c, "app@example.com", []string{"user@example.com"}, message("after")); err != nil {
		t.Fatalf("send after the BDAT clients left: %v", err)
	}
	closed := make(chan struct{})
	go func() { e.pool.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("pool.Close still waiting for a stranded session")
	}
}

// TestControlCharactersInAddressesAreRefusedAtOnce: CR, LF or NUL in an
// envelope address get 501 5.5.4, and cost no upstream session.
func TestControlCharactersInAddressesAreRefusedAtOnce(t *testing.T) {
	e := newEnv(t, options{})
	c := rawDial(t, e.addr)
	c.must("EHLO client.test", 250)
	for _, line := range []string{"MAIL FROM:<a\rb@example.com>", "MAIL FROM:<a\x00b@example.com>"} {
		if code, msg := c.cmd(line); code != 501 || !strings.HasPrefix(msg, "5.5.4") {
			t.Errorf("%q: %d %s, want 501 5.5.4", line, code, msg)
		}
	}
	if n := e.up.Stats().Conns; n != 0 {
		t.Errorf("upstream saw %d connections for refused MAIL commands, want 0", n)
	}
	c.must("MAIL FROM:<app@example.com>", 250)
	if code, msg := c.cmd("RCPT TO:<user\r@example.com>"); code != 501 || !strings.HasPrefix(msg, "5.5.4") {
		t.Errorf("RCPT with a CR: %d %s, want 501 5.5.4", code, msg)
	}
	c.must("RCPT TO:<user@example.com>", 250)
	if st := e.up.Stats(); st.Conns != 1 || st.Commands["RCPT"] != 1 {
		t.Errorf("upstream saw %d connections and %d RCPT, want 1 and 1", st.Conns, st.Commands["RCPT"])
	}
}

// TestBareCRInTheMessageIsNormalised: a bare CR, which some receivers
// take for a line end, reaches the upstream as CRLF, like a bare LF.
func TestBareCRInTheMessageIsNormalised(t *testing.T) {
	e := newEnv(t, options{})
	c := rawDial(t, e.addr)
	c.must("EHLO client.test", 250)
	c.must("MAIL FROM:<app@example.com>", 250)
	c.must("RCPT TO:<user@example.com>", 250)
	c.must("DATA", 354)
	c.must("Subject: cr\r\n\r\nbefore\r.\rMAIL FROM:<evil@example.com>\rafter\r\n.", 250)
	msgs := e.up.Messages()
	if len(msgs) != 1 {
		t.Fatalf("upstream has %d messages, want 1", len(msgs))
	}
	data := msgs[0].Data
	if bytes.Contains(bytes.ReplaceAll(data, []byte("\r\n"), nil), []byte("\r")) {
		t.Errorf("bare CR reached the upstream: %q", data)
	}
	if want := "before\r\n.\r\nMAIL FROM:<evil@example.com>\r\nafter\r\n"; !strings.HasSuffix(string(data), want) {
		t.Errorf("upstream message %q, want it to end %q", data, want)
	}
}

// TestQuotedLocalPartKeepsItsQuotes: "john doe"@example.com is sent
// upstream quoted, as the client sent it.
func TestQuotedLocalPartKeepsItsQuotes(t *testing.T) {
	e := newEnv(t, options{})
	c := e.dial(t)
	if err := send(c, `"app sender"@example.com`, []string{`"john doe"@example.com`}, message("quoted")); err != nil {
		t.Fatalf("send: %v", err)
	}
	msgs := e.up.Messages()
	if len(msgs) != 1 || msgs[0].From != "app sender@example.com" || msgs[0].To[0] != "john doe@example.com" {
		t.Fatalf("upstream got %+v, want the quoted addresses", msgs)
	}
}

// TestClientHearsTheUpstreamsReplyText: the 250 carries the upstream's own
// text, with its queue id, not a made-up "queued".
func TestClientHearsTheUpstreamsReplyText(t *testing.T) {
	var log memsmtp.LogBuffer
	e := newEnv(t, options{proxy: proxy.Config{Logger: slog.New(slog.NewJSONHandler(&log, nil))}})
	e.up.Inject(memsmtp.Data, memsmtp.Fault{Deliver: true, Reply: reply(250, [3]int{2, 0, 0}, "Ok: queued as 4XyZ123")})
	c := e.dial(t)
	if err := c.Mail("app@example.com", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("user@example.com", nil); err != nil {
		t.Fatal(err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte(message("qid")))
	resp, err := w.CloseWithResponse()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(resp.StatusText, "Ok: queued as 4XyZ123") {
		t.Errorf("client heard %q, want the upstream's text with its queue id", resp.StatusText)
	}
	c.Quit() // ends the transaction, which logs it
	memsmtp.WaitFor(t, "the transaction's log line", func() bool { return strings.Contains(log.String(), `"msg":"transaction"`) })
	if line := log.String(); !strings.Contains(line, `"level":"INFO"`) || !strings.Contains(line, "4XyZ123") {
		t.Errorf("the transaction's info line lacks the upstream's queue id: %s", line)
	}
}

// TestBDATClientLeavingWhileDataWaitsStrandsNothing: the upstream session
// of a transaction is lost at a recipient, so that BDAT's Data, on
// go-smtp's goroutine, must wait for the only session, held by another
// client; the BDAT client leaves meanwhile. When the session frees up, the
// transaction that ended must not take it and keep it.
func TestBDATClientLeavingWhileDataWaitsStrandsNothing(t *testing.T) {
	e := newEnv(t, options{pool: pool.Config{MaxConns: 1}, proxy: proxy.Config{MaxAttempts: 2, AcquireTimeout: 10 * time.Second}})
	// RCPT a is accepted; RCPT b drops the connection, twice (with the
	// replay of a between): the client is told 451 for b, and the
	// transaction is left without an upstream session.
	e.up.Inject(memsmtp.Rcpt, memsmtp.Fault{}, memsmtp.Fault{Drop: true}, memsmtp.Fault{}, memsmtp.Fault{Drop: true})
	c := rawDial(t, e.addr)
	c.must("EHLO client.test", 250)
	c.must("MAIL FROM:<app@example.com>", 250)
	c.must("RCPT TO:<a@example.com>", 250)
	if code, msg := c.cmd("RCPT TO:<b@example.com>"); code/100 != 4 {
		t.Fatalf("RCPT b: %d %s, want a 4xx after the drops", code, msg)
	}
	holder := holdSession(t, e)
	c.must("BDAT 0", 250) // Data now waits for the session the holder has
	memsmtp.WaitFor(t, "BDAT's Data to queue for the session", func() bool { return e.pool.Stat().PendingAcquires == 1 })
	c.conn.Close()
	memsmtp.WaitFor(t, "the departed client to leave the queue", func() bool { return e.pool.Stat().PendingAcquires == 0 })
	finish(t, holder, "user@example.com", message("held"))
	if err := holder.Quit(); err != nil {
		t.Fatal(err)
	}
	memsmtp.WaitFor(t, "the session to be free", func() bool { return e.pool.Stat().AcquiredConns == 0 })
	next := e.dial(t)
	if err := send(next, "app@example.com", []string{"user@example.com"}, message("next")); err != nil {
		t.Fatalf("the next client: %v", err)
	}
}

// TestTransactionTimeoutFreesAPinnedSession: a client that holds the only
// upstream session and stalls (go-smtp answers its NOOPs itself) loses it
// after the transaction timeout, and the next client gets it.
func TestTransactionTimeoutFreesAPinnedSession(t *testing.T) {
	e := newEnv(t, options{pool: pool.Config{MaxConns: 1},
		proxy: proxy.Config{TransactionTimeout: 300 * time.Millisecond, AcquireTimeout: 10 * time.Second}})
	holder := holdSession(t, e)
	if err := holder.Noop(); err != nil {
		t.Fatal(err)
	}
	c := e.dial(t)
	start := time.Now()
	if err := send(c, "app@example.com", []string{"user@example.com"}, message("next")); err != nil {
		t.Fatalf("next client: %v after %v", err, time.Since(start))
	}
	err := holder.Rcpt("user@example.com", nil)
	var got *smtp.SMTPError
	if !errors.As(err, &got) || got.Code != 451 || got.EnhancedCode != (smtp.EnhancedCode{4, 4, 2}) {
		t.Errorf("RCPT after the transaction timeout: %v, want 451 4.4.2", err)
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
	finish(t, c, "b@example.com", message("nested"))
	m := e.up.Messages()
	if len(m) != 1 || m[0].From != "first@example.com" || strings.Join(m[0].To, ",") != "a@example.com,b@example.com" {
		t.Errorf("upstream got %+v, want one message from first@ to a@ and b@", m)
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

// TestPipelinedClientThatClosesItsSideIsServed: a client that writes its
// whole session up to QUIT in one go and closes its side still waits for
// the replies; it is not taken for one that left.
func TestPipelinedClientThatClosesItsSideIsServed(t *testing.T) {
	e := newEnv(t, options{})
	e.up.Inject(memsmtp.Mail, memsmtp.Fault{Delay: 100 * time.Millisecond}) // the proxy waits, watching the client
	c := rawDial(t, e.addr)
	c.must("EHLO client.test", 250)
	c.write("MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n" + message("halfclose") + ".\r\nQUIT\r\n")
	if err := c.conn.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	for _, want := range []int{250, 250, 354, 250, 221} {
		if code, msg := c.reply(); code != want {
			t.Fatalf("reply %d %s, want %d", code, msg, want)
		}
	}
	if n := e.up.Stats().Messages; n != 1 {
		t.Errorf("upstream has %d messages, want 1", n)
	}
}
