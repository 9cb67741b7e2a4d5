package proxy_test

import (
	"errors"
	"io"
	"strings"
	"testing"
	"time"
)

// longLineMessage is a message with one line of 3,000 bytes, over go-smtp's
// limit of 2,000, followed by ordinary lines up to size bytes, and its
// final dot.
func longLineMessage(id string, size int) string {
	var b strings.Builder
	b.WriteString(message(id))
	b.WriteString(strings.Repeat("x", 3000) + "\r\n")
	line := strings.Repeat("0123456789", 7) + "abcd\r\n"
	for b.Len() < size {
		b.WriteString(line)
	}
	b.WriteString(".\r\n")
	return b.String()
}

// TestRefusalMidMessageIsHeard (issue 16, item 6): a message with a
// 3,000-byte line followed by 8 MB of lines (more than loopback's socket
// buffers hold) is refused with 554 5.6.0, and the client, which writes its
// whole message before it reads the reply (as curl, msmtp and nodemailer
// do), writes it to its end, hears the 554, and the connection ends without
// a reset. go-smtp cannot go on after such a line and ends the connection;
// closed while the client still sent, the socket was reset, and the client
// met "connection reset by peer" in the middle of its write. Nothing
// reaches the upstream.
func TestRefusalMidMessageIsHeard(t *testing.T) {
	e := newEnv(t, options{})
	c := rawDial(t, e.addr)
	c.must("EHLO client.test", 250)
	c.must("MAIL FROM:<app@example.com>", 250)
	c.must("RCPT TO:<user@example.com>", 250)
	c.must("DATA", 354)
	msg := longLineMessage("long-line", 8<<20)
	c.conn.SetDeadline(time.Now().Add(30 * time.Second))
	_, werr := c.conn.Write([]byte(msg))
	code, text := c.reply()
	if code != 554 || !strings.HasPrefix(text, "5.6.0") {
		t.Fatalf("after a %d-byte message with a 3,000-byte line, the client got %d %s (its write: %v); want 554 5.6.0", len(msg), code, text, werr)
	}
	if werr != nil {
		t.Errorf("writing the message: %v, want it read to its end", werr)
	}
	// The connection then ends without a reset, once the client closes.
	c.conn.Write([]byte("QUIT\r\n"))
	c.conn.CloseWrite()
	_, err := io.Copy(io.Discard, c.r.R)
	if err != nil && !errors.Is(err, io.EOF) {
		t.Errorf("reading to the end of the connection: %v, want a clean end", err)
	}
	if st := e.up.Stats(); st.Messages != 0 || st.Commands["DATA"] != 0 {
		t.Errorf("upstream got %d messages (%d DATA), want none", st.Messages, st.Commands["DATA"])
	}
}
