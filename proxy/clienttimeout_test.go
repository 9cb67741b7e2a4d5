package proxy_test

import (
	"crypto/tls"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
	"github.com/smtppool/smtppool/proxy"
)

// smuggled is what a client that stalled in the middle of its message
// sends when it resumes: the rest of its message, which here carries a
// whole second transaction. Read as commands, it is relayed.
func smuggled(id string) string {
	return "\r\nRSET\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n" + message(id) + ".\r\n"
}

// TestClientTimeoutInAMessageEndsTheConnection: a client silent for the
// client timeout in the middle of its message (a DATA body, a BDAT chunk, a
// chunk go-smtp discards) gets a 4xx and the connection ends there. go-smtp
// answers such a message and reads on: the client that resumed had the rest
// of its message read as commands, and a second message hidden in it was
// relayed (SMTP smuggling), and a BDAT client got 554 5.0.0 "Error:
// transaction failed: read tcp 127.0.0.1:...: i/o timeout", a bounce that
// names smtppool's address, for a timeout.
func TestClientTimeoutInAMessageEndsTheConnection(t *testing.T) {
	const clientTimeout = time.Second
	first := message("stalled")
	tests := []struct {
		name     string
		proxy    proxy.Config
		tls      bool
		start    string // after EHLO, MAIL and RCPT, each answered
		want     int    // the reply to start, if any
		wantCode int    // the reply after the stall
		wantEnh  string
	}{
		{name: "in a BDAT chunk", start: "BDAT 1000 LAST\r\n" + first, wantCode: 421, wantEnh: "4.4.2"},
		{name: "in a BDAT chunk, over TLS", tls: true, start: "BDAT 1000 LAST\r\n" + first, wantCode: 421, wantEnh: "4.4.2"},
		{name: "in a DATA body", start: "DATA\r\n" + first, want: 354, wantCode: 421, wantEnh: "4.4.2"},
		{name: "in a DATA body, over TLS", tls: true, start: "DATA\r\n" + first, want: 354, wantCode: 421, wantEnh: "4.4.2"},
		// The transaction timeout ends the transaction first; go-smtp then
		// reads the rest of the body, until the client timeout.
		{name: "in a DATA body, past the transaction timeout", proxy: proxy.Config{TransactionTimeout: 300 * time.Millisecond},
			start: "DATA\r\n" + first, want: 354, wantCode: 451, wantEnh: "4.4.2"},
		// go-smtp refuses a chunk over the size limit, and discards it
		// before it answers.
		{name: "in a BDAT chunk over the size limit", proxy: proxy.Config{MaxMessageBytes: 4096},
			start: "BDAT 100000 LAST\r\n" + first, wantCode: 552, wantEnh: "5.3.4"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tt.proxy.ClientTimeout = clientTimeout
			var e *testEnv
			var c conversation
			if tt.tls {
				var cfg *tls.Config
				e, cfg = newTLSEnvWith(t, options{proxy: tt.proxy})
				c = tlsConversation{t, startTLS(t, rawDial(t, e.addr), cfg)}
			} else {
				e = newEnv(t, options{proxy: tt.proxy})
				c = rawDial(t, e.addr)
			}
			c.must("EHLO client.test", 250)
			c.must("MAIL FROM:<app@example.com>", 250)
			c.must("RCPT TO:<user@example.com>", 250)
			c.write(tt.start)
			if tt.want != 0 {
				if code, msg := c.reply(); code != tt.want {
					t.Fatalf("%q: %d %s, want %d", tt.start[:6], code, msg, tt.want)
				}
			}
			// The client stalls for longer than the client timeout (the
			// stall is what is tested), then resumes.
			time.Sleep(clientTimeout + clientTimeout/2)
			c.writeQuietly(smuggled("smuggled") + "QUIT\r\n")
			var replies []string
			for {
				code, msg := c.reply()
				if code == 0 {
					break
				}
				replies = append(replies, strconv.Itoa(code)+" "+msg)
			}
			t.Logf("replies after the stall: %q", replies)
			if len(replies) == 0 || !strings.HasPrefix(replies[0], strconv.Itoa(tt.wantCode)+" "+tt.wantEnh) {
				t.Errorf("replies after the stall %q, want %d %s first", replies, tt.wantCode, tt.wantEnh)
			}
			for _, r := range replies[min(1, len(replies)):] {
				if !strings.HasPrefix(r, "421 ") {
					t.Errorf("reply %q after the stall's: the rest of the message was read as commands", r)
				}
			}
			if st := e.up.Stats(); st.Messages != 0 {
				t.Errorf("upstream got %d messages, want none (neither the stalled one nor the one in its rest)", st.Messages)
			}
		})
	}
}

// conversation is a raw client, in plain text or over TLS.
type conversation interface {
	must(line string, want int)
	write(s string)
	// writeQuietly writes s, which the server may no longer read.
	writeQuietly(s string)
	reply() (int, string)
}

func (c *rawClient) writeQuietly(s string) { c.conn.Write([]byte(s)) }

// tlsConversation is a tlsClient as a conversation.
type tlsConversation struct {
	t *testing.T
	c *tlsClient
}

func (x tlsConversation) must(line string, want int) { x.t.Helper(); x.c.must(x.t, line, want) }
func (x tlsConversation) write(s string)             { x.t.Helper(); x.c.write(x.t, s) }
func (x tlsConversation) writeQuietly(s string)      { x.c.conn.Write([]byte(s)) }
func (x tlsConversation) reply() (int, string)       { return x.c.reply() }

// TestClientTimeoutStartsWhenTheMessageIsAskedFor: the client timeout runs
// while the client is asked for something, not while smtppool makes it
// wait. A transaction that gave its upstream session up at a recipient
// (the upstream failed it until MaxAttempts), with another recipient
// accepted, needs a session again at DATA, and waits for it longer than
// the client timeout while another client's message holds the only one;
// it is then asked for its message, and delivered. go-smtp sets the read
// and write deadlines as it reads the DATA line and writes 354: the 354
// (held until the next read) went out after the wait past its write
// deadline, and the message was read past its read deadline; the client
// got 451 4.3.0 and no 354.
func TestClientTimeoutStartsWhenTheMessageIsAskedFor(t *testing.T) {
	const clientTimeout = 500 * time.Millisecond
	e := newEnv(t, options{pool: pool.Config{MaxConns: 1},
		proxy: proxy.Config{ClientTimeout: clientTimeout, MaxAttempts: 2}})
	c := rawDial(t, e.addr)
	c.must("EHLO client.test", 250)
	c.must("MAIL FROM:<app@example.com>", 250)
	c.must("RCPT TO:<one@example.com>", 250)
	// The second recipient fails with 421 twice (the replay of the first
	// one, between them, goes through): the transaction gives up its
	// session, and the client keeps its first recipient.
	fail := memsmtp.Fault{Reply: reply(421, [3]int{4, 3, 0}, "try again")}
	e.up.Inject(memsmtp.Rcpt, fail)
	e.up.Inject(memsmtp.Rcpt, memsmtp.Fault{})
	e.up.Inject(memsmtp.Rcpt, fail)
	if code, msg := c.cmd("RCPT TO:<two@example.com>"); code/100 != 4 {
		t.Fatalf("second recipient: %d %s, want a 4xx after two failures", code, msg)
	}
	if n := e.pool.Stat().AcquiredConns; n != 0 {
		t.Fatalf("%d sessions lent after the failed recipient, want the transaction to have given its up", n)
	}
	// Another client takes the only session, and the upstream takes three
	// client timeouts to answer its message.
	e.up.Inject(memsmtp.Data, memsmtp.Fault{Delay: 3 * clientTimeout})
	other := make(chan error, 1)
	go func() { other <- send(e.dial(t), "app@example.com", []string{"user@example.com"}, message("other")) }()
	memsmtp.WaitFor(t, "the other message to reach the slow upstream", func() bool {
		st := e.up.Stats()
		return st.Commands["DATA"]+st.Commands["BDAT"] == 1
	})

	start := time.Now()
	code, msg := c.cmd("DATA")
	t.Logf("354 after %v", time.Since(start).Round(time.Millisecond))
	if code != 354 {
		t.Fatalf("DATA while another message holds the only session: %d %s, want 354 once it is free", code, msg)
	}
	c.write(message("waited") + ".\r\n")
	if code, msg := c.reply(); code != 250 {
		t.Errorf("the message after the wait: %d %s, want 250", code, msg)
	}
	if err := <-other; err != nil {
		t.Errorf("the other message: %v", err)
	}
}
