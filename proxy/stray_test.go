package proxy_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/internal/rawsmtp"
	"github.com/smtppool/smtppool/pool"
	"github.com/smtppool/smtppool/proxy"
)

// TestStrayReplyInALaterPacket: the upstream accepts message 1, later
// sends a 250 no command asked for, in a packet of its own, and refuses
// message 2 with 554 (issue 16, item 8). The client of message 2 must
// hear the 554, not the stray 250: before the next command on the pooled
// session, smtppool looks into the socket (without a round trip) and
// retires a session with a reply waiting. Each reply to RCPT comes in a
// packet of its own too, as it did when the issue was found: on the BDAT
// path the code before took the RCPT's 250, read one reply late, for the
// verdict on message 2.
func TestStrayReplyInALaterPacket(t *testing.T) {
	for _, chunking := range []bool{true, false} {
		t.Run(map[bool]string{true: "BDAT", false: "DATA"}[chunking], func(t *testing.T) {
			sendStray, strayWritten := make(chan struct{}), make(chan struct{})
			u := startRawUpstream(t, rawsmtp.Options{
				Chunking:  chunking,
				RcptDelay: 50 * time.Millisecond,
				Verdict: func(_ int, msg string) string {
					if strings.Contains(msg, "refuse me") {
						return "554 5.7.1 Message refused"
					}
					return "250 2.0.0 Ok: queued"
				},
				After: func(n int, conn net.Conn) {
					if n != 1 {
						return
					}
					<-sendStray
					io.WriteString(conn, "250 2.0.0 Ok: stray\r\n")
					close(strayWritten)
				},
			})
			e := newRawEnv(t, u, pool.Config{MaxConns: 1}, proxy.Config{})

			c := e.dial(t)
			if err := send(c, "app@example.com", []string{"user@example.com"}, message("first")); err != nil {
				t.Fatalf("message 1: %v", err)
			}
			c.Quit()
			close(sendStray) // the client has its 250: the stray comes after
			<-strayWritten

			c = e.dial(t)
			refused := strings.Replace(message("second"), "Hello", "Please refuse me", 1)
			err := send(c, "app@example.com", []string{"user@example.com"}, refused)
			if got := codeOf(err); got != 554 {
				t.Errorf("message 2: client got %d (%v), want the upstream's 554", got, err)
			}
			if kept := u.Kept(); len(kept) != 1 {
				t.Errorf("upstream kept %d messages, want 1", len(kept))
			}
			if n := u.Conns(); n != 2 {
				t.Errorf("upstream accepted %d connections, want 2: the session with the stray reply retired", n)
			}
		})
	}
}

// TestStrayReplyWhileACommandWaits: a reply no command asked for that
// arrives after smtppool wrote a command, before that command's reply,
// cannot be seen by looking into the socket before the write (issue 16,
// item 8): it is read as that command's reply, and every reply after it
// one command late. Here the upstream sends an unasked 250 as it gets
// MAIL, and holds its reply to RCPT until smtppool has written the
// message, which it refuses with 554. On the BDAT path the code before
// read the RCPT's 250 2.1.5 for the verdict on the message and told the
// client 250 for a message the upstream refused. A reply about an address
// (2.1.x) where the verdict is due now shows the replies out of step: the
// verdict counts as lost, the message is sent once more on a fresh
// session, refused there, and the client gets 451 (the first session
// may have kept it, for all smtppool knows), never 250. On the DATA path
// the 250 read for DATA, which wants 354, showed it before too: nothing
// of the message went on that session, and the client hears the fresh
// session's 554.
func TestStrayReplyWhileACommandWaits(t *testing.T) {
	for _, chunking := range []bool{true, false} {
		t.Run(map[bool]string{true: "BDAT", false: "DATA"}[chunking], func(t *testing.T) {
			u := startRawUpstream(t, rawsmtp.Options{
				Chunking: chunking,
				Verdict:  func(int, string) string { return "554 5.7.1 Message refused" },
				OnCommand: func(conn int, verb string, r *bufio.Reader, write func(string) error) {
					if conn != 1 {
						return
					}
					switch verb {
					case "MAIL":
						write("250 2.0.0 Ok: stray\r\n")
					case "RCPT":
						r.Peek(1) // the reply goes out once smtppool sent its next command
					}
				},
			})
			e := newRawEnv(t, u, pool.Config{MaxConns: 1}, proxy.Config{})
			c := e.dial(t)
			err := send(c, "app@example.com", []string{"user@example.com"}, message("refused"))
			// BDAT: the message went whole on the first session, so a 4xx
			// after the resend; DATA: nothing went, and the fresh
			// session's 554 is the verdict.
			want := map[bool]int{true: 451, false: 554}[chunking]
			if code := codeOf(err); code != want {
				t.Errorf("client got %d (%v), want %d: the upstream refused the message", code, err, want)
			}
			if kept := u.Kept(); len(kept) != 0 {
				t.Errorf("upstream kept %d messages, want 0", len(kept))
			}
			memsmtp.WaitFor(t, "the session to be given back", func() bool { return e.pool.Stat().AcquiredConns == 0 })
		})
	}
}

// TestFinalReplyCutShortIsTheVerdict: the upstream's verdict on a
// message, its last line cut short by the end of the connection after its
// code, is its verdict (issue 16, item 3): a cut 250 is delivered once
// (the code before took it for a lost reply and sent the message again:
// two copies), a cut 554 is refused (before: resent, and the resend's
// verdict taken instead). The session is not used again.
func TestFinalReplyCutShortIsTheVerdict(t *testing.T) {
	tests := []struct {
		verdict  string
		wantCode int
		wantKept int
	}{
		{"250 2.0.0 Ok: queued as 4AB", 250, 1},
		{"554 5.7.1 Refu", 554, 0},
	}
	for _, tt := range tests {
		for _, chunking := range []bool{true, false} {
			t.Run(fmt.Sprintf("%d, chunking %v", tt.wantCode, chunking), func(t *testing.T) {
				u := startRawUpstream(t, rawsmtp.Options{
					Chunking: chunking,
					Cut:      true,
					Verdict:  func(int, string) string { return tt.verdict },
				})
				e := newRawEnv(t, u, pool.Config{MaxConns: 1}, proxy.Config{})
				c := e.dial(t)
				err := send(c, "app@example.com", []string{"user@example.com"}, message("cut"))
				if got := codeOf(err); got != tt.wantCode {
					t.Errorf("client got %d (%v), want %d", got, err, tt.wantCode)
				}
				if n := len(u.Kept()); n != tt.wantKept {
					t.Errorf("upstream kept the message %d times, want %d", n, tt.wantKept)
				}
				if n := u.Conns(); n != 1 {
					t.Errorf("upstream accepted %d connections, want 1: no resend", n)
				}
				memsmtp.WaitFor(t, "the session to be closed", func() bool { return e.pool.Stat().TotalConns == 0 })
			})
		}
	}
}

// TestLostAndMalformedFinalReplies: issue 16, item 3, on a raw socket. An
// upstream that keeps every message and drops the connection before its
// reply got 34 copies of one in two minutes: now it gets the message
// twice, and the client 451 4.4.0. A final reply that arrived, with a
// line over the limit or not in the form of a reply line, is the
// upstream's verdict: a 250 is delivered (9 copies in 20 s before), a 554
// refused, and the session is not used again. A final reply with a code
// that is neither acceptance nor refusal (354, 199) is no verdict: it
// counts as a lost reply (before, the message was sent again for the
// whole retry window, 34 copies in two minutes).
func TestLostAndMalformedFinalReplies(t *testing.T) {
	long := strings.Repeat("x", 2100)
	tests := []struct {
		name      string
		verdict   string // "" drops the connection after keeping the message
		wantCode  int
		wantKept  int
		wantConns int
	}{
		{"dropped before every reply", "", 451, 2, 2},
		{"250 and a line over the limit", "250 2.0.0 Ok: queued as " + long, 250, 1, 1},
		{"250 run into 2,100 bytes", "250" + long, 250, 1, 1},
		{"554 and a line over the limit", "554 5.7.1 Refused " + long, 554, 0, 1},
		// Neither acceptance nor refusal: no verdict, as a lost reply
		// (the code before resent it for the whole retry window).
		{"354 to the whole message", "354 Go ahead", 451, 2, 2},
		{"199 to the whole message", "199 Hmm", 451, 2, 2},
	}
	for _, tt := range tests {
		for _, chunking := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s, chunking %v", tt.name, chunking), func(t *testing.T) {
				u := startRawUpstream(t, rawsmtp.Options{
					Chunking: chunking,
					Verdict:  func(int, string) string { return tt.verdict },
				})
				e := newRawEnv(t, u, pool.Config{MaxConns: 2}, proxy.Config{})
				c := e.dial(t)
				err := send(c, "app@example.com", []string{"user@example.com"}, message("final"))
				var se *smtp.SMTPError
				switch {
				case codeOf(err) != tt.wantCode:
					t.Errorf("client got %d (%v), want %d", codeOf(err), err, tt.wantCode)
				case tt.wantCode == 451 && (!errors.As(err, &se) || *se != *proxy.ReplyLostTwice):
					t.Errorf("client got %v, want %v", err, proxy.ReplyLostTwice)
				case tt.wantCode == 554 && (!errors.As(err, &se) || len(se.Message) > 480):
					t.Errorf("client got %v, want the upstream's 554 with its text cut to 480 bytes", err)
				}
				if n := len(u.Kept()); n != tt.wantKept {
					t.Errorf("upstream kept the message %d times, want %d", n, tt.wantKept)
				}
				if n := u.Conns(); n != tt.wantConns {
					t.Errorf("upstream accepted %d connections, want %d", n, tt.wantConns)
				}
				memsmtp.WaitFor(t, "the session to be given back", func() bool { return e.pool.Stat().AcquiredConns == 0 })
				if tt.verdict != "" {
					// The session that got a reply breaking the protocol
					// is closed, not kept for the next message.
					memsmtp.WaitFor(t, "the session to be closed", func() bool { return e.pool.Stat().TotalConns == 0 })
				}
			})
		}
	}
}
