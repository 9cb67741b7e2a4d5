package pool

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/pool/internal/smtpclient"
)

// quitTimeout bounds the polite QUIT that closes a healthy session.
const quitTimeout = 5 * time.Second

// session is one connection to the upstream, past greeting, EHLO, STARTTLS
// and AUTH. It is used by one goroutine at a time: the holder of its Conn, or
// the pool.
type session struct {
	id           uint64
	client       *smtpclient.Client
	conn         net.Conn // the TCP connection under client, TLS or not
	tls          bool
	transactions int  // times lent by Acquire
	messages     int  // messages that reached the end of DATA
	dirty        bool // a transaction was started and not finished
	broken       bool // an I/O error, a 421 or a cancelled command: never reuse
	closeReason  closeReason
	upstream     *upstream // the entry of Config.Addr it is connected to
	afterClose   func()    // called once the connection is closed, if set
}

// close ends the session: politely with QUIT when it is healthy, by closing
// the connection otherwise.
func (s *session) close() {
	if !s.broken {
		s.client.CommandTimeout = quitTimeout
		if s.client.Quit() == nil {
			return
		}
	}
	s.conn.Close()
}

// bind makes the session give up when ctx ends, by closing its connection
// (which also unblocks a command waiting for its reply), and returns the
// function that stops watching ctx.
func (s *session) bind(ctx context.Context) (stop func()) {
	if ctx.Done() == nil {
		return func() {}
	}
	unwatch := context.AfterFunc(ctx, func() { s.conn.Close() })
	return func() { unwatch() }
}

// fail marks the session broken after an I/O error, a 421 or the end of
// ctx, and wraps err with the command's name (and ctx's cause).
func (s *session) fail(ctx context.Context, cmd string, err error) error {
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		s.broken = true
		return fmt.Errorf("upstream %s: %w (%w)", cmd, err, context.Cause(ctx))
	}
	var smtpErr *smtp.SMTPError
	if !errors.As(err, &smtpErr) || smtpErr.Code == 421 {
		s.broken = true
	}
	return fmt.Errorf("upstream %s: %w", cmd, err)
}
