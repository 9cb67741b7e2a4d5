package proxy_test

import (
	"bufio"
	"crypto/tls"
	"net/textproto"
	"strconv"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
	"github.com/smtppool/smtppool/proxy"
)

// tlsClient is a rawClient after STARTTLS: it writes and reads through
// TLS, and can end the TLS stream (close_notify) and the TCP stream (FIN)
// on their own.
type tlsClient struct {
	raw  *rawClient
	conn *tls.Conn
	r    *textproto.Reader
}

// startTLS sends EHLO and STARTTLS on c and upgrades it, trusting the
// certificates of e's listener.
func startTLS(t *testing.T, c *rawClient, cfg *tls.Config) *tlsClient {
	t.Helper()
	c.must("EHLO client.test", 250)
	c.must("STARTTLS", 220)
	tc := tls.Client(c.conn, cfg)
	if err := tc.Handshake(); err != nil {
		t.Fatalf("TLS handshake: %v", err)
	}
	return &tlsClient{raw: c, conn: tc, r: textproto.NewReader(bufio.NewReader(tc))}
}

func (c *tlsClient) write(t *testing.T, s string) {
	t.Helper()
	if _, err := c.conn.Write([]byte(s)); err != nil {
		t.Fatalf("write over TLS: %v", err)
	}
}

// reply reads one reply; code is 0 if the connection ended first.
func (c *tlsClient) reply() (int, string) {
	code, msg, err := c.r.ReadResponse(0)
	if err != nil {
		if _, ok := err.(*textproto.Error); !ok {
			return 0, err.Error()
		}
	}
	return code, msg
}

func (c *tlsClient) must(t *testing.T, line string, want int) {
	t.Helper()
	c.write(t, line+"\r\n")
	if code, msg := c.reply(); code != want {
		t.Fatalf("%q over TLS: %d %s, want %d", line, code, msg, want)
	}
}

// newTLSEnv is newEnv with a listener that offers STARTTLS, and the client
// configuration that trusts it.
func newTLSEnv(t *testing.T) (*testEnv, *tls.Config) {
	t.Helper()
	return newTLSEnvWith(t, options{})
}

// newTLSEnvWith is newTLSEnv with the options o.
func newTLSEnvWith(t *testing.T, o options) (*testEnv, *tls.Config) {
	t.Helper()
	cfg, roots, err := memsmtp.SelfSigned("localhost")
	if err != nil {
		t.Fatal(err)
	}
	o.proxy.Access.TLSConfig = cfg
	e := newEnv(t, o)
	return e, &tls.Config{RootCAs: roots, ServerName: "localhost"}
}

// TestTruncatedBDATOverTLSIsNotRelayed (issue 16, item 2): over STARTTLS, a
// client that declares BDAT 1000 LAST, sends 44 bytes, then TLS's
// close_notify and a FIN, must not get 250, and nothing may reach the
// upstream. crypto/tls reads close_notify as io.EOF, which go-smtp's
// io.Copy over io.LimitReader takes for the end of the chunk; only counting
// the chunk's bytes against its declared size tells.
func TestTruncatedBDATOverTLSIsNotRelayed(t *testing.T) {
	e, cfg := newTLSEnv(t)
	c := startTLS(t, rawDial(t, e.addr), cfg)
	c.must(t, "EHLO client.test", 250)
	c.must(t, "MAIL FROM:<app@example.com>", 250)
	c.must(t, "RCPT TO:<user@example.com>", 250)
	part := "Subject: cut short\r\n\r\nThe first 44 bytes of 1000.\r\n"
	c.write(t, "BDAT 1000 LAST\r\n"+part[:44])
	if err := c.conn.CloseWrite(); err != nil { // close_notify
		t.Fatal(err)
	}
	if err := c.raw.conn.CloseWrite(); err != nil { // FIN
		t.Fatal(err)
	}
	if code, msg := c.reply(); code == 250 {
		t.Errorf("truncated BDAT chunk over TLS acknowledged: %d %s", code, msg)
	}
	memsmtp.WaitFor(t, "the transaction to end", func() bool { return e.pool.Stat().AcquiredConns == 0 })
	if st := e.up.Stats(); st.Messages != 0 || st.Commands["DATA"] != 0 || st.Commands["BDAT"] != 0 {
		t.Errorf("upstream got %d messages (%d DATA, %d BDAT), want nothing", st.Messages, st.Commands["DATA"], st.Commands["BDAT"])
	}
}

// TestWholeBDATMessagesOverTLSAreRelayed: the control for the test above,
// on the same kind of connection. A message in two chunks is delivered, and
// so is one whose last chunk, QUIT, close_notify and a FIN come together:
// the end of the stream after a complete chunk is no truncation.
func TestWholeBDATMessagesOverTLSAreRelayed(t *testing.T) {
	e, cfg := newTLSEnv(t)
	c := startTLS(t, rawDial(t, e.addr), cfg)
	c.must(t, "EHLO client.test", 250)
	c.must(t, "MAIL FROM:<app@example.com>", 250)
	c.must(t, "RCPT TO:<user@example.com>", 250)
	first, last := "Message-ID: <tls-chunks@test>\r\n", "Subject: chunks\r\n\r\nTwo chunks.\r\n"
	c.write(t, "BDAT "+strconv.Itoa(len(first))+"\r\n"+first)
	if code, msg := c.reply(); code != 250 {
		t.Fatalf("first chunk: %d %s", code, msg)
	}
	c.write(t, "BDAT "+strconv.Itoa(len(last))+" LAST\r\n"+last)
	if code, msg := c.reply(); code != 250 {
		t.Fatalf("last chunk: %d %s", code, msg)
	}

	c.must(t, "MAIL FROM:<app@example.com>", 250)
	c.must(t, "RCPT TO:<user@example.com>", 250)
	whole := message("tls-then-quit")
	c.write(t, "BDAT "+strconv.Itoa(len(whole))+" LAST\r\n"+whole+"QUIT\r\n")
	c.conn.CloseWrite()
	c.raw.conn.CloseWrite()
	for _, want := range []int{250, 221} {
		if code, msg := c.reply(); code != want {
			t.Errorf("whole message, QUIT and the end of the stream: %d %s, want %d", code, msg, want)
		}
	}
	msgs := e.up.Messages()
	if len(msgs) != 2 || string(msgs[0].Data) != first+last || msgs[1].MessageID() != "<tls-then-quit@test>" {
		t.Fatalf("upstream has %d messages, want the two sent: %+v", len(msgs), msgs)
	}
}

// TestBDATPipelinedWithQUITAndHalfCloseIsRelayed (issue 16, item 7): MAIL,
// RCPT, BDAT n LAST with its data and QUIT in one write, then a half-close,
// as a client that pipelines its whole session does. The message is
// complete: it must be delivered and the client told 250, then 221, as with
// DATA. The upstream is slow to answer RCPT, so that the proxy, waiting on
// the client's behalf, reads ahead to the end of the stream.
func TestBDATPipelinedWithQUITAndHalfCloseIsRelayed(t *testing.T) {
	for _, tt := range []struct{ name, body string }{
		{"BDAT", "BDAT " + strconv.Itoa(len(message("pipelined-bdat"))) + " LAST\r\n" + message("pipelined-bdat")},
		{"DATA", "DATA\r\n" + message("pipelined-data") + ".\r\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, options{})
			e.up.Inject(memsmtp.Rcpt, memsmtp.Fault{Delay: 300 * time.Millisecond})
			c := rawDial(t, e.addr)
			c.must("EHLO client.test", 250)
			c.write("MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.com>\r\n" + tt.body + "QUIT\r\n")
			if err := c.conn.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			want := []int{250, 250, 250, 221}
			if tt.name == "DATA" {
				want = []int{250, 250, 354, 250, 221}
			}
			for i, w := range want {
				if code, msg := c.reply(); code != w {
					t.Errorf("reply %d: %d %s, want %d", i+1, code, msg, w)
				}
			}
			if n := len(e.up.Messages()); n != 1 {
				t.Errorf("upstream kept %d messages, want 1", n)
			}
		})
	}
}

// TestPipelinedSessionOverTLSIsServedWhileWaiting: over STARTTLS, a client
// that pipelines its whole session (MAIL, RCPT, BDAT n LAST with its data,
// QUIT) and then ends its side of the stream (close_notify and a FIN, or a
// FIN alone) while smtppool waits on its behalf (for the only upstream
// session, or for a slow upstream's reply to RCPT) still wants its replies:
// its message is delivered, and it hears 250 to each command and 221. The
// proxy cannot read a QUIT in TLS records, and took the end of the stream
// for a client that had left: 451 4.3.0, then 502s, and the message lost.
func TestPipelinedSessionOverTLSIsServedWhileWaiting(t *testing.T) {
	for _, tt := range []struct {
		name                  string
		closeNotify, slowRcpt bool
	}{
		{name: "for a session, close_notify and FIN", closeNotify: true},
		{name: "for a session, FIN alone"},
		{name: "for the reply to RCPT, close_notify and FIN", closeNotify: true, slowRcpt: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, options{pool: pool.Config{MaxConns: 1}})
			serverTLS, roots, err := memsmtp.SelfSigned("localhost")
			if err != nil {
				t.Fatal(err)
			}
			_, ln := serveListening(t, e.pool, proxy.Config{Access: proxy.AccessConfig{TLSConfig: serverTLS}}, "127.0.0.1:0", proxy.ListenConfig{})

			var holder *smtp.Client
			if tt.slowRcpt {
				e.up.Inject(memsmtp.Rcpt, memsmtp.Fault{Delay: 300 * time.Millisecond})
			} else {
				holder = holdSession(t, e)
			}
			c := startTLS(t, rawDial(t, ln.Addr().String()), &tls.Config{RootCAs: roots, ServerName: "localhost"})
			c.must(t, "EHLO client.test", 250)
			msg := message("pipelined-tls")
			c.write(t, "MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.com>\r\nBDAT "+strconv.Itoa(len(msg))+" LAST\r\n"+msg+"QUIT\r\n")
			if holder != nil {
				memsmtp.WaitFor(t, "the client to wait for the session", func() bool { return e.pool.Stat().PendingAcquires == 1 })
			}
			if tt.closeNotify {
				if err := c.conn.CloseWrite(); err != nil {
					t.Fatal(err)
				}
			}
			if err := c.raw.conn.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			if holder != nil {
				memsmtp.WaitFor(t, "smtppool to read the end of the client's stream", func() bool { return proxy.StreamsEnded(ln) == 1 || ln.Open() == 0 })
				finish(t, holder, "user@example.com", message("held"))
			}
			for i, want := range []int{250, 250, 250, 221} {
				if code, msg := c.reply(); code != want {
					t.Errorf("reply %d: %d %s, want %d", i+1, code, msg, want)
				}
			}
			var n int
			for _, m := range e.up.Messages() {
				if m.MessageID() == "<pipelined-tls@test>" {
					n++
				}
			}
			if n != 1 {
				t.Errorf("upstream kept %d copies of the pipelined message, want 1", n)
			}
		})
	}
}
