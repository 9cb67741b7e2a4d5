//go:build e2e

package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"strings"
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// TestTruncatedBDATChunkIsNotRelayed is a careless or hostile client that
// declares a 1000-byte message with "BDAT 1000 LAST", sends only its first
// 44 bytes (which hold a Message-ID) and half-closes the connection.
// go-smtp copies a chunk with io.Copy over an io.LimitReader, which takes
// the early end of the stream for the chunk's end; a proxy that trusted it
// would relay a message the client never sent whole. Asserted: the client
// is not told 250, and nothing with that Message-ID reaches the Postfix
// upstream (its log names every message it receives; its mailbox stays
// without it). The control, on the same proxy: the whole message in one
// "BDAT n LAST" gets 250 and is delivered, so CHUNKING works and its
// absence above means something.
func TestTruncatedBDATChunkIsNotRelayed(t *testing.T) {
	const declared, sent = 1000, 44
	pf := startPostfix(t, peers.PostfixOptions{})
	proxy := startProxy(t, pf.Addr, nil)

	// The control: the whole message.
	whole := bdatMessage("bdat-whole", declared)
	c := dialRaw(t, proxy.Addr)
	c.envelope(t)
	c.write(t, fmt.Sprintf("BDAT %d LAST\r\n", len(whole.data)), whole.data)
	code, text, err := c.reply(30 * time.Second)
	t.Logf("control: BDAT %d LAST with the whole message: %d %s (err %v)", len(whole.data), code, text, err)
	if err != nil || code != 250 {
		t.Fatalf("control: the whole message sent with BDAT got %d %s (err %v); want 250", code, text, err)
	}
	c.quit()
	box := waitDelivered(t, pf, []peers.Message{{ID: whole.id}}, 30*time.Second)
	t.Logf("control: %s delivered (%d copy)", whole.id, len(box[whole.id]))

	// The truncated chunk.
	cut := bdatMessage("cut", declared)
	if i := strings.Index(string(cut.data), "\r\n"); i < 0 || i+2 > sent {
		t.Fatalf("the Message-ID line must fit in the %d bytes sent: %q", sent, cut.data[:sent])
	}
	logStart := pf.LogSize()
	c = dialRaw(t, proxy.Addr)
	c.envelope(t)
	c.write(t, fmt.Sprintf("BDAT %d LAST\r\n", declared), cut.data[:sent])
	if err := c.conn.CloseWrite(); err != nil {
		t.Fatalf("half-close: %v", err)
	}
	halfClosed := time.Now()
	code, text, err = c.reply(30 * time.Second)
	got := fmt.Sprintf("%d %s", code, text)
	if err != nil {
		got = fmt.Sprintf("no reply (%v)", err)
	}
	// The proxy closing its side tells that it is done with the client, and
	// so with its transaction.
	closed := c.waitClosed(10 * time.Second)
	t.Logf("truncated: BDAT %d LAST, %d bytes, half-close: the client got %s after %v; the proxy closed the connection: %v",
		declared, sent, got, time.Since(halfClosed).Round(time.Millisecond), closed)
	if err == nil && code == 250 {
		t.Errorf("the client was told %s for a message cut short after %d of its %d bytes", got, sent, declared)
	}

	// Nothing must reach Postfix. Its cleanup logs "message-id=<...>" for
	// every message it receives, before it answers the end of the message,
	// and delivers into the mailbox within about 0.2 s. An absence cannot be
	// awaited as a condition: it is watched for 2 s, ten times the delivery
	// latency, after the proxy has closed the connection.
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
		t.Errorf("the truncated message reached the upstream: %s, %v after the half-close", seen, time.Since(halfClosed).Round(time.Millisecond))
		for _, l := range strings.Split(pf.LogSince(logStart), "\n") {
			if strings.Contains(l, cut.id) || strings.Contains(l, "size=") {
				t.Logf("postfix: %s", l)
			}
		}
	} else {
		t.Logf("truncated: %s absent from postfix's log and mailbox for %v; postfix logged %d messages received since",
			cut.id, time.Since(watch).Round(time.Millisecond), strings.Count(pf.LogSince(logStart), "message-id="))
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
// where a real client library would not let it.
type rawConn struct {
	conn *net.TCPConn
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

// envelope sends EHLO, checks that CHUNKING is offered, and sends MAIL and
// RCPT, each of which must get 250.
func (c *rawConn) envelope(t *testing.T) {
	t.Helper()
	c.write(t, "EHLO chat.e2e.test\r\n", nil)
	code, text, err := c.reply(10 * time.Second)
	if err != nil || code != 250 {
		t.Fatalf("EHLO: %d %s (err %v)", code, text, err)
	}
	if !strings.Contains(text, "CHUNKING") {
		t.Fatalf("the proxy does not offer CHUNKING, so BDAT cannot be tested: %q", text)
	}
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
	if _, err := c.conn.Write(append([]byte(line), data...)); err != nil {
		t.Fatalf("write %q: %v", strings.TrimSpace(line), err)
	}
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
	c.conn.Write([]byte("QUIT\r\n"))
	c.reply(2 * time.Second)
	c.conn.Close()
}
