// Package memsmtp runs an in-process SMTP server that keeps the messages it
// accepts in memory. It is the upstream of smtppool's demo mode and of its
// unit tests, which use its fault injection (a reply, a delay or a dropped
// connection at a chosen command) and its counters (connections, concurrent
// connections, AUTHs, messages).
package memsmtp

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/mail"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// Command names the point of a session where a Fault applies.
type Command string

// The points where faults apply.
const (
	Banner Command = "BANNER" // the greeting, right after accept
	Auth   Command = "AUTH"
	Mail   Command = "MAIL"
	Rcpt   Command = "RCPT"
	Data   Command = "DATA" // the message and its final reply
)

// Fault is a misbehaviour applied once, at the next Command of its kind, on
// whatever connection reaches it first.
type Fault struct {
	// Delay waits this long before answering; at Data, after reading the
	// whole message and before keeping it.
	Delay time.Duration
	// Reply answers with this error instead of accepting.
	Reply *smtp.SMTPError
	// ReplyFor, if set, answers with the error it returns for the
	// command's argument (the address at Mail and Rcpt, the user name at
	// Auth, the message at Data), as a server that quotes what it was
	// sent in its refusal; nil goes on as without it.
	ReplyFor func(arg string) *smtp.SMTPError
	// Drop closes the connection instead of answering. At Data the message
	// is cut off halfway, unless Deliver is set.
	Drop bool
	// Deliver, at Data, reads and keeps the whole message before Reply or
	// Drop, as a server that accepted a message and then failed to say so.
	Deliver bool
	// Stall, at Data, waits this long before reading the message at all,
	// as a server that has answered 354 and stopped reading.
	Stall time.Duration
}

// Message is one accepted message.
type Message struct {
	From string
	To   []string
	Opts smtp.MailOptions
	Data []byte
	// Conn is the number of the connection that carried it, from 1.
	Conn int64
}

// MessageID returns the message's Message-ID header, or "".
func (m Message) MessageID() string {
	msg, err := mail.ReadMessage(bytes.NewReader(m.Data))
	if err != nil {
		return ""
	}
	return msg.Header.Get("Message-Id")
}

// Options configure a Server.
type Options struct {
	// Addr to listen on; default "127.0.0.1:0".
	Addr string
	// TLS, if set, is offered with STARTTLS, or spoken from the first byte
	// when ImplicitTLS is set.
	TLS         *tls.Config
	ImplicitTLS bool
	// Username and Password, if set, are required with AUTH before MAIL.
	Username, Password string
	// AuthMechanisms are those offered when Username is set; default PLAIN
	// and LOGIN.
	AuthMechanisms []string
	// XOAUTH2, if set, is the server side of XOAUTH2, offered when
	// AuthMechanisms lists it.
	XOAUTH2 *XOAUTH2
	// MaxMessageBytes is advertised with SIZE and enforced; default 0, none.
	MaxMessageBytes int64
	// Hide removes these extensions (such as "8BITMIME" or "SMTPUTF8") from
	// the EHLO reply.
	Hide []string
	// SessionLimit, when above zero, is how many concurrent connections
	// may send: as Exchange Online does with its 3 per mailbox, a
	// connection with that many older ones still open gets
	// "432 4.3.2 Concurrent connections limit exceeded" to DATA.
	SessionLimit int
	// AbandonDelay, when above zero, delays the reply to a RSET (or a
	// repeated EHLO) that abandons a transaction, one with MAIL and no
	// message yet: as Postfix's smtpd does to a client that keeps
	// abandoning transactions (past smtpd_junk_command_limit RSETs, it
	// sleeps before its replies).
	AbandonDelay time.Duration
	// OnMessage, if set, is called with each accepted message.
	OnMessage func(Message)
	// ErrorLog receives go-smtp's internal errors; default discards them.
	ErrorLog *log.Logger
}

// Stats are a server's counters.
type Stats struct {
	Conns    int64 // connections accepted, refused ones included
	Open     int64 // connections open now
	MaxOpen  int64 // most connections open at once
	Auths    int64 // successful AUTH exchanges
	Messages int64 // messages accepted
	// Commands counts the command lines received, by verb ("EHLO",
	// "RSET", ...). Lines of message bodies are counted too, so tests
	// should send bodies whose lines do not start with a verb.
	Commands map[string]int64
	// MostJunk and MostErrors are the most junk commands (RSET and NOOP)
	// and error replies (4xx and 5xx) that one connection had without a
	// message delivered in between: what Postfix's smtpd counts against
	// smtpd_junk_command_limit and its error limits, forgetting both when
	// it accepts a message. They are counted in plain text only: not with
	// ImplicitTLS, and not after STARTTLS. Lines of message bodies count
	// as for Commands.
	MostJunk, MostErrors int64
}

// Server is a running in-memory SMTP server.
type Server struct {
	// Addr is the address the server listens on.
	Addr string

	opts Options
	srv  *smtp.Server
	ln   net.Listener
	done chan struct{}

	// closing is closed by Close: fault pauses end at once, so that every
	// session ends before go-smtp's Close runs (see Close).
	closing   chan struct{}
	closeOnce sync.Once

	conns, open, maxOpen, auths atomic.Int64
	mostJunk, mostErrors        int64 // guarded by mu

	mu       sync.Mutex
	faults   map[Command][]Fault
	messages []Message
	commands map[string]int64
	live     map[*conn]struct{}
	sessions int           // sessions not yet logged out
	idle     chan struct{} // closed once closing and no session is left
}

// Start listens and serves until Close.
func Start(opts Options) (*Server, error) {
	if opts.Addr == "" {
		opts.Addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", opts.Addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", opts.Addr, err)
	}
	s := &Server{Addr: ln.Addr().String(), opts: opts, done: make(chan struct{}), closing: make(chan struct{}), idle: make(chan struct{}),
		faults: map[Command][]Fault{}, commands: map[string]int64{}, live: map[*conn]struct{}{}}
	s.srv = smtp.NewServer(smtp.BackendFunc(s.newSession))
	s.srv.Domain = "memsmtp.test"
	s.srv.MaxMessageBytes = opts.MaxMessageBytes
	if opts.XOAUTH2 != nil {
		s.srv.MaxLineLength = xoauth2MaxLine
	}
	s.srv.AllowInsecureAuth = true
	s.srv.EnableSMTPUTF8 = true
	s.srv.Debug = commandCounter{s}
	// A nil *log.Logger in the interface would not compare equal to nil.
	s.srv.ErrorLog = log.New(io.Discard, "", 0)
	if opts.ErrorLog != nil {
		s.srv.ErrorLog = opts.ErrorLog
	}
	if opts.TLS != nil && !opts.ImplicitTLS {
		s.srv.TLSConfig = opts.TLS
	}
	s.ln = &listener{Listener: ln, s: s}
	go func() {
		defer close(s.done)
		s.srv.Serve(s.ln)
	}()
	return s, nil
}

// Close stops the server and closes every connection. It ends fault
// pauses and closes the connections first, and waits (a few seconds at
// most) for their sessions to end before go-smtp's own Close runs: that
// one, run while a session is inside a BDAT command, races with it.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		close(s.closing)
		s.endedLocked()
		s.mu.Unlock()
	})
	s.ln.Close()
	s.CloseConns()
	select {
	case <-s.idle:
	case <-time.After(5 * time.Second):
	}
	err := s.srv.Close()
	<-s.done
	return err
}

// endedLocked closes idle if the server is closing and no session is
// left.
func (s *Server) endedLocked() {
	select {
	case <-s.idle:
		return
	default:
	}
	select {
	case <-s.closing:
		if s.sessions == 0 {
			close(s.idle)
		}
	default:
	}
}

// pause waits d, or less if the server is closing.
func (s *Server) pause(d time.Duration) {
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-s.closing:
	}
}

// Inject queues faults; each applies once, in order, at its Command.
func (s *Server) Inject(cmd Command, faults ...Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults[cmd] = append(s.faults[cmd], faults...)
}

func (s *Server) nextFault(cmd Command) *Fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	q := s.faults[cmd]
	if len(q) == 0 {
		return nil
	}
	f := q[0]
	s.faults[cmd] = q[1:]
	return &f
}

// Messages returns a copy of the accepted messages, in order of acceptance.
func (s *Server) Messages() []Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Message(nil), s.messages...)
}

// Stats returns the server's counters.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	cmds := make(map[string]int64, len(s.commands))
	for k, v := range s.commands {
		cmds[k] = v
	}
	return Stats{Conns: s.conns.Load(), Open: s.open.Load(), MaxOpen: s.maxOpen.Load(),
		Auths: s.auths.Load(), Messages: int64(len(s.messages)), Commands: cmds,
		MostJunk: s.mostJunk, MostErrors: s.mostErrors}
}

// CloseConns closes every open connection, as a server restart would, and
// keeps listening.
func (s *Server) CloseConns() {
	s.mu.Lock()
	live := make([]*conn, 0, len(s.live))
	for c := range s.live {
		live = append(live, c)
	}
	s.mu.Unlock()
	for _, c := range live {
		c.Close()
	}
}

// commandCounter receives go-smtp's debug copy of all traffic and counts
// the lines that start with a command verb. Replies start with a digit.
type commandCounter struct{ s *Server }

func (cc commandCounter) Write(b []byte) (int, error) {
	cc.s.mu.Lock()
	defer cc.s.mu.Unlock()
	for _, line := range bytes.Split(b, []byte("\r\n")) {
		verb, _, _ := bytes.Cut(line, []byte(" "))
		if len(verb) >= 4 && len(verb) <= 8 && bytes.Equal(verb, bytes.ToUpper(verb)) && verb[0] >= 'A' && verb[0] <= 'Z' {
			cc.s.commands[string(verb)]++
		}
	}
	return len(b), nil
}

func (s *Server) deliver(m Message) {
	s.mu.Lock()
	s.messages = append(s.messages, m)
	s.mu.Unlock()
	if s.opts.OnMessage != nil {
		s.opts.OnMessage(m)
	}
}

// listener counts connections and applies Banner faults before go-smtp
// sends its greeting.
type listener struct {
	net.Listener
	s *Server
}

func (l *listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		s := l.s
		conn := &conn{Conn: c, s: s, id: s.conns.Add(1), hide: s.opts.Hide}
		conn.plain.Store(!s.opts.ImplicitTLS)
		s.mu.Lock()
		s.live[conn] = struct{}{}
		s.mu.Unlock()
		open := s.open.Add(1)
		for {
			max := s.maxOpen.Load()
			if open <= max || s.maxOpen.CompareAndSwap(max, open) {
				break
			}
		}
		f := s.nextFault(Banner)
		if f != nil && f.ReplyFor != nil {
			f.Reply, f.ReplyFor = f.ReplyFor(""), nil
		}
		if f != nil && f.Reply == nil && !f.Drop {
			conn.greetDelay = f.Delay // a slow greeting, without blocking Accept
			f = nil
		}
		if f != nil {
			s.pause(f.Delay)
			if f.Reply != nil {
				fmt.Fprintf(conn, "%d %d.%d.%d %s\r\n", f.Reply.Code, f.Reply.EnhancedCode[0],
					f.Reply.EnhancedCode[1], f.Reply.EnhancedCode[2], f.Reply.Message)
			}
			conn.Close()
			continue
		}
		if s.opts.ImplicitTLS {
			return tls.Server(conn, s.opts.TLS), nil
		}
		return conn, nil
	}
}

// conn counts its own closing, hides extensions from the EHLO reply, and
// keeps Postfix's counts of junk commands and errors (see Stats.MostJunk).
type conn struct {
	net.Conn
	s         *Server
	id        int64
	hide      []string
	closeOnce sync.Once

	greetDelay time.Duration // delays the first write, the greeting

	// plain says that what Read and Write see is plain text: false with
	// implicit TLS and from STARTTLS on.
	plain atomic.Bool
	// line is the start of the line being read, up to maxVerb bytes.
	line []byte
	// junk and errs are counted since the last delivered message; guarded
	// by s.mu.
	junk, errs int64
}

// maxVerb is the most bytes of a line that Read keeps to find its verb.
const maxVerb = 9

// Read counts the junk commands among the lines it reads.
func (c *conn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	for _, ch := range b[:n] {
		if !c.plain.Load() {
			break
		}
		if ch != '\n' {
			if len(c.line) < maxVerb {
				c.line = append(c.line, ch)
			}
			continue
		}
		verb, _, _ := bytes.Cut(bytes.TrimRight(c.line, "\r"), []byte(" "))
		c.line = c.line[:0]
		switch strings.ToUpper(string(verb)) {
		case "RSET", "NOOP":
			c.s.mu.Lock()
			c.junk++
			c.s.mostJunk = max(c.s.mostJunk, c.junk)
			c.s.mu.Unlock()
		case "STARTTLS":
			c.plain.Store(false)
		}
	}
	return n, err
}

// delivered forgets the junk commands and errors, as Postfix does when it
// accepts a message.
func (c *conn) delivered() {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	c.junk, c.errs = 0, 0
}

func (c *conn) Close() error {
	c.closeOnce.Do(func() {
		c.s.open.Add(-1)
		c.s.mu.Lock()
		delete(c.s.live, c)
		c.s.mu.Unlock()
	})
	return c.Conn.Close()
}

// Write drops EHLO reply lines of hidden extensions. go-smtp writes and
// flushes each reply line separately, and never ends the reply with one of
// these, so a line can be dropped whole.
func (c *conn) Write(b []byte) (int, error) {
	if d := c.greetDelay; d > 0 {
		c.greetDelay = 0
		c.s.pause(d)
	}
	for _, ext := range c.hide {
		if bytes.HasPrefix(b, []byte("250-"+ext)) {
			return len(b), nil
		}
	}
	// The last line of a reply ("550 ...", not "550-...") counts it.
	if c.plain.Load() && len(b) > 3 && (b[0] == '4' || b[0] == '5') && b[3] == ' ' {
		c.s.mu.Lock()
		c.errs++
		c.s.mostErrors = max(c.s.mostErrors, c.errs)
		c.s.mu.Unlock()
	}
	return c.Conn.Write(b)
}

func (s *Server) newSession(c *smtp.Conn) (smtp.Session, error) {
	var id int64
	if cc := connOf(c.Conn()); cc != nil {
		id = cc.id
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.closing:
		return nil, errors.New("memsmtp: server closing")
	default:
	}
	s.sessions++
	return &session{s: s, c: c, conn: id, cc: connOf(c.Conn())}, nil
}

func connOf(nc net.Conn) *conn {
	if tc, ok := nc.(*tls.Conn); ok {
		nc = tc.NetConn()
	}
	cc, _ := nc.(*conn)
	return cc
}

var errDropped = errors.New("memsmtp: connection dropped by fault")

type session struct {
	logout sync.Once
	s      *Server
	c      *smtp.Conn
	conn   int64
	cc     *conn // nil if not one of the listener's
	authed bool
	msg    Message
	begun  bool // a transaction is open: MAIL, and no message yet
}

// apply runs a fault on a command with argument arg and returns the error
// to answer with, or nil to go on.
func (ss *session) apply(f *Fault, arg string) error {
	if f == nil {
		return nil
	}
	ss.s.pause(f.Delay)
	if f.Drop {
		ss.c.Conn().Close()
		return errDropped
	}
	if f.ReplyFor != nil {
		if r := f.ReplyFor(arg); r != nil {
			return r
		}
	}
	if f.Reply != nil {
		return f.Reply
	}
	return nil
}

func (ss *session) AuthMechanisms() []string {
	if ss.s.opts.Username == "" {
		return nil
	}
	if ss.s.opts.AuthMechanisms != nil {
		return ss.s.opts.AuthMechanisms
	}
	return []string{sasl.Plain, sasl.Login}
}

func (ss *session) Auth(mech string) (sasl.Server, error) {
	check := func(username, password string) error {
		if err := ss.apply(ss.s.nextFault(Auth), username); err != nil {
			return err
		}
		if username != ss.s.opts.Username || password != ss.s.opts.Password {
			return smtp.ErrAuthFailed
		}
		ss.authed = true
		ss.s.auths.Add(1)
		return nil
	}
	switch mech {
	case sasl.Plain:
		return sasl.NewPlainServer(func(_, username, password string) error { return check(username, password) }), nil
	case sasl.Login:
		return &loginServer{check: check}, nil
	case "XOAUTH2":
		return ss.xoauth2Server()
	}
	return nil, smtp.ErrAuthUnknownMechanism
}

func (ss *session) Mail(from string, opts *smtp.MailOptions) error {
	if ss.s.opts.Username != "" && !ss.authed {
		return smtp.ErrAuthRequired
	}
	if err := ss.apply(ss.s.nextFault(Mail), from); err != nil {
		return err
	}
	ss.msg = Message{From: from, Conn: ss.conn}
	ss.begun = true
	if opts != nil {
		ss.msg.Opts = *opts
	}
	return nil
}

func (ss *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	if err := ss.apply(ss.s.nextFault(Rcpt), to); err != nil {
		return err
	}
	ss.msg.To = append(ss.msg.To, to)
	return nil
}

// ErrSessionLimit is the reply of a server over its SessionLimit, at DATA.
var ErrSessionLimit = &smtp.SMTPError{Code: 432, EnhancedCode: smtp.EnhancedCode{4, 3, 2},
	Message: "Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information."}

// overSessionLimit reports whether SessionLimit connections older than
// this session's are open.
func (ss *session) overSessionLimit() bool {
	limit := ss.s.opts.SessionLimit
	if limit <= 0 {
		return false
	}
	ss.s.mu.Lock()
	defer ss.s.mu.Unlock()
	older := 0
	for c := range ss.s.live {
		if c.id < ss.conn {
			older++
		}
	}
	return older >= limit
}

func (ss *session) Data(r io.Reader) error {
	err := ss.data(r)
	if err == nil && ss.cc != nil {
		ss.cc.delivered()
	}
	return err
}

func (ss *session) data(r io.Reader) error {
	ss.begun = false
	if ss.overSessionLimit() {
		return ErrSessionLimit
	}
	f := ss.s.nextFault(Data)
	if f != nil {
		ss.s.pause(f.Stall)
	}
	if f != nil && f.Drop && !f.Deliver {
		io.CopyN(io.Discard, r, 64)
		ss.c.Conn().Close()
		return errDropped
	}
	data, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	m := ss.msg
	m.Data = data
	if f == nil {
		ss.s.deliver(m)
		return nil
	}
	ss.s.pause(f.Delay)
	if f.ReplyFor != nil {
		f.Reply, f.ReplyFor = f.ReplyFor(string(data)), nil
	}
	if f.Deliver || (f.Reply == nil && !f.Drop) {
		ss.s.deliver(m)
	}
	f.Delay = 0
	return ss.apply(f, "")
}

func (ss *session) Reset() {
	if ss.begun {
		ss.s.pause(ss.s.opts.AbandonDelay)
	}
	ss.begun = false
	ss.msg = Message{}
}

// Logout ends the session, once.
func (ss *session) Logout() error {
	ss.logout.Do(func() {
		ss.s.mu.Lock()
		ss.s.sessions--
		ss.s.endedLocked()
		ss.s.mu.Unlock()
	})
	return nil
}

// loginServer is the server side of the LOGIN mechanism, which go-sasl
// implements only as a client.
type loginServer struct {
	check    func(username, password string) error
	username string
	step     int
}

func (l *loginServer) Next(response []byte) ([]byte, bool, error) {
	l.step++
	switch l.step {
	case 1:
		if len(response) > 0 { // initial response carries the user name
			l.username = string(response)
			l.step++
			return []byte("Password:"), false, nil
		}
		return []byte("Username:"), false, nil
	case 2:
		l.username = string(response)
		return []byte("Password:"), false, nil
	default:
		return nil, true, l.check(l.username, string(response))
	}
}
