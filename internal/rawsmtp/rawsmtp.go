// Package rawsmtp runs an SMTP server on a raw socket, for tests of
// replies that go-smtp's server cannot make: a final reply line of any
// length or shape, a reply cut short by the end of the connection, a
// reply no command asked for, a connection dropped after the message was
// kept. It speaks just enough SMTP for smtppool as upstream: EHLO (with
// PIPELINING, and CHUNKING if asked), MAIL, RCPT, DATA, BDAT, RSET, NOOP
// and QUIT; any other command gets 502.
package rawsmtp

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Options script a Server. Verdict is required.
type Options struct {
	// Chunking offers CHUNKING (BDAT) in the reply to EHLO.
	Chunking bool
	// RcptDelay delays the reply to each RCPT, so that it comes in a
	// packet of its own.
	RcptDelay time.Duration
	// Verdict gives the final reply to the n-th message (from 1, over all
	// connections), as written, CRLF added; "" drops the connection
	// instead. A message is kept unless its verdict starts with 4 or 5.
	Verdict func(n int, msg string) string
	// Cut writes each verdict without its line end and then closes the
	// connection, as a connection cut in the middle of the reply.
	Cut bool
	// After, if set, runs on the connection once the n-th message's
	// verdict is written.
	After func(n int, conn net.Conn)
	// OnCommand, if set, runs before the reply to each command (its verb
	// in upper case) on the conn-th connection (from 1): it may write a
	// reply no command asked for, or wait for what the client sends next
	// (r.Peek) before the reply goes out.
	OnCommand func(conn int, verb string, r *bufio.Reader, write func(string) error)
}

// connDeadline bounds each connection, so that a test that forgets one
// does not hang on it.
const connDeadline = 2 * time.Minute

// Server is a running raw-socket SMTP server.
type Server struct {
	opts Options
	ln   net.Listener

	mu    sync.Mutex
	n     int      // messages received whole
	kept  []string // messages kept, in order
	conns int
	live  map[net.Conn]bool
	wg    sync.WaitGroup
}

// Start listens on 127.0.0.1:0 and serves until Close.
func Start(opts Options) (*Server, error) {
	if opts.Verdict == nil {
		return nil, errors.New("rawsmtp: Options.Verdict is required")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("rawsmtp: %w", err)
	}
	s := &Server{opts: opts, ln: ln, live: map[net.Conn]bool{}}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns++
			n := s.conns
			s.live[conn] = true
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				s.serve(conn, n)
				s.mu.Lock()
				delete(s.live, conn)
				s.mu.Unlock()
				conn.Close()
			}()
		}
	}()
	return s, nil
}

// Close stops listening, closes the connections open and waits until
// every one is done.
func (s *Server) Close() {
	s.ln.Close()
	s.mu.Lock()
	for c := range s.live {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// Addr returns the address the server listens on.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Kept returns the messages kept so far.
func (s *Server) Kept() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.kept...)
}

// Conns returns the connections accepted so far.
func (s *Server) Conns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conns
}

func (s *Server) serve(conn net.Conn, n int) {
	conn.SetDeadline(time.Now().Add(connDeadline))
	r := bufio.NewReader(conn)
	var wmu sync.Mutex // After may write from another goroutine
	write := func(str string) error {
		wmu.Lock()
		defer wmu.Unlock()
		_, err := io.WriteString(conn, str)
		return err
	}
	if write("220 raw.test ESMTP\r\n") != nil {
		return
	}
	var body strings.Builder
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		line = strings.TrimRight(line, "\r\n")
		verb, arg, _ := strings.Cut(line, " ")
		verb = strings.ToUpper(verb)
		if s.opts.OnCommand != nil {
			s.opts.OnCommand(n, verb, r, write)
		}
		var reply string
		switch verb {
		case "EHLO":
			reply = "250-raw.test\r\n250-PIPELINING\r\n"
			if s.opts.Chunking {
				reply += "250-CHUNKING\r\n"
			}
			reply += "250 8BITMIME\r\n"
		case "MAIL":
			body.Reset()
			reply = "250 2.1.0 Ok\r\n" // as Postfix, Exchange and Gmail answer MAIL
		case "RSET", "NOOP":
			body.Reset()
			reply = "250 2.0.0 Ok\r\n"
		case "RCPT":
			if s.opts.RcptDelay > 0 {
				time.Sleep(s.opts.RcptDelay) // what the option is for: a reply in its own packet
			}
			reply = "250 2.1.5 Ok\r\n"
		case "QUIT":
			write("221 2.0.0 Bye\r\n")
			return
		case "DATA":
			if write("354 Go ahead\r\n") != nil {
				return
			}
			for {
				l, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if l == ".\r\n" {
					break
				}
				body.WriteString(strings.TrimPrefix(l, "."))
			}
			if !s.finish(conn, body.String(), write) {
				return
			}
			continue
		case "BDAT":
			size, last, ok := ParseBDAT(arg)
			if !ok {
				reply = "501 5.5.4 Bad BDAT\r\n"
				break
			}
			chunk := make([]byte, size)
			if _, err := io.ReadFull(r, chunk); err != nil {
				return
			}
			body.Write(chunk)
			if !last {
				reply = fmt.Sprintf("250 2.0.0 %d bytes\r\n", size)
				break
			}
			if !s.finish(conn, body.String(), write) {
				return
			}
			body.Reset()
			continue
		default:
			reply = "502 5.5.2 Unknown command\r\n"
		}
		if write(reply) != nil {
			return
		}
	}
}

// finish gives the verdict on a whole message; false means the
// connection is to be dropped.
func (s *Server) finish(conn net.Conn, msg string, write func(string) error) bool {
	s.mu.Lock()
	s.n++
	n := s.n
	s.mu.Unlock()
	verdict := s.opts.Verdict(n, msg)
	if verdict == "" || verdict[0] != '4' && verdict[0] != '5' {
		s.mu.Lock()
		s.kept = append(s.kept, msg)
		s.mu.Unlock()
	}
	if verdict == "" {
		return false
	}
	if s.opts.Cut {
		write(verdict)
		return false
	}
	if write(verdict+"\r\n") != nil {
		return false
	}
	if s.opts.After != nil {
		s.opts.After(n, conn)
	}
	return true
}

// ParseBDAT parses BDAT's arguments as go-smtp's server does; ok is false
// for those it refuses with 501 before reading a chunk.
func ParseBDAT(arg string) (size int, last, ok bool) {
	args := strings.Fields(arg)
	if len(args) == 0 || len(args) > 2 || (len(args) == 2 && !strings.EqualFold(args[1], "LAST")) {
		return 0, false, false
	}
	n, err := strconv.ParseUint(args[0], 10, 32)
	if err != nil {
		return 0, false, false
	}
	return int(n), len(args) == 2, true
}
