//go:build e2e

package e2e

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// TestTruncatedBDATChunkIsNotRelayed is a careless or hostile client that
// declares a 1000-byte message with "BDAT 1000 LAST", sends only its first
// 44 bytes (which hold a Message-ID) and ends its side of the connection:
// in plain text with a FIN, and over STARTTLS to the real binary's listener
// certificate with TLS's close_notify and a FIN, which crypto/tls reads as
// the end of the stream (issue 16, item 2: this one was relayed). go-smtp
// copies a chunk with io.Copy over an io.LimitReader, which takes the early
// end of the stream for the chunk's end; a proxy that trusted it would relay
// a message the client never sent whole. Asserted: the client is not told
// 250, and nothing with that Message-ID reaches the Postfix upstream (its
// log names every message it receives; its mailbox stays without it). The
// controls, on the same proxy and transport: the whole message in one "BDAT
// n LAST" gets 250 and is delivered, so CHUNKING works and its absence above
// means something; and so is a whole message whose last chunk comes with
// QUIT and the end of the stream in one write (issue 16, item 7: in plain
// text, with MAIL and RCPT in the same write, it got 451).
func TestTruncatedBDATChunkIsNotRelayed(t *testing.T) {
	const declared, sent = 1000, 44
	pf := startPostfix(t, peers.PostfixOptions{})
	certFile, keyFile := writeCertificate(t, "127.0.0.1", "localhost")
	roots := x509.NewCertPool()
	if pem, err := os.ReadFile(certFile); err != nil || !roots.AppendCertsFromPEM(pem) {
		t.Fatalf("read the listener certificate %s: %v", certFile, err)
	}
	proxy := startProxy(t, pf.Addr, map[string]string{"SMTPPOOL_UPSTREAM_TLS": "none",
		"SMTPPOOL_LISTEN_TLS_CERT": certFile, "SMTPPOOL_LISTEN_TLS_KEY": keyFile})

	for _, mode := range []struct {
		name, short string // short fits the cut message's Message-ID in its first 44 bytes
		tls         *tls.Config
	}{
		{"plain", "tcp", nil},
		{"starttls", "tls", &tls.Config{RootCAs: roots, ServerName: "localhost"}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			dial := func() *rawConn {
				c := dialRaw(t, proxy.Addr)
				if mode.tls != nil {
					c.startTLS(t, mode.tls)
				}
				c.ehlo(t)
				return c
			}
			// The control: the whole message.
			whole := bdatMessage("bdat-whole-"+mode.name, declared)
			c := dial()
			c.envelope(t)
			c.write(t, fmt.Sprintf("BDAT %d LAST\r\n", len(whole.data)), whole.data)
			code, text, err := c.reply(30 * time.Second)
			t.Logf("control: BDAT %d LAST with the whole message: %d %s (err %v)", len(whole.data), code, text, err)
			if err != nil || code != 250 {
				t.Fatalf("control: the whole message sent with BDAT got %d %s (err %v); want 250", code, text, err)
			}
			c.quit()

			// The whole message with QUIT and the end of the stream in one
			// write; in plain text MAIL and RCPT come in it too, and the
			// upstream's reply to RCPT takes a round trip, while which the
			// proxy reads ahead to the end of the stream.
			ended := bdatMessage("bdat-ended-"+mode.name, declared)
			c = dial()
			cmds := "MAIL FROM:<chat@client.e2e.test>\r\nRCPT TO:<user@" + peers.MailDomain + ">\r\n"
			replies := []int{250, 250, 250, 221}
			if mode.tls != nil {
				// Over TLS the proxy cannot see QUIT in what it reads ahead,
				// and takes the end of the stream for a client that left.
				c.envelope(t)
				cmds, replies = "", []int{250, 221}
			}
			c.write(t, cmds+fmt.Sprintf("BDAT %d LAST\r\n", len(ended.data)), append(ended.data, "QUIT\r\n"...))
			if err := c.closeWrite(); err != nil {
				t.Fatalf("half-close: %v", err)
			}
			for _, want := range replies {
				if code, text, err := c.reply(30 * time.Second); err != nil || code != want {
					t.Errorf("whole message, QUIT and the end of the stream in one write: %d %s (err %v), want %d", code, text, err, want)
				}
			}
			box := waitDelivered(t, pf, []peers.Message{{ID: whole.id}, {ID: ended.id}}, 30*time.Second)
			t.Logf("controls: %s and %s delivered (%d and %d copies)", whole.id, ended.id, len(box[whole.id]), len(box[ended.id]))

			// The truncated chunk.
			cut := bdatMessage("cut-"+mode.short, declared)
			if i := strings.Index(string(cut.data), "\r\n"); i < 0 || i+2 > sent {
				t.Fatalf("the Message-ID line must fit in the %d bytes sent: %q", sent, cut.data[:sent])
			}
			logStart := pf.LogSize()
			c = dial()
			c.envelope(t)
			c.write(t, fmt.Sprintf("BDAT %d LAST\r\n", declared), cut.data[:sent])
			if err := c.closeWrite(); err != nil {
				t.Fatalf("half-close: %v", err)
			}
			halfClosed := time.Now()
			code, text, err = c.reply(30 * time.Second)
			got := fmt.Sprintf("%d %s", code, text)
			if err != nil {
				got = fmt.Sprintf("no reply (%v)", err)
			}
			// The proxy closing its side tells that it is done with the
			// client, and so with its transaction.
			closed := c.waitClosed(10 * time.Second)
			t.Logf("truncated: BDAT %d LAST, %d bytes, end of stream: the client got %s after %v; the proxy closed the connection: %v",
				declared, sent, got, time.Since(halfClosed).Round(time.Millisecond), closed)
			if err == nil && code == 250 {
				t.Errorf("the client was told %s for a message cut short after %d of its %d bytes", got, sent, declared)
			}

			// Nothing must reach Postfix. Its cleanup logs "message-id=<...>"
			// for every message it receives, before it answers the end of the
			// message, and delivers into the mailbox within about 0.2 s. An
			// absence cannot be awaited as a condition: it is watched for 2 s,
			// ten times the delivery latency, after the proxy has closed the
			// connection.
			var seen string
			watch := time.Now()
			_ = peers.Poll(t.Context(), 2*time.Second, "the truncated message to show up (it must not)", func() (bool, string) {
				if strings.Contains(pf.LogSince(logStart), "message-id="+cut.id) {
					seen = "postfix logged message-id=" + cut.id
					return true, ""
				}
				if b, err := pf.Mailbox(); err == nil && len(b[cut.id]) > 0 {
					seen = fmt.Sprintf("postfix delivered %d copies of %s", len(b[cut.id]), cut.id)
					return true, ""
				}
				return false, "absent"
			})
			if seen != "" {
				t.Errorf("the truncated message reached the upstream: %s, %v after the end of the stream", seen, time.Since(halfClosed).Round(time.Millisecond))
				for _, l := range strings.Split(pf.LogSince(logStart), "\n") {
					if strings.Contains(l, cut.id) || strings.Contains(l, "size=") {
						t.Logf("postfix: %s", l)
					}
				}
			} else {
				t.Logf("truncated: %s absent from postfix's log and mailbox for %v; postfix logged %d messages received since",
					cut.id, time.Since(watch).Round(time.Millisecond), strings.Count(pf.LogSince(logStart), "message-id="))
			}
		})
	}
}

// rawMessage is a message made by hand, for BDAT, with its Message-ID on
// its first line.
type rawMessage struct {
	id   string
	data []byte
}

// bdatMessage makes a message of size bytes whose first line is its
// Message-ID, short enough to fit in the first 44 bytes.
func bdatMessage(scenario string, size int) rawMessage {
	id := fmt.Sprintf("<%s.%s@e2e>", scenario, peers.RunID())
	head := "Message-ID: " + id + "\r\n" +
		"From: <chat@client.e2e.test>\r\n" +
		"To: <user@" + peers.MailDomain + ">\r\n" +
		"Subject: BDAT " + scenario + "\r\n" +
		"\r\n"
	body := strings.Repeat("abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwx\r\n", size/78+1)
	return rawMessage{id: id, data: []byte((head + body)[:size-2] + "\r\n")}
}

// rawConn is a client that speaks SMTP by hand, so that it can misbehave
// where a real client library would not let it: in plain text, or through
// TLS after STARTTLS.
type rawConn struct {
	conn *net.TCPConn
	tls  *tls.Conn // after startTLS
	text *textproto.Reader
}

// dialRaw connects to addr and reads the greeting; the test's cleanup
// closes the connection.
func dialRaw(t *testing.T, addr string) *rawConn {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := &rawConn{conn: conn.(*net.TCPConn), text: textproto.NewReader(bufio.NewReader(conn))}
	if code, text, err := c.reply(10 * time.Second); err != nil || code != 220 {
		t.Fatalf("greeting: %d %s (err %v)", code, text, err)
	}
	return c
}

// startTLS sends EHLO and STARTTLS and makes the TLS handshake with cfg.
func (c *rawConn) startTLS(t *testing.T, cfg *tls.Config) {
	t.Helper()
	for _, cmd := range []struct {
		line string
		want int
	}{{"EHLO chat.e2e.test", 250}, {"STARTTLS", 220}} {
		c.write(t, cmd.line+"\r\n", nil)
		if code, text, err := c.reply(10 * time.Second); err != nil || code != cmd.want {
			t.Fatalf("%s: %d %s (err %v)", cmd.line, code, text, err)
		}
	}
	c.tls = tls.Client(c.conn, cfg)
	c.conn.SetDeadline(time.Now().Add(10 * time.Second))
	if err := c.tls.Handshake(); err != nil {
		t.Fatalf("TLS handshake: %v", err)
	}
	c.text = textproto.NewReader(bufio.NewReader(c.tls))
}

// ehlo sends EHLO and checks that CHUNKING is offered.
func (c *rawConn) ehlo(t *testing.T) {
	t.Helper()
	c.write(t, "EHLO chat.e2e.test\r\n", nil)
	code, text, err := c.reply(10 * time.Second)
	if err != nil || code != 250 {
		t.Fatalf("EHLO: %d %s (err %v)", code, text, err)
	}
	if !strings.Contains(text, "CHUNKING") {
		t.Fatalf("the proxy does not offer CHUNKING, so BDAT cannot be tested: %q", text)
	}
}

// envelope sends MAIL and RCPT, each of which must get 250.
func (c *rawConn) envelope(t *testing.T) {
	t.Helper()
	for _, cmd := range []string{"MAIL FROM:<chat@client.e2e.test>", "RCPT TO:<user@" + peers.MailDomain + ">"} {
		c.write(t, cmd+"\r\n", nil)
		if code, text, err := c.reply(60 * time.Second); err != nil || code != 250 {
			t.Fatalf("%s: %d %s (err %v)", cmd, code, text, err)
		}
	}
}

// write sends a command line and, if any, the bytes that follow it.
func (c *rawConn) write(t *testing.T, line string, data []byte) {
	t.Helper()
	c.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	var w io.Writer = c.conn
	if c.tls != nil {
		w = c.tls
	}
	if _, err := w.Write(append([]byte(line), data...)); err != nil {
		t.Fatalf("write %q: %v", strings.TrimSpace(line), err)
	}
}

// closeWrite ends the client's side of the stream: TLS's close_notify, if
// over TLS, and a FIN.
func (c *rawConn) closeWrite() error {
	if c.tls != nil {
		if err := c.tls.CloseWrite(); err != nil {
			return err
		}
	}
	return c.conn.CloseWrite()
}

// reply reads one reply, of one line or more, within timeout.
func (c *rawConn) reply(timeout time.Duration) (int, string, error) {
	c.conn.SetReadDeadline(time.Now().Add(timeout))
	return c.text.ReadResponse(0)
}

// waitClosed reports whether the other side closes the connection within
// timeout; whatever it sends meanwhile is discarded.
func (c *rawConn) waitClosed(timeout time.Duration) bool {
	c.conn.SetReadDeadline(time.Now().Add(timeout))
	_, err := io.Copy(io.Discard, c.text.R)
	return err == nil || errors.Is(err, net.ErrClosed) || isReset(err)
}

// isReset reports whether err is a connection reset by the other side, a
// close too.
func isReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "connection reset by peer")
}

// quit sends QUIT and closes.
func (c *rawConn) quit() {
	c.conn.SetDeadline(time.Now().Add(2 * time.Second))
	var w io.Writer = c.conn
	if c.tls != nil {
		w = c.tls
	}
	w.Write([]byte("QUIT\r\n"))
	c.reply(2 * time.Second)
	c.conn.Close()
}
