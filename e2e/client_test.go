//go:build e2e

package e2e

// A client that behaves like the chat server: one new connection per email,
// then QUIT, no retry. It records where the conversation ended and with
// which reply, and a deadline bounds the whole conversation, so that a hang
// fails the test instead of blocking it.

import (
	"fmt"
	"net"
	"net/textproto"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// runID makes Message-IDs unique across runs.
var runID = strconv.FormatInt(time.Now().UnixNano(), 36)

// testMessage is one notification email, told apart by its Message-ID.
type testMessage struct {
	ID       string // "<...>"
	From, To string
	Subject  string
}

// newMessages makes n messages whose Message-IDs name the scenario.
func newMessages(scenario string, n int) []testMessage {
	msgs := make([]testMessage, n)
	for i := range msgs {
		msgs[i] = testMessage{
			ID:      fmt.Sprintf("<%s-%d.%s@e2e.smtppool.test>", scenario, i, runID),
			From:    "chat@client.e2e.test",
			To:      fmt.Sprintf("user%d@test.example", i),
			Subject: fmt.Sprintf("%s notification %d", scenario, i),
		}
	}
	return msgs
}

// Bytes is the message as sent, lines ending in CRLF, not dot-stuffed.
func (m testMessage) Bytes() []byte {
	return []byte("From: <" + m.From + ">\r\n" +
		"To: <" + m.To + ">\r\n" +
		"Subject: " + m.Subject + "\r\n" +
		"Date: " + time.Now().Format(time.RFC1123Z) + "\r\n" +
		"Message-ID: " + m.ID + "\r\n" +
		"\r\n" +
		"Someone mentioned @all in a channel.\r\n" +
		".A line that starts with a dot, to be dot-stuffed.\r\n")
}

// Stages of the conversation, where a mailResult says it ended.
const (
	stageConnect   = "connect"
	stageGreeting  = "greeting"
	stageEHLO      = "EHLO"
	stageMAIL      = "MAIL"
	stageRCPT      = "RCPT"
	stageDATA      = "DATA"
	stageEndOfData = "end of data"
)

// mailResult is what one client connection saw.
type mailResult struct {
	Msg        testMessage
	Stage      string        // where the conversation ended
	Code       int           // the last reply's code; 0 when no reply came
	Reply      string        // the last reply's text
	Err        error         // the connection error or timeout that came instead of a reply
	DotToReply time.Duration // from sending the final dot to reading its reply
	Start, End time.Time
}

// Accepted reports whether the client was told 250 at the end of DATA.
func (r mailResult) Accepted() bool { return r.Stage == stageEndOfData && r.Code == 250 }

// NoReply reports whether the client got no reply where one was due: a
// dropped connection or a hang cut by the deadline.
func (r mailResult) NoReply() bool { return r.Err != nil }

func (r mailResult) String() string {
	if r.Err != nil {
		return fmt.Sprintf("%s: no reply at %s: %v", r.Msg.ID, r.Stage, r.Err)
	}
	return fmt.Sprintf("%s: %d at %s: %s", r.Msg.ID, r.Code, r.Stage, r.Reply)
}

type sendOptions struct {
	// Timeout bounds the whole conversation; default 60 s.
	Timeout time.Duration
	// OnGreeting, if set, is called once the greeting was read (code 0 if
	// none came), before EHLO. It may block, to hold the client there.
	OnGreeting func(code int)
}

// sendMail sends m over a new connection to addr, as the chat server does.
func sendMail(addr string, m testMessage, opts sendOptions) (r mailResult) {
	if opts.Timeout == 0 {
		opts.Timeout = 60 * time.Second
	}
	r.Msg, r.Start = m, time.Now()
	defer func() { r.End = time.Now() }()
	deadline := r.Start.Add(opts.Timeout)

	r.Stage = stageConnect
	conn, err := net.DialTimeout("tcp", addr, opts.Timeout)
	if err != nil {
		r.Err = err
		if opts.OnGreeting != nil {
			opts.OnGreeting(0)
		}
		return r
	}
	defer conn.Close()
	conn.SetDeadline(deadline)
	tp := textproto.NewConn(conn)

	// step sends a command (none for the greeting) and reads the reply.
	step := func(stage string, want int, cmd string) bool {
		r.Stage = stage
		if cmd != "" {
			if err := tp.PrintfLine("%s", cmd); err != nil {
				r.Err = err
				return false
			}
		}
		r.Code, r.Reply, r.Err = tp.ReadResponse(0)
		return r.Err == nil && r.Code == want
	}
	quit := func() {
		conn.SetDeadline(time.Now().Add(2 * time.Second))
		if tp.PrintfLine("QUIT") == nil {
			tp.ReadResponse(0)
		}
	}

	ok := step(stageGreeting, 220, "")
	if opts.OnGreeting != nil {
		opts.OnGreeting(r.Code)
	}
	if !ok {
		return r
	}
	if !step(stageEHLO, 250, "EHLO chat.e2e.test") ||
		!step(stageMAIL, 250, "MAIL FROM:<"+m.From+">") ||
		!step(stageRCPT, 250, "RCPT TO:<"+m.To+">") ||
		!step(stageDATA, 354, "DATA") {
		if r.Err == nil {
			quit()
		}
		return r
	}
	r.Stage = stageEndOfData
	w := tp.DotWriter()
	if _, err := w.Write(m.Bytes()); err != nil {
		r.Err = err
		return r
	}
	sent := time.Now()
	if err := w.Close(); err != nil { // writes the final dot and flushes
		r.Err = err
		return r
	}
	r.Code, r.Reply, r.Err = tp.ReadResponse(0)
	r.DotToReply = time.Since(sent)
	if r.Err == nil {
		quit()
	}
	return r
}

type burstOptions struct {
	// Spacing starts one client every Spacing; zero starts all at once.
	Spacing time.Duration
	// SyncGreeting holds every client after its greeting until all clients
	// have one, so that all connections are open at the same time.
	SyncGreeting bool
	// Timeout bounds each client's conversation; default 60 s.
	Timeout time.Duration
}

// sendBurst sends every message over its own connection, concurrently, and
// returns the results in the order of msgs.
func sendBurst(addr string, msgs []testMessage, o burstOptions) []mailResult {
	results := make([]mailResult, len(msgs))
	var greeted, done sync.WaitGroup
	release := make(chan struct{})
	opts := sendOptions{Timeout: o.Timeout}
	if o.SyncGreeting {
		greeted.Add(len(msgs))
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
			results[i] = sendMail(addr, m, opts)
		}()
	}
	done.Wait()
	return results
}

// count returns how many results satisfy f.
func count(rs []mailResult, f func(mailResult) bool) int {
	n := 0
	for _, r := range rs {
		if f(r) {
			n++
		}
	}
	return n
}

// tally sums results up by where they ended and how, such as
// "end of data 250: 240, greeting 421: 20".
func tally(rs []mailResult) string {
	counts := map[string]int{}
	for _, r := range rs {
		key := fmt.Sprintf("%s %d", r.Stage, r.Code)
		if r.Err != nil {
			key = r.Stage + " no reply"
			if ne, ok := r.Err.(net.Error); ok && ne.Timeout() {
				key = r.Stage + " timeout"
			}
		}
		counts[key]++
	}
	keys := make([]string, 0, len(counts))
	for k := range counts {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s: %d", k, counts[k])
	}
	return strings.Join(parts, ", ")
}

// examples returns up to n results that satisfy f, one per line, for
// failure messages.
func examples(rs []mailResult, n int, f func(mailResult) bool) string {
	var lines []string
	for _, r := range rs {
		if f(r) && len(lines) < n {
			lines = append(lines, "  "+r.String())
		}
	}
	return strings.Join(lines, "\n")
}
