package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"strings"
	"time"
)

// smtpConn is a minimal SMTP client for the measurements that smtp-source
// cannot make: it times single transactions and holds connections open.
// It speaks plain SMTP without pipelining, one command and one reply at a
// time, as the chat server's client does.
type smtpConn struct {
	c net.Conn
	r *bufio.Reader
	w *bufio.Writer
}

// dialSMTP connects and reads the greeting.
func dialSMTP(addr string, timeout time.Duration) (*smtpConn, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, err
	}
	s := &smtpConn{c: c, r: bufio.NewReaderSize(c, 1024), w: bufio.NewWriterSize(c, 4096)}
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := s.expect(220); err != nil {
		c.Close()
		return nil, fmt.Errorf("greeting from %s: %w", addr, err)
	}
	c.SetDeadline(time.Time{})
	return s, nil
}

// readReply reads one reply, multi-line or not, and returns its code and
// its last line.
func (s *smtpConn) readReply() (int, string, error) {
	for {
		line, err := s.r.ReadString('\n')
		if err != nil {
			return 0, line, err
		}
		line = strings.TrimRight(line, "\r\n")
		if len(line) < 3 {
			return 0, line, fmt.Errorf("malformed reply %q", line)
		}
		if len(line) > 3 && line[3] == '-' {
			continue
		}
		var code int
		if _, err := fmt.Sscanf(line[:3], "%d", &code); err != nil {
			return 0, line, fmt.Errorf("malformed reply %q", line)
		}
		return code, line, nil
	}
}

func (s *smtpConn) expect(code int) (string, error) {
	got, line, err := s.readReply()
	if err != nil {
		return line, err
	}
	if got != code {
		return line, fmt.Errorf("got %q, want %d", line, code)
	}
	return line, nil
}

// cmd sends one command line and checks the reply code.
func (s *smtpConn) cmd(want int, line string) error {
	if _, err := s.w.WriteString(line + "\r\n"); err != nil {
		return err
	}
	if err := s.w.Flush(); err != nil {
		return err
	}
	if reply, err := s.expect(want); err != nil {
		return fmt.Errorf("%s: %w (%s)", line, err, reply)
	}
	return nil
}

func (s *smtpConn) ehlo() error { return s.cmd(250, "EHLO client.bench.example") }

// send runs one transaction of msg, which must end in CRLF and hold no line
// starting with a dot, and waits for the reply to the final dot.
func (s *smtpConn) send(msg []byte) error {
	if err := s.cmd(250, "MAIL FROM:<sender@bench.example>"); err != nil {
		return err
	}
	if err := s.cmd(250, "RCPT TO:<rcpt@rcpt.example>"); err != nil {
		return err
	}
	if err := s.cmd(354, "DATA"); err != nil {
		return err
	}
	return s.sendBody(msg)
}

// sendBody writes the message and the final dot, then waits for the reply.
func (s *smtpConn) sendBody(msg []byte) error {
	if err := s.writeBody(msg); err != nil {
		return err
	}
	return s.endReply()
}

func (s *smtpConn) writeBody(msg []byte) error {
	if _, err := s.w.Write(msg); err != nil {
		return err
	}
	if _, err := s.w.WriteString(".\r\n"); err != nil {
		return err
	}
	return s.w.Flush()
}

func (s *smtpConn) endReply() error {
	if reply, err := s.expect(250); err != nil {
		return fmt.Errorf("end of data: %w (%s)", err, reply)
	}
	return nil
}

// quit sends QUIT, waits for 221 briefly, and closes.
func (s *smtpConn) quit() {
	s.c.SetDeadline(time.Now().Add(5 * time.Second))
	_ = s.cmd(221, "QUIT")
	s.c.Close()
}

func (s *smtpConn) close() { s.c.Close() }

// testMessage returns a message of about size bytes: a few headers, then
// lines of 76 letters, CRLF-terminated, none starting with a dot.
func testMessage(size int, id string) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "From: <sender@bench.example>\r\nTo: <rcpt@rcpt.example>\r\nSubject: smtppool benchmark\r\nMessage-ID: <%s@bench.example>\r\n\r\n", id)
	line := strings.Repeat("abcdefghijklmnopqrstuvwxyz", 3)[:76] + "\r\n"
	for b.Len() < size {
		b.WriteString(line)
	}
	return b.Bytes()
}
