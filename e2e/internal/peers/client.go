package peers

// A client that behaves like the chat server: one new connection per email,
// then QUIT, no retry, no pipelining. SendMail records where the
// conversation ended and with which reply, and a deadline bounds the whole
// conversation, so that a hang shows as a failure instead of blocking.

import (
	"fmt"
	"net"
	"net/textproto"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// runID makes Message-IDs unique across runs.
var runID = strconv.FormatInt(time.Now().UnixNano(), 36)

// RunID is the part of every Message-ID that tells this run from others.
func RunID() string { return runID }

// Message is one notification email, told apart by its Message-ID.
type Message struct {
	ID       string // "<...>"
	From, To string
	Subject  string
	Body     string // lines ending in CRLF, not dot-stuffed
}

// NewMessages makes n messages whose Message-IDs name the scenario, to
// recipients at MailDomain. Each body has a line that starts with a dot.
func NewMessages(scenario string, n int) []Message {
	msgs := make([]Message, n)
	for i := range msgs {
		msgs[i] = Message{
			ID:      fmt.Sprintf("<%s-%d.%s@e2e.smtppool.test>", scenario, i, runID),
			From:    "chat@client.e2e.test",
			To:      fmt.Sprintf("user%d@%s", i, MailDomain),
			Subject: fmt.Sprintf("%s notification %d", scenario, i),
			Body: "Someone mentioned @all in a channel.\r\n" +
				".A line that starts with a dot, to be dot-stuffed.\r\n",
		}
	}
	return msgs
}

// Bytes is the message as sent, lines ending in CRLF, not dot-stuffed.
func (m Message) Bytes() []byte {
	return []byte("From: <" + m.From + ">\r\n" +
		"To: <" + m.To + ">\r\n" +
		"Subject: " + m.Subject + "\r\n" +
		"Date: " + time.Now().Format(time.RFC1123Z) + "\r\n" +
		"Message-ID: " + m.ID + "\r\n" +
		"\r\n" +
		m.Body)
}

// Padded returns m with lines of 76 letters added to its body, so that it
// is at least size bytes long.
func (m Message) Padded(size int) Message {
	const line = "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwx\r\n"
	if need := size - len(m.Bytes()); need > 0 {
		m.Body += strings.Repeat(line, (need+len(line)-1)/len(line))
	}
	return m
}

// Conn is a client connection that sends one command at a time and waits
// for its reply, as the chat server's client does.
type Conn struct {
	conn net.Conn
	text *textproto.Conn
}

// dial connects to addr within timeout; it does not read the greeting.
func dial(addr string, timeout time.Duration) (*Conn, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, err
	}
	return &Conn{conn: c, text: textproto.NewConn(c)}, nil
}

// Open connects to addr, reads the 220 greeting and sends EHLO, all within
// timeout: a connection ready for MAIL, with no deadline left.
func Open(addr string, timeout time.Duration) (*Conn, error) {
	c, err := dial(addr, timeout)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(timeout))
	if err := c.Expect(220, ""); err != nil {
		c.Close()
		return nil, fmt.Errorf("greeting from %s: %w", addr, err)
	}
	if err := c.Expect(250, ehlo); err != nil {
		c.Close()
		return nil, fmt.Errorf("%s: %w", addr, err)
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

const ehlo = "EHLO chat.e2e.test"

// SetDeadline bounds the rest of the conversation; zero removes the bound.
func (c *Conn) SetDeadline(t time.Time) error { return c.conn.SetDeadline(t) }

// Cmd sends a command line, or nothing if line is empty (to read the
// greeting), and reads the reply, of one line or more. err is an I/O error
// or a malformed reply, not a reply code.
func (c *Conn) Cmd(line string) (code int, text string, err error) {
	if line != "" {
		if err := c.text.PrintfLine("%s", line); err != nil {
			return 0, "", err
		}
	}
	return c.text.ReadResponse(0)
}

// Expect is Cmd, and fails unless the reply code is want.
func (c *Conn) Expect(want int, line string) error {
	code, text, err := c.Cmd(line)
	if err == nil && code != want {
		err = fmt.Errorf("got %d %s, want %d", code, text, want)
	}
	if err != nil && line != "" {
		err = fmt.Errorf("%s: %w", line, err)
	}
	return err
}

// Begin sends MAIL, RCPT and DATA for m and expects 250, 250 and 354.
func (c *Conn) Begin(m Message) error {
	if err := c.Expect(250, "MAIL FROM:<"+m.From+">"); err != nil {
		return err
	}
	if err := c.Expect(250, "RCPT TO:<"+m.To+">"); err != nil {
		return err
	}
	return c.Expect(354, "DATA")
}

// WriteData writes msg, dot-stuffed, and the final dot, and flushes them;
// it does not read the reply.
func (c *Conn) WriteData(msg []byte) error {
	w := c.text.DotWriter()
	if _, err := w.Write(msg); err != nil {
		w.Close()
		return err
	}
	return w.Close()
}

// Send runs one transaction of m and expects 250 to the final dot.
func (c *Conn) Send(m Message) error {
	if err := c.Begin(m); err != nil {
		return err
	}
	if err := c.WriteData(m.Bytes()); err != nil {
		return err
	}
	if err := c.Expect(250, ""); err != nil {
		return fmt.Errorf("end of data: %w", err)
	}
	return nil
}

// Quit sends QUIT, waits up to 2 s for the reply, and closes.
func (c *Conn) Quit() {
	c.conn.SetDeadline(time.Now().Add(2 * time.Second))
	_, _, _ = c.Cmd("QUIT")
	c.conn.Close()
}

// Close closes the connection without QUIT.
func (c *Conn) Close() error { return c.conn.Close() }

// Stages of the conversation, where a Result says it ended.
const (
	StageConnect   = "connect"
	StageGreeting  = "greeting"
	StageEHLO      = "EHLO"
	StageMAIL      = "MAIL"
	StageRCPT      = "RCPT"
	StageDATA      = "DATA"
	StageEndOfData = "end of data"
)

// Result is what one client connection saw.
type Result struct {
	Msg        Message
	Local      string        // the client's own address, as smtppool logs it (client=); empty if it did not connect
	Stage      string        // where the conversation ended
	Code       int           // the last reply's code; 0 when no reply came
	Reply      string        // the last reply's text
	Err        error         // the connection error or timeout that came instead of a reply
	DotToReply time.Duration // from sending the final dot to reading its reply
	Start, End time.Time
}

// Accepted reports whether the client was told 250 at the end of DATA.
func (r Result) Accepted() bool { return r.Stage == StageEndOfData && r.Code == 250 }

// NoReply reports whether the client got no reply where one was due: a
// dropped connection or a hang cut by the deadline.
func (r Result) NoReply() bool { return r.Err != nil }

func (r Result) String() string {
	if r.Err != nil {
		return fmt.Sprintf("%s: no reply at %s: %v", r.Msg.ID, r.Stage, r.Err)
	}
	return fmt.Sprintf("%s: %d at %s: %s", r.Msg.ID, r.Code, r.Stage, r.Reply)
}

// SendOptions adjust SendMail.
type SendOptions struct {
	// Timeout bounds the whole conversation; default 60 s.
	Timeout time.Duration
	// OnGreeting, if set, is called once the greeting was read (code 0 if
	// none came), before EHLO. It may block, to hold the client there.
	OnGreeting func(code int)
	// AwaitingMail, if set, counts the clients that have sent MAIL and
	// not yet read its reply: the transactions a server holds at MAIL, as
	// smtppool holds them while it waits for an upstream session.
	AwaitingMail *atomic.Int64
}

// SendMail sends m over a new connection to addr, as the chat server does,
// and tells where the conversation ended.
func SendMail(addr string, m Message, opts SendOptions) (r Result) {
	if opts.Timeout == 0 {
		opts.Timeout = 60 * time.Second
	}
	greeted := func(code int) {
		if opts.OnGreeting != nil {
			opts.OnGreeting(code)
		}
	}
	r.Msg, r.Start, r.Stage = m, time.Now(), StageConnect
	defer func() { r.End = time.Now() }()
	c, err := dial(addr, opts.Timeout)
	if err != nil {
		r.Err = err
		greeted(0)
		return r
	}
	defer c.Close()
	r.Local = c.conn.LocalAddr().String()
	c.SetDeadline(r.Start.Add(opts.Timeout))

	// step sends a command (none for the greeting) and reads the reply.
	step := func(stage string, want int, cmd string) bool {
		r.Stage = stage
		if stage == StageMAIL && opts.AwaitingMail != nil {
			opts.AwaitingMail.Add(1)
			defer opts.AwaitingMail.Add(-1)
		}
		r.Code, r.Reply, r.Err = c.Cmd(cmd)
		return r.Err == nil && r.Code == want
	}
	ok := step(StageGreeting, 220, "")
	greeted(r.Code)
	if !ok {
		return r
	}
	if !step(StageEHLO, 250, ehlo) ||
		!step(StageMAIL, 250, "MAIL FROM:<"+m.From+">") ||
		!step(StageRCPT, 250, "RCPT TO:<"+m.To+">") ||
		!step(StageDATA, 354, "DATA") {
		if r.Err == nil {
			c.Quit()
		}
		return r
	}
	r.Stage = StageEndOfData
	data := m.Bytes()
	sent := time.Now()
	if r.Err = c.WriteData(data); r.Err != nil {
		return r
	}
	r.Code, r.Reply, r.Err = c.Cmd("")
	r.DotToReply = time.Since(sent)
	if r.Err == nil {
		c.Quit()
	}
	return r
}

// BurstOptions adjust SendBurst.
type BurstOptions struct {
	// Spacing starts one client every Spacing; zero starts all at once.
	Spacing time.Duration
	// SyncGreeting holds every client after its greeting until all clients
	// have one, so that all connections are open at the same time.
	SyncGreeting bool
	// Timeout bounds each client's conversation; default 60 s.
	Timeout time.Duration
	// AwaitingMail, if set, counts the clients waiting for the reply to
	// their MAIL (see SendOptions).
	AwaitingMail *atomic.Int64
}

// SendBurst sends every message over its own connection, concurrently, and
// returns the results in the order of msgs.
func SendBurst(addr string, msgs []Message, o BurstOptions) []Result {
	return SendBursts([]string{addr}, [][]Message{msgs}, o)[0]
}

// SendBursts sends bursts[i] to addrs[i], every message over its own
// connection, all bursts at the same moment, as several chat-server
// replicas do after one post; SyncGreeting holds every client of every
// burst until all have their greeting. It returns the results of each
// burst in the order of its messages. Spacing applies to each burst.
func SendBursts(addrs []string, bursts [][]Message, o BurstOptions) [][]Result {
	all := make([][]Result, len(bursts))
	total := 0
	for _, msgs := range bursts {
		total += len(msgs)
	}
	var greeted, done sync.WaitGroup
	release := make(chan struct{})
	opts := SendOptions{Timeout: o.Timeout, AwaitingMail: o.AwaitingMail}
	if o.SyncGreeting {
		greeted.Add(total)
		opts.OnGreeting = func(code int) {
			greeted.Done()
			if code == 220 {
				<-release
			}
		}
		go func() {
			greeted.Wait()
			close(release)
		}()
	}
	for b, msgs := range bursts {
		results := make([]Result, len(msgs))
		all[b] = results
		done.Add(1)
		go func() {
			defer done.Done()
			var tick *time.Ticker
			if o.Spacing > 0 {
				tick = time.NewTicker(o.Spacing)
				defer tick.Stop()
			}
			for i, m := range msgs {
				if tick != nil && i > 0 {
					<-tick.C
				}
				done.Add(1)
				go func() {
					defer done.Done()
					results[i] = SendMail(addrs[b], m, opts)
				}()
			}
		}()
	}
	done.Wait()
	return all
}

// SendBurstLimited sends every message over its own connection, as
// SendBurst does, but with at most limit conversations under way at once,
// as a chat server does whose sending goroutines are bounded: each further
// client starts as soon as one has finished. It returns the results in the
// order of msgs.
func SendBurstLimited(addr string, msgs []Message, limit int, opts SendOptions) []Result {
	results := make([]Result, len(msgs))
	slots := make(chan struct{}, max(limit, 1))
	var done sync.WaitGroup
	for i, m := range msgs {
		slots <- struct{}{}
		done.Add(1)
		go func() {
			defer func() { <-slots; done.Done() }()
			results[i] = SendMail(addr, m, opts)
		}()
	}
	done.Wait()
	return results
}
