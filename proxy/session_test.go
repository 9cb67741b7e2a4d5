package proxy_test

import (
	"bytes"
	"errors"
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
	waitFor(t, "every upstream session to be released", func() bool { return e.pool.Stat().AcquiredConns == 0 })
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
	e := newEnv(t, options{})
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
