// Package smtpclient is the small SMTP client under smtppool's pool: the
// greeting, EHLO with its extension list (HELO when EHLO is refused),
// STARTTLS upgraded in place, AUTH through a go-sasl client, MAIL and RCPT
// with the parameters go-smtp's client sends, DATA and BDAT, RSET, NOOP and
// QUIT, and pipelining (RFC 2920): several commands in one write, their
// replies read in order after.
//
// A refusal is an *smtp.SMTPError, go-smtp's type, with the enhanced code
// parsed as go-smtp's client parses it; any other error is a failure of
// the connection. Every write is bounded by CommandTimeout (a message by
// DataTimeout), every reply by CommandTimeout (the reply to the end of a
// message by DataTimeout). A Client is not safe for concurrent use.
package smtpclient

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// maxReplyLine bounds the length of a reply line, as go-smtp's client does
// (twice RFC 5321's limit), so that a broken upstream cannot fill memory.
// What a longer line carries past it is discarded, up to maxLongLine.
const maxReplyLine = 2000

// maxLongLine bounds what is read of an over-long reply line before it is
// given up on: up to it, the line's end is found and the replies after it
// stay in step.
const maxLongLine = 64 << 10

// maxReplyLines bounds the lines of one reply (an EHLO reply has a few
// dozen at most).
const maxReplyLines = 256

// Errors of a server that breaks the protocol; each leaves the connection
// unusable.
var (
	// ErrTooLongLine means the server sent a reply line longer than
	// maxLongLine, whose end was not waited for. (A line longer than
	// maxReplyLine and shorter than that is read, cut to maxReplyLine,
	// and leaves the connection out of step: see Unsolicited.)
	ErrTooLongLine = errors.New("reply line too long")
	// ErrReplyTooLong means a reply had more than maxReplyLines lines.
	ErrReplyTooLong = errors.New("reply has too many lines")
	// ErrMalformedReply means a line is not a reply line, or a line of a
	// multi-line reply has another code than the first.
	ErrMalformedReply = errors.New("malformed reply")
	// ErrUnsolicitedReply means the server sent a reply before it was sent
	// a command for it.
	ErrUnsolicitedReply = errors.New("server sent a reply that no command asked for")
	// ErrServerClosed means the server closed the connection (or it was
	// reset) while no command was waiting for a reply.
	ErrServerClosed = errors.New("server closed the connection")
	// ErrOutOfStep means a reply about an address (enhanced code 2.1.x,
	// RFC 3463, which answers MAIL or RCPT) came where the verdict on a
	// message or on a chunk of one was due: a reply no command asked for
	// came in while a command waited, and every reply since was read one
	// command late.
	ErrOutOfStep = errors.New("a reply about an address where the verdict on a message was due: replies out of step")
)

// Client is one connection to an SMTP server.
type Client struct {
	// CommandTimeout bounds the writing of each command and the wait for
	// each reply; DataTimeout bounds the writing of a message and the wait
	// for the reply to its end. Zero means no limit.
	CommandTimeout, DataTimeout time.Duration

	conn  net.Conn // the connection: the one given to New, or TLS over it
	raw   net.Conn // the connection under TLS, or conn
	peek  socketPeeker
	br    *bufio.Reader
	bw    *bufio.Writer
	tw    *textproto.Writer
	ext   map[string]string // from the last EHLO; nil after HELO
	isTLS bool
	// handshook says no reply has been read since the TLS handshake: the
	// records that follow a handshake (session tickets) may still wait
	// in the socket, and are no reply.
	handshook bool
	// malformed, once set, says how the server sent a reply that broke
	// the protocol but could be read: a line over maxReplyLine, or a
	// final reply to a message not in the form of a reply. The
	// connection is out of step after it.
	malformed error

	// Tally counts what the server holds against the client; the client
	// never clears it (its user does, when the server accepts a message).
	Tally Tally
}

// Tally counts what a server such as Postfix's smtpd holds against a
// client until it accepts a message from it, and slows down or
// disconnects a client over its limits for.
type Tally struct {
	// Errors counts the replies of class 4 or 5 read: each a command the
	// server refused, an error to it.
	Errors int
	// Junk counts the RSET and NOOP commands sent: "junk commands" to
	// Postfix.
	Junk int
}

// New returns a client on conn, which may be a *tls.Conn already (implicit
// TLS). Nothing is read or written yet: call Greet.
func New(conn net.Conn) *Client {
	c := &Client{raw: conn}
	if tc, ok := conn.(*tls.Conn); ok {
		c.raw, c.isTLS, c.handshook = tc.NetConn(), true, true
	}
	c.setConn(conn)
	return c
}

func (c *Client) setConn(conn net.Conn) {
	c.conn = conn
	c.br = bufio.NewReader(conn)
	c.bw = bufio.NewWriter(conn)
	c.tw = textproto.NewWriter(c.bw)
}

// TLS reports whether the connection is encrypted.
func (c *Client) TLS() bool { return c.isTLS }

// Close closes the connection without QUIT.
func (c *Client) Close() error { return c.conn.Close() }

// Extension reports whether the server listed ext (in any case) in its
// last EHLO reply, and its parameter.
func (c *Client) Extension(ext string) (bool, string) {
	param, ok := c.ext[strings.ToUpper(ext)]
	return ok, param
}

// Greet reads the server's greeting, which must be 220.
func (c *Client) Greet() error {
	// An implicit TLS handshake happens here, and writes too.
	c.conn.SetDeadline(deadline(c.CommandTimeout))
	defer c.conn.SetDeadline(time.Time{})
	_, _, err := c.readReply(220, c.CommandTimeout)
	if err != nil {
		return fmt.Errorf("greeting: %w", err)
	}
	return nil
}

// Hello sends EHLO and keeps the extensions listed in the reply; when the
// server does not know EHLO (500 or 502), it sends HELO instead, and no
// extension is known.
func (c *Client) Hello(localName string) error {
	if err := checkLine(localName); err != nil {
		return fmt.Errorf("EHLO: %w", err)
	}
	_, msg, err := c.Cmd(250, "EHLO "+localName)
	var smtpErr *smtp.SMTPError
	if errors.As(err, &smtpErr) && (smtpErr.Code == 500 || smtpErr.Code == 502) {
		c.ext = nil
		if _, _, err := c.Cmd(250, "HELO "+localName); err != nil {
			return fmt.Errorf("HELO after EHLO was refused: %w", err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("EHLO: %w", err)
	}
	c.ext = parseExtensions(msg)
	return nil
}

// parseExtensions reads an EHLO reply's lines after the first: a keyword
// and its parameter each.
func parseExtensions(msg string) map[string]string {
	ext := map[string]string{}
	lines := strings.Split(msg, "\n")
	for _, line := range lines[1:] {
		name, param, _ := strings.Cut(line, " ")
		ext[strings.ToUpper(name)] = param
	}
	return ext
}

// StartTLS sends STARTTLS and, on 220, upgrades the connection in place
// with a TLS handshake. The extensions are forgotten: send EHLO again.
func (c *Client) StartTLS(cfg *tls.Config) error {
	if _, _, err := c.Cmd(220, "STARTTLS"); err != nil {
		return fmt.Errorf("STARTTLS: %w", err)
	}
	if c.br.Buffered() > 0 {
		// Bytes after the 220 came in clear text and would be taken for
		// replies over TLS (CVE-2011-0411's injection).
		return errors.New("STARTTLS: server sent data after its 220, before the TLS handshake")
	}
	tc := tls.Client(c.conn, cfg)
	tc.SetDeadline(deadline(c.CommandTimeout))
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("STARTTLS: TLS handshake: %w", err)
	}
	tc.SetDeadline(time.Time{})
	c.setConn(tc)
	c.isTLS, c.handshook = true, true
	c.ext = nil
	return nil
}

// Auth runs a SASL exchange through sc: AUTH with the initial response
// (none when sc gives nil, "=" when it gives an empty one), then a
// base64 response to each 334 challenge, until 235. When sc fails, or a
// challenge is not base64, it cancels the exchange with "*" and returns
// that error; a refusal of the server is an *smtp.SMTPError.
func (c *Client) Auth(sc sasl.Client) error {
	mech, ir, err := sc.Start()
	if err != nil {
		return fmt.Errorf("AUTH: %w", err)
	}
	line := "AUTH " + mech
	switch {
	case len(ir) > 0:
		line += " " + base64.StdEncoding.EncodeToString(ir)
	case ir != nil:
		line += " ="
	}
	sent := [][]byte{ir}
	code, msg, err := c.Cmd(0, line)
	for round := 0; err == nil; round++ {
		switch {
		case code == 235:
			return nil
		case code != 334:
			return toSMTPError(code, redact(msg, sent))
		case round == maxAuthRounds:
			c.Cmd(0, "*")
			return fmt.Errorf("AUTH %s: more than %d challenges", mech, maxAuthRounds)
		}
		var challenge, resp []byte
		challenge, err = base64.StdEncoding.DecodeString(msg)
		if err != nil {
			err = fmt.Errorf("challenge is not base64: %w", err)
		} else {
			resp, err = sc.Next(challenge)
		}
		if err != nil {
			// Cancel the exchange (RFC 4954); the server answers 501.
			c.Cmd(0, "*")
			return fmt.Errorf("AUTH %s: %w", mech, err)
		}
		sent = append(sent, resp)
		code, msg, err = c.Cmd(0, base64.StdEncoding.EncodeToString(resp))
	}
	if errors.Is(err, ErrMalformedReply) {
		// Its error quotes the line, which may echo what was sent.
		err = ErrMalformedReply
	}
	return fmt.Errorf("AUTH %s: %w", mech, err)
}

// redact removes from a server's refusal of AUTH what the client sent:
// each response, in base64 and each of its fields (PLAIN's and XOAUTH2's
// are separated by NUL or SOH) as they are, so that a server that echoes
// them cannot put a password or token into an error and from there into a
// log.
func redact(msg string, sent [][]byte) string {
	for _, resp := range sent {
		if len(resp) == 0 {
			continue
		}
		msg = strings.ReplaceAll(msg, base64.StdEncoding.EncodeToString(resp), "[redacted]")
		fields := strings.FieldsFunc(string(resp), func(r rune) bool { return r == 0 || r == 1 })
		for _, f := range fields {
			for _, part := range []string{f, strings.TrimPrefix(f, "auth=Bearer ")} {
				if len(part) >= 4 {
					msg = strings.ReplaceAll(msg, part, "[redacted]")
				}
			}
		}
	}
	return msg
}

// maxAuthRounds bounds the challenges of one SASL exchange (PLAIN has
// none, LOGIN two, XOAUTH2 at most one), so that a server that keeps
// sending 334 cannot hold a session set-up for ever.
const maxAuthRounds = 8

// Command is one command line of a pipeline and the reply code it
// expects: three digits for an exact code, one or two for a class, 0 for
// any, as textproto.Reader.ReadResponse takes them.
type Command struct {
	Line   string
	Expect int
}

// Reply is the server's reply to one command; Err is an *smtp.SMTPError
// when the code was not the expected one.
type Reply struct {
	Code    int
	Message string
	Err     error
}

// maxFlight bounds the commands of a pipeline written before their
// replies are read. A server answers while the client still writes; were
// the client to write thousands of commands first (a replay of an envelope
// with a raised recipient limit), the replies could fill both sides'
// buffers and each side wait for the other to read (RFC 2920, section
// 3.1). A hundred replies fit in any socket buffer.
const maxFlight = 100

// Pipeline sends cmds and reads their replies in order. The commands go
// out in one write before the first reply is read, as RFC 2920 allows for
// MAIL and RCPT when the server offers PIPELINING; more than maxFlight
// go as several such flights. A refusal does not stop it; a failure of the
// connection does, and is returned with the replies read so far.
func (c *Client) Pipeline(cmds []Command) ([]Reply, error) {
	for _, cmd := range cmds {
		if err := checkLine(cmd.Line); err != nil {
			return nil, err
		}
	}
	replies := make([]Reply, 0, len(cmds))
	for len(cmds) > 0 {
		flight := cmds[:min(len(cmds), maxFlight)]
		cmds = cmds[len(flight):]
		if err := c.checkInSync(); err != nil {
			return replies, err
		}
		// Writes past bufio's buffer happen as the lines are added.
		c.conn.SetWriteDeadline(deadline(c.CommandTimeout))
		for _, cmd := range flight {
			c.bw.WriteString(cmd.Line)
			c.bw.WriteString("\r\n")
		}
		if err := c.flush(c.CommandTimeout); err != nil {
			return replies, err
		}
		for _, cmd := range flight {
			code, msg, err := c.readReply(cmd.Expect, c.CommandTimeout)
			if err != nil && !isReply(err) {
				return replies, err
			}
			replies = append(replies, Reply{Code: code, Message: msg, Err: err})
		}
	}
	return replies, nil
}

// Cmd sends one command line and reads its reply, which must have the code
// expect (as in Command; 0 takes any code).
func (c *Client) Cmd(expect int, line string) (code int, msg string, err error) {
	replies, err := c.Pipeline([]Command{{Line: line, Expect: expect}})
	if err != nil {
		return 0, "", err
	}
	r := replies[0]
	return r.Code, r.Message, r.Err
}

// Noop sends NOOP.
func (c *Client) Noop() error {
	c.Tally.Junk++
	_, _, err := c.Cmd(250, "NOOP")
	if err != nil {
		return fmt.Errorf("NOOP: %w", err)
	}
	return nil
}

// Reset sends RSET.
func (c *Client) Reset() error {
	c.Tally.Junk++
	_, _, err := c.Cmd(250, "RSET")
	if err != nil {
		return fmt.Errorf("RSET: %w", err)
	}
	return nil
}

// Quit sends QUIT and closes the connection, whatever the reply.
func (c *Client) Quit() error {
	_, _, err := c.Cmd(221, "QUIT")
	c.conn.Close()
	if err != nil {
		return fmt.Errorf("QUIT: %w", err)
	}
	return nil
}

// StartData sends DATA and reads the 354 that invites the message.
func (c *Client) StartData() error {
	if _, _, err := c.Cmd(354, "DATA"); err != nil {
		return fmt.Errorf("DATA: %w", err)
	}
	return nil
}

// SendData writes msg after StartData, with its line ends made CRLF and
// dot-stuffed (by textproto's DotWriter), then the final dot, and reads
// the server's verdict, any 2xx being acceptance. sent reports that the
// whole message, final dot included, was written: when it is and err is
// not a reply, the server may have kept the message.
func (c *Client) SendData(msg io.Reader) (reply string, sent bool, err error) {
	if err := c.checkInSync(); err != nil {
		return "", false, err
	}
	c.conn.SetWriteDeadline(deadline(c.DataTimeout))
	w := c.tw.DotWriter()
	if _, err := io.Copy(w, msg); err != nil {
		return "", false, fmt.Errorf("write message: %w", err)
	}
	if err := w.Close(); err != nil { // writes the final dot and flushes
		return "", false, fmt.Errorf("write message: %w", err)
	}
	c.conn.SetWriteDeadline(time.Time{})
	_, text, err := c.readFinalReply(c.DataTimeout)
	if err != nil {
		return "", true, fmt.Errorf("end of DATA: %w", err)
	}
	return text, true, nil
}

// readReply reads one reply within timeout. A code other than expect is
// an *smtp.SMTPError.
func (c *Client) readReply(expect int, timeout time.Duration) (int, string, error) {
	return c.readReplyAs(expect, timeout, false)
}

// readFinalReply reads the server's verdict on a whole message within
// timeout, any 2xx being acceptance. It is lenient: a reply that arrived
// is the server's verdict whenever its code can be read, even when it is
// not in the form of a reply (see readResponse); such a reply leaves the
// connection out of step. Only a reply without a code is no verdict.
//
// A 2xx with an enhanced code of the addressing class (2.1.x) is no
// verdict either: it answers MAIL or RCPT (see ErrOutOfStep), and the
// server's verdict on the message is still to come.
func (c *Client) readFinalReply(timeout time.Duration) (int, string, error) {
	code, msg, err := c.readReplyAs(2, timeout, true)
	if err != nil {
		return code, msg, err
	}
	return code, msg, c.checkNotAddressReply(msg)
}

// checkNotAddressReply fails, and marks the connection out of step, when
// msg, the text of a 2xx that should be the verdict on a message or a
// chunk, begins with an enhanced code of the addressing class (2.1.x):
// servers answer MAIL and RCPT with those (2.1.0, 2.1.5) and a message
// with 2.0.0 or 2.6.0, so the reply is one command late.
func (c *Client) checkNotAddressReply(msg string) error {
	first, _, _ := strings.Cut(msg, "\n")
	first, _, _ = strings.Cut(first, " ")
	if enh, ok := parseEnhancedCode(first); ok && enh[0] == 2 && enh[1] == 1 {
		c.malformed = ErrOutOfStep
		return fmt.Errorf("read reply: %w (%s)", ErrOutOfStep, first)
	}
	return nil
}

func (c *Client) readReplyAs(expect int, timeout time.Duration, lenient bool) (int, string, error) {
	c.conn.SetReadDeadline(deadline(timeout))
	code, msg, err := c.readResponse(lenient)
	for _, broke := range []error{ErrMalformedReply, ErrTooLongLine, ErrReplyTooLong} {
		if errors.Is(err, broke) {
			// Where the next reply starts is not known. (Not err itself,
			// which may quote the line, and the line may echo AUTH.)
			c.malformed = broke
		}
	}
	if err != nil {
		return 0, "", fmt.Errorf("read reply: %w", err)
	}
	c.handshook = false
	if code/100 == 4 || code/100 == 5 {
		c.Tally.Errors++
	}
	if !codeMatches(code, expect) {
		return code, msg, toSMTPError(code, msg)
	}
	return code, msg, nil
}

// readResponse reads one reply, its lines' texts joined by "\n" as
// textproto.Reader.ReadResponse joins them. Unlike ReadResponse, it is
// strict: every line must carry the first line's code (ReadResponse takes
// a line with another code as text of the reply, which would hide the
// start of the next reply in this one), and a reply has at most
// maxReplyLines lines, so that a broken or hostile server cannot fill
// memory with one endless reply. A line over maxReplyLine is cut, and
// leaves the connection out of step.
//
// When lenient, a line whose first three characters are a code from 200
// to 599 but which is not a reply line ("250ok") ends the reply with that
// code, and a line of a multi-line reply may carry another code of the
// same class; both leave the connection out of step. So does a last line
// that the end of the connection (or of the time) cut short after its
// code ("250 2.0.0 Ok: qu"): the server had given its verdict. A line cut
// before its code is complete, or one that announces more lines, is no
// reply.
func (c *Client) readResponse(lenient bool) (code int, msg string, err error) {
	var b strings.Builder
	for n := 0; ; n++ {
		if n == maxReplyLines {
			return 0, "", ErrReplyTooLong
		}
		line, err := c.readLine()
		if err != nil && (!lenient || len(line) < 3) {
			return 0, "", err
		}
		readErr := err
		lineCode, more, text, ok := parseReplyLine(line)
		if !ok && lenient {
			if lineCode, ok = leadingCode(line); ok {
				more, text = false, strings.TrimLeft(line[3:], " ")
				c.malformed = fmt.Errorf("%w: a final reply line with a code, not in the form of a reply line", ErrMalformedReply)
			}
		}
		if readErr != nil {
			if !ok || more {
				return 0, "", readErr
			}
			c.malformed = fmt.Errorf("%w: a final reply line cut short: %w", ErrMalformedReply, readErr)
		}
		switch {
		case !ok:
			return 0, "", fmt.Errorf("%w: %q", ErrMalformedReply, truncate(line))
		case n == 0:
			code = lineCode
		case lineCode != code && !(lenient && lineCode/100 == code/100):
			return 0, "", fmt.Errorf("%w: a line with code %d in a reply with code %d", ErrMalformedReply, lineCode, code)
		case lineCode != code:
			c.malformed = fmt.Errorf("%w: a line with code %d in a reply with code %d", ErrMalformedReply, lineCode, code)
			b.WriteByte('\n')
		default:
			b.WriteByte('\n')
		}
		b.WriteString(text)
		if !more {
			return code, b.String(), nil
		}
	}
}

// readLine reads one line, without its line end (CRLF or LF). A line
// longer than maxReplyLine is cut to it, the rest discarded up to the line
// end, and the connection marked out of step; one longer than maxLongLine
// is ErrTooLongLine. When the read fails inside a line (the connection
// ended, or the time ran out), it returns what arrived of the line (at
// most maxReplyLine bytes) with the error.
func (c *Client) readLine() (string, error) {
	frag, err := c.br.ReadSlice('\n')
	if err == nil {
		if line := trimLineEnd(frag); len(line) <= maxReplyLine {
			return string(line), nil // the usual case: one slice, one copy
		}
	}
	kept := append([]byte(nil), frag[:min(len(frag), maxReplyLine)]...)
	n := len(frag)
	for errors.Is(err, bufio.ErrBufferFull) && n <= maxLongLine {
		frag, err = c.br.ReadSlice('\n')
		n += len(frag)
		if len(kept) < maxReplyLine {
			kept = append(kept, frag[:min(len(frag), maxReplyLine-len(kept))]...)
		}
	}
	switch {
	case n > maxLongLine:
		return "", ErrTooLongLine
	case err != nil:
		return string(trimLineEnd(kept)), err
	}
	c.malformed = fmt.Errorf("%w: a line of %d bytes, over %d", ErrMalformedReply, n, maxReplyLine)
	return string(trimLineEnd(kept)), nil
}

// trimLineEnd removes a line's LF and the CR before it, if any.
func trimLineEnd(b []byte) []byte {
	b = bytes.TrimSuffix(b, []byte("\n"))
	return bytes.TrimSuffix(b, []byte("\r"))
}

// leadingCode reads a reply code from 200 to 599 out of the first three
// characters of a line that is not a reply line.
func leadingCode(line string) (int, bool) {
	if len(line) < 3 {
		return 0, false
	}
	code, err := strconv.Atoi(line[:3])
	if err != nil || code < 200 || code > 599 || line[0] == '+' || line[0] == '-' {
		return 0, false
	}
	return code, true
}

// parseReplyLine splits a reply line into its code, whether more lines
// follow ("250-"), and its text; ok is false when it is not a reply line.
func parseReplyLine(line string) (code int, more bool, text string, ok bool) {
	if len(line) < 3 || (len(line) > 3 && line[3] != ' ' && line[3] != '-') {
		return 0, false, "", false
	}
	code, err := strconv.Atoi(line[:3])
	if err != nil || code < 100 || code > 599 {
		return 0, false, "", false
	}
	if len(line) == 3 {
		return code, false, "", true
	}
	return code, line[3] == '-', line[4:], true
}

// codeMatches reports whether code is the one expected: any code for 0, a
// class for one or two digits, the exact code for three, as
// textproto.Reader.ReadResponse takes expect.
func codeMatches(code, expect int) bool {
	switch {
	case expect <= 0:
		return true
	case expect < 10:
		return code/100 == expect
	case expect < 100:
		return code/10 == expect
	}
	return code == expect
}

// truncate shortens a line quoted in an error.
func truncate(line string) string {
	if len(line) > 80 {
		return line[:80] + "..."
	}
	return line
}

// checkInSync fails when an earlier reply broke the protocol (see
// readResponse), and when the server has sent bytes that no command asked
// for yet: a reply too many would otherwise be taken as the reply to the
// next command, and every reply after it as the reply to the command
// before, up to a refused message read as accepted. It sees the bytes
// already read into the buffer, where an extra reply that came with an
// awaited one is (see outOfStep), and peeks into the socket without
// waiting, where one that came in a later packet is: a system call, no
// round trip. It also fails when the server has closed the connection,
// before anything is written into it. Every write of commands or of a
// message is preceded by it, and so is every BDAT chunk written when no
// earlier chunk's reply is due.
func (c *Client) checkInSync() error {
	if err := c.outOfStep(); err != nil {
		return err
	}
	switch c.peek.state(c.raw) {
	case socketClosed:
		return ErrServerClosed
	case socketData:
		switch {
		case !c.isTLS:
			return ErrUnsolicitedReply
		case c.handshook:
			// The handshake's own records, most likely; the TLS layer
			// takes them in with the next reply.
			return nil
		}
		return c.checkTLSRecords()
	}
	return nil
}

// tlsRecordWait bounds the read that tells, on a TLS connection with
// bytes waiting, whether they carry data: a record is in the socket
// already, or about to be.
const tlsRecordWait = 50 * time.Millisecond

// checkTLSRecords reads the TLS records waiting in the socket: data in
// them is a reply no command asked for; a record without data (a session
// ticket, a key update) is taken in by the TLS layer and leaves nothing.
func (c *Client) checkTLSRecords() error {
	c.conn.SetReadDeadline(time.Now().Add(tlsRecordWait))
	_, err := c.br.Peek(1)
	c.conn.SetReadDeadline(noDeadline)
	var netErr net.Error
	switch {
	case err == nil:
		return ErrUnsolicitedReply
	case errors.As(err, &netErr) && netErr.Timeout():
		return nil
	}
	return fmt.Errorf("%w: %w", ErrServerClosed, err)
}

// outOfStep is what checkInSync knows without a system call: an earlier
// reply broke the protocol, or bytes that no command asked for have been
// read into the buffer.
func (c *Client) outOfStep() error {
	if c.malformed != nil {
		return fmt.Errorf("an earlier reply broke the protocol: %w", c.malformed)
	}
	if c.br.Buffered() > 0 {
		return ErrUnsolicitedReply
	}
	return nil
}

// OutOfStep reports whether the client has already seen that the
// connection is out of step (a reply that broke the protocol, bytes that
// no command asked for read with an awaited reply), without looking into
// the socket: no system call. Such a connection must not be used again.
// Whatever it does not see, the check before the next write does.
func (c *Client) OutOfStep() bool { return c.outOfStep() != nil }

// Unsolicited reports whether the connection is out of step, as OutOfStep
// does, and also looks into the socket (a system call; over TLS, with
// bytes waiting, a read of up to tlsRecordWait): the server has sent bytes
// that no command asked for, or closed the connection. Such a connection
// must not be used again.
func (c *Client) Unsolicited() bool { return c.checkInSync() != nil }

// socketState is what a socketPeeker finds in a socket.
type socketState int

const (
	socketUnknown socketState = iota // the system cannot tell
	socketEmpty                      // nothing to read
	socketData                       // bytes to read
	socketClosed                     // the server closed the connection, or it failed
)

var noDeadline time.Time

// flush writes what is buffered within timeout.
func (c *Client) flush(timeout time.Duration) error {
	c.conn.SetWriteDeadline(deadline(timeout))
	if err := c.bw.Flush(); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	c.conn.SetWriteDeadline(time.Time{})
	return nil
}

func deadline(timeout time.Duration) time.Time {
	if timeout <= 0 {
		return time.Time{}
	}
	return time.Now().Add(timeout)
}

func isReply(err error) bool {
	var smtpErr *smtp.SMTPError
	return errors.As(err, &smtpErr)
}

// ErrInvalidLine means a command argument holds CR or LF, which would end
// the command line early.
var ErrInvalidLine = errors.New("command line contains CR or LF")

func checkLine(s string) error {
	if strings.ContainsAny(s, "\r\n") {
		return ErrInvalidLine
	}
	return nil
}

// toSMTPError makes a reply an *smtp.SMTPError, parsing a leading enhanced
// status code (RFC 2034) out of its text, and out of each line's, as
// go-smtp's client does.
func toSMTPError(code int, msg string) *smtp.SMTPError {
	e := &smtp.SMTPError{Code: code, Message: msg}
	first, rest, ok := strings.Cut(msg, " ")
	if !ok {
		return e
	}
	enh, ok := parseEnhancedCode(first)
	if !ok {
		return e
	}
	e.EnhancedCode = enh
	e.Message = strings.ReplaceAll(rest, "\n"+first+" ", "\n")
	return e
}

func parseEnhancedCode(s string) (smtp.EnhancedCode, bool) {
	var code smtp.EnhancedCode
	parts := strings.Split(s, ".")
	if len(parts) != 3 {
		return code, false
	}
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil {
			return smtp.EnhancedCode{}, false
		}
		code[i] = n
	}
	return code, true
}
