package proxy_test

import (
	"io"
	"net"
	"strings"
	"testing"
	"time"

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
			u := startRawUpstream(t, &rawUpstream{
				chunking:  chunking,
				rcptDelay: 50 * time.Millisecond,
				verdict: func(_ int, msg string) string {
					if strings.Contains(msg, "refuse me") {
						return "554 5.7.1 Message refused"
					}
					return "250 2.0.0 Ok: queued"
				},
				after: func(n int, conn net.Conn) {
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
