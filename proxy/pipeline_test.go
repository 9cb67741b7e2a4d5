package proxy_test

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/internal/memsmtp"
)

// writeLog is a pool.Config.Dial that records every write to each
// upstream connection: each write is one flight of commands, and, in the
// transactions of these tests, one round trip.
type writeLog struct {
	mu    sync.Mutex
	conns [][]string // the writes of each connection, in dial order
}

func (l *writeLog) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.conns = append(l.conns, nil)
	return &loggedConn{Conn: c, l: l, i: len(l.conns) - 1}, nil
}

// writes returns how many writes connection i has seen, and the last n.
func (l *writeLog) writes(i int) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.conns[i]...)
}

type loggedConn struct {
	net.Conn
	l *writeLog
	i int
}

func (c *loggedConn) Write(b []byte) (int, error) {
	c.l.mu.Lock()
	c.l.conns[c.i] = append(c.l.conns[c.i], string(b))
	c.l.mu.Unlock()
	return c.Conn.Write(b)
}

// TestRoundTripsPerMessage: a one-recipient message on a warm session
// costs two flights to an upstream with PIPELINING and CHUNKING (MAIL and
// RCPT; BDAT with the message), three without CHUNKING (MAIL and RCPT;
// DATA; the message), and four without either.
func TestRoundTripsPerMessage(t *testing.T) {
	tests := []struct {
		name  string
		hide  []string
		want  int
		verbs []string // the first command of each flight
	}{
		{"PIPELINING and CHUNKING", nil, 2, []string{"MAIL", "BDAT"}},
		{"PIPELINING only", []string{"CHUNKING"}, 3, []string{"MAIL", "DATA", "Message-ID"}},
		{"neither", []string{"PIPELINING", "CHUNKING"}, 4, []string{"MAIL", "RCPT", "DATA", "Message-ID"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := &writeLog{}
			o := options{upstream: memsmtp.Options{Hide: tt.hide}}
			o.pool.Dial = l.dial
			e := newEnv(t, o)
			c := e.dial(t)
			if err := send(c, "app@example.com", []string{"user@example.com"}, message("warm-up")); err != nil {
				t.Fatal(err)
			}
			before := len(l.writes(0))
			if err := send(c, "app@example.com", []string{"user@example.com"}, message("measured")); err != nil {
				t.Fatal(err)
			}
			flights := l.writes(0)[before:]
			if len(flights) != tt.want {
				t.Fatalf("message took %d flights %q, want %d", len(flights), flights, tt.want)
			}
			for i, verb := range tt.verbs {
				if !strings.HasPrefix(flights[i], verb) {
					t.Errorf("flight %d is %q, want it to start with %s", i+1, flights[i], verb)
				}
			}
			if st := e.up.Stats(); st.Conns != 1 || st.Messages != 2 {
				t.Errorf("upstream saw %d connections and %d messages, want 1 and 2", st.Conns, st.Messages)
			}
		})
	}
}

// TestRefusedMailIsReportedAtTheFirstRcpt: with PIPELINING, the client's
// MAIL is answered before the upstream has seen it; the upstream's refusal
// of it reaches the client at the first RCPT, with the upstream's code and
// text, and at every command of the transaction after; nothing is
// delivered, and the next transaction is not affected.
func TestRefusedMailIsReportedAtTheFirstRcpt(t *testing.T) {
	e := newEnv(t, options{})
	e.up.Inject(memsmtp.Mail, memsmtp.Fault{Reply: reply(553, [3]int{5, 7, 1}, "Sender not allowed")})
	c := rawDial(t, e.addr)
	c.must("EHLO client.test", 250)
	c.must("MAIL FROM:<app@example.com>", 250)
	for _, rcpt := range []string{"a@example.com", "b@example.com"} {
		if code, msg := c.cmd("RCPT TO:<" + rcpt + ">"); code != 553 || msg != "5.7.1 Sender not allowed" {
			t.Errorf("RCPT %s: %d %s, want 553 5.7.1 Sender not allowed", rcpt, code, msg)
		}
	}
	if code, msg := c.cmd("DATA"); code/100 != 5 {
		t.Errorf("DATA after the refused MAIL: %d %s, want a 5xx", code, msg)
	}
	c.must("RSET", 250)
	c.must("MAIL FROM:<app@example.com>", 250)
	c.must("RCPT TO:<user@example.com>", 250)
	c.must("DATA", 354)
	c.must(strings.TrimSuffix(message("after"), "\r\n")+"\r\n.", 250)
	msgs := e.up.Messages()
	if len(msgs) != 1 || msgs[0].MessageID() != "<after@test>" {
		t.Errorf("upstream has %d messages, want only the one after the refusal", len(msgs))
	}
}

// TestRefusedMailWithoutPipelining: an upstream without PIPELINING gets
// MAIL at once, and its refusal reaches the client at MAIL, as before.
func TestRefusedMailWithoutPipelining(t *testing.T) {
	e := newEnv(t, options{upstream: memsmtp.Options{Hide: []string{"PIPELINING"}}})
	e.up.Inject(memsmtp.Mail, memsmtp.Fault{Reply: reply(553, [3]int{5, 7, 1}, "Sender not allowed")})
	c := e.dial(t)
	err := c.Mail("app@example.com", nil)
	var got *smtp.SMTPError
	if !errors.As(err, &got) || got.Code != 553 {
		t.Fatalf("MAIL: %v, want the upstream's 553", err)
	}
}

// TestReplayIsOneFlight: after the connection drops at the third RCPT,
// the fresh session gets MAIL, the two recipients the client was told
// were accepted and the third in one write.
func TestReplayIsOneFlight(t *testing.T) {
	l := &writeLog{}
	o := options{}
	o.pool.Dial = l.dial
	e := newEnv(t, o)
	e.up.Inject(memsmtp.Rcpt, memsmtp.Fault{}, memsmtp.Fault{}, memsmtp.Fault{Drop: true})
	c := e.dial(t)
	to := []string{"a@example.com", "b@example.com", "c@example.com"}
	if err := send(c, "app@example.com", to, message("replay")); err != nil {
		t.Fatal(err)
	}
	msgs := e.up.Messages()
	if len(msgs) != 1 || strings.Join(msgs[0].To, ",") != strings.Join(to, ",") {
		t.Fatalf("upstream got %v, want one message to %v", msgs, to)
	}
	want := "MAIL FROM:<app@example.com> BODY=8BITMIME\r\nRCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\n"
	found := false
	for _, w := range l.writes(1) {
		found = found || w == want
	}
	if !found {
		t.Errorf("the retry's session got %q, want the whole envelope in one write %q", l.writes(1), want)
	}
}

// TestReplayedRecipientRefusedTransientlyIsNotDropped: a replayed
// recipient that the upstream turns away with a 4xx is missing from the
// session's transaction; the retry must not go on with that session, or
// the message would go out without a recipient the client was told was
// accepted.
func TestReplayedRecipientRefusedTransientlyIsNotDropped(t *testing.T) {
	e := newEnv(t, options{})
	// a and b accepted, the connection dropped at c; on the retry the
	// replayed a is refused for now; on the next retry all is well.
	e.up.Inject(memsmtp.Rcpt, memsmtp.Fault{}, memsmtp.Fault{}, memsmtp.Fault{Drop: true},
		memsmtp.Fault{Reply: reply(451, [3]int{4, 3, 0}, "Try later")})
	c := e.dial(t)
	to := []string{"a@example.com", "b@example.com", "c@example.com"}
	if err := send(c, "app@example.com", to, message("replayed")); err != nil {
		t.Fatal(err)
	}
	msgs := e.up.Messages()
	if len(msgs) != 1 || strings.Join(msgs[0].To, ",") != strings.Join(to, ",") {
		t.Fatalf("upstream got %+v, want one message to %v", msgs, to)
	}
}

// TestPermanentRefusalAfterAKept4xxIsA4xx: an upstream that kept a message
// but answered 451 for it, then refuses the resend with a 5xx, may hold
// the message: the client gets 451, never the 5xx. (Found by fuzzing:
// corpus entry 32213638e348bc76.)
func TestPermanentRefusalAfterAKept4xxIsA4xx(t *testing.T) {
	e := newEnv(t, options{})
	e.up.Inject(memsmtp.Data, memsmtp.Fault{Deliver: true, Reply: reply(451, [3]int{4, 3, 0}, "Kept, try again")},
		memsmtp.Fault{Reply: reply(554, [3]int{5, 6, 0}, "Refused")})
	c := e.dial(t)
	err := send(c, "app@example.com", []string{"user@example.com"}, message("kept"))
	var got *smtp.SMTPError
	if !errors.As(err, &got) || got.Code != 451 {
		t.Fatalf("send: %v, want 451", err)
	}
	if n := len(e.up.Messages()); n != 1 {
		t.Errorf("upstream has %d messages, want the kept one", n)
	}
}
