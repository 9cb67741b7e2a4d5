package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"os"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"go.uber.org/goleak"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/internal/rawsmtp"
	"github.com/smtppool/smtppool/pool"
	"github.com/smtppool/smtppool/proxy"
)

// FuzzClientStream writes arbitrary bytes, as a client, into a fresh
// smtppool in front of a fresh memsmtp upstream, reads every reply to the
// end, and checks what the client was told against what the upstream
// stored:
//
//   - no panic: no "421 4.0.0 Internal server error" (go-smtp's answer to a
//     recovered panic) and no panic in either server's error log, but for
//     a known race in go-smtp (see unknownPanics);
//   - every reply is well formed, and the conversation ends within
//     fuzzConversationTimeout;
//   - no stranded session: once the client's connection has ended, the
//     pool has no acquired session (a bounded poll), and pool.Close returns;
//   - the delivery promise, message by message where the replies can be
//     attributed (see attribute and checkPromise): every message answered
//     250 has a stored copy, equal to the message the client sent, and no
//     stored message was answered only with a 5xx; and globally in any
//     case: no more 250 "OK: queued" replies than stored messages, and
//     exactly as many when no fault makes the upstream keep a message
//     without saying 250;
//   - no goroutine outlives the input (goleak, once everything is closed).
//
// Each input gets its own upstream, pool and server (a millisecond or two),
// so that the faults queued for one input and the messages stored by it
// cannot spill into the next, and goleak sees what one input left behind.
//
// faults picks upstream faults, one a byte (see fuzzFaults), queued in
// memsmtp before the client connects. (A []byte rather than an integer:
// Go's mutator changes an integer by at most 100 at a time, a byte slice
// byte by byte, so faults combine.) The client writes the whole stream at
// once (pipelining everything), then closes its side of the connection:
// at once if hangUp is set, so that smtppool meets a client that leaves
// while it relays; otherwise once every line of the stream has been
// answered, as a patient pipelining client would. (smtppool takes a
// client that closes its side for gone, and fails its transaction.)
func FuzzClientStream(f *testing.F) {
	for _, s := range clientStreamSeeds() {
		f.Add(s.faults, s.hangUp, []byte(s.stream))
	}
	f.Fuzz(func(t *testing.T, faults []byte, hangUp bool, stream []byte) {
		checkClientStream(t, faults, hangUp, stream)
	})
}

// Limits of the fuzzed smtppool, small so that short inputs reach them.
const (
	fuzzMaxMessageBytes = 4096
	fuzzMaxRecipients   = 3
	// fuzzConversationTimeout bounds one input's conversation.
	fuzzConversationTimeout = 10 * time.Second
	// fuzzSettleTimeout bounds the wait for the pool to get every session
	// back after the client's connection ended.
	fuzzSettleTimeout = 5 * time.Second
)

// checkClientStream runs one input; see FuzzClientStream.
func checkClientStream(t *testing.T, faults []byte, hangUp bool, stream []byte) {
	leaks := goleak.IgnoreCurrent()
	began := time.Now()
	e, strict := startFuzzEnv(t, faults)
	stranded := false
	defer func() {
		if !stranded {
			e.close() // after a failure
		}
	}()

	raw, readErr := converse(e.addr, stream, hangUp)
	replies, malformed := parseReplies(raw, readErr == nil)
	if malformed != "" {
		e.fail(t, stream, raw, "malformed reply: %s", malformed)
	}
	if errors.Is(readErr, errDeadline) {
		e.fail(t, stream, raw, "the conversation did not end within %v", fuzzConversationTimeout)
	}
	for _, r := range replies {
		if r.internalError() {
			e.fail(t, stream, raw, "panic: the client got %q", r.last())
		}
	}

	if !e.settle() {
		// Leave the pool open: Close would wait for ever.
		stranded = true
		e.fail(t, stream, raw, "stranded session: %d upstream sessions still acquired %v after the client left\n%s",
			e.pool.Stat().AcquiredConns, fuzzSettleTimeout, goroutines())
	}
	if !e.close() {
		stranded = true
		e.fail(t, stream, raw, "pool.Close did not return within %v: a session was acquired after the client left\n%s",
			fuzzSettleTimeout, goroutines())
	}
	if panics := unknownPanics(e.errLog.String()); panics != "" {
		e.fail(t, stream, raw, "a server logged a panic:\n%s", panics)
	}

	stored := e.up.Messages()
	a := attribute(stream, replies)
	if a.exact && a.pending {
		// After the end of the input every line gets a reply, unless
		// replies were lost with a reset.
		a.exact, a.why = false, "replies missing"
	}
	problems := checkPromise(a, replies, stored, strict && readErr == nil)
	recordStats(a, replies, stored, hangUp, readErr, time.Since(began), stream)
	if len(problems) > 0 {
		e.fail(t, stream, raw, "delivery promise broken (faults %x, hang-up %v, read error %v, %s):\n  %s\nstored: %s",
			faults, hangUp, readErr, a.summary(), strings.Join(problems, "\n  "), describeStored(stored))
	}
	goleak.VerifyNone(t, leaks)
}

// recordStats appends a line about the input to the file named by
// $SMTPPOOL_FUZZ_STATS, if set: how often the checker can attribute
// replies, and how many messages get through, tell whether the fuzzer is
// testing the promise or only the refusals.
func recordStats(a attribution, replies []fuzzReply, stored []memsmtp.Message, hangUp bool, readErr error, took time.Duration, stream []byte) {
	name := os.Getenv("SMTPPOOL_FUZZ_STATS")
	if name == "" {
		return
	}
	queued := 0
	for _, r := range replies {
		if r.queued() {
			queued++
		}
	}
	f, err := os.OpenFile(name, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "exact=%v messages=%d queued=%d stored=%d hangup=%v readerr=%v ms=%d why=%q\n",
		a.exact, len(a.messages), queued, len(stored), hangUp, readErr != nil, took.Milliseconds(), a.why)
	if took > 500*time.Millisecond {
		fmt.Fprintf(f, "slow: %q\n", stream)
	}
}

// fuzzEnv is one input's upstream, pool and smtppool.
type fuzzEnv struct {
	up     *memsmtp.Server
	pool   *pool.Pool
	srv    *smtp.Server
	cancel context.CancelFunc
	served chan struct{}
	closed bool
	addr   string
	errLog *lockedBuffer // both servers' error logs
	log    *lockedBuffer // smtppool's own log, at debug level
}

// startFuzzEnv starts an upstream with the faults queued, a pool and a
// smtppool listening on 127.0.0.1:0. strict reports that no fault lets the
// upstream store a message without answering 250 for it.
func startFuzzEnv(t *testing.T, faults []byte) (e *fuzzEnv, strict bool) {
	e = &fuzzEnv{errLog: &lockedBuffer{}, log: &lockedBuffer{}, served: make(chan struct{})}
	up, err := memsmtp.Start(memsmtp.Options{ErrorLog: log.New(e.errLog, "upstream: ", 0)})
	if err != nil {
		t.Fatal(err)
	}
	e.up = up
	strict = true
	for _, fault := range fuzzFaults(faults) {
		up.Inject(fault.cmd, fault.Fault)
		if fault.Deliver {
			strict = false
		}
	}
	e.pool, err = pool.New(pool.Config{
		Addr:            up.Addr,
		TLS:             pool.TLSNone,
		MaxConns:        2,
		ProbeBackoff:    time.Millisecond,
		ProbeBackoffMax: 2 * time.Millisecond,
		ConnectTimeout:  2 * time.Second,
		CommandTimeout:  2 * time.Second,
		DataTimeout:     2 * time.Second,
		Dial:            dialAbortive,
	})
	if err != nil {
		t.Fatal(err)
	}
	var ctx context.Context
	ctx, e.cancel = context.WithCancel(context.Background())
	e.srv = proxy.NewServer(ctx, e.pool, proxy.Config{
		MaxMessageBytes:    fuzzMaxMessageBytes,
		MaxRecipients:      fuzzMaxRecipients,
		AcquireTimeout:     2 * time.Second,
		RetryTimeout:       2 * time.Second,
		RetryBackoff:       time.Millisecond,
		RetryBackoffMax:    2 * time.Millisecond,
		TransactionTimeout: 30 * time.Second,
		ClientTimeout:      fuzzConversationTimeout,
		Logger:             slog.New(slog.NewTextHandler(e.log, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	e.srv.ErrorLog = log.New(e.errLog, "smtppool: ", 0)
	ln, err := proxy.Listen(ctx, "127.0.0.1:0", proxy.ListenConfig{})
	if err != nil {
		t.Fatal(err)
	}
	e.addr = ln.Addr().String()
	go func() {
		defer close(e.served)
		e.srv.Serve(ln)
	}()
	return e, strict
}

// settle waits, a bounded time, for the pool to have every session back.
func (e *fuzzEnv) settle() bool {
	deadline := time.Now().Add(fuzzSettleTimeout)
	for e.pool.Stat().AcquiredConns != 0 {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(time.Millisecond)
	}
	return true
}

// close stops smtppool, the pool and the upstream; it reports false if
// pool.Close, which waits for acquired sessions, did not return in time.
func (e *fuzzEnv) close() bool {
	if e.closed {
		return true
	}
	e.closed = true
	e.srv.Close()
	<-e.served
	e.cancel()
	closed := make(chan struct{})
	go func() {
		e.pool.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(fuzzSettleTimeout):
		return false
	}
	e.up.Close()
	return true
}

// fail reports a broken check with what it takes to reproduce and debug it.
func (e *fuzzEnv) fail(t *testing.T, stream, raw []byte, format string, args ...any) {
	t.Helper()
	t.Fatalf("%s\nclient sent %q\nclient got %q\nsmtppool log:\n%s", fmt.Sprintf(format, args...), stream, raw, e.log.String())
}

// fuzzFault is a memsmtp fault and where it applies.
type fuzzFault struct {
	cmd memsmtp.Command
	memsmtp.Fault
}

// maxFuzzFaults bounds the faults of an input.
const maxFuzzFaults = 6

// fuzzFaults decodes up to maxFuzzFaults faults, one a byte, queued in
// order at their commands; a zero byte is none. The low two bits of a byte
// pick the command (BANNER, MAIL, RCPT, DATA), the next three the fault
// (451, 421, 550, 452, drop, at DATA the message kept and the connection
// dropped, at DATA the message kept and 451, 554); the top three are
// ignored. None has a delay, so an input stays fast and leaves no
// goroutine asleep.
func fuzzFaults(faults []byte) []fuzzFault {
	commands := [4]memsmtp.Command{memsmtp.Banner, memsmtp.Mail, memsmtp.Rcpt, memsmtp.Data}
	var out []fuzzFault
	for _, b := range faults[:min(len(faults), maxFuzzFaults)] {
		if b == 0 {
			continue
		}
		cmd := commands[b&3]
		var f memsmtp.Fault
		switch b >> 2 & 7 {
		case 0:
			f.Reply = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "fault: try again"}
		case 1:
			f.Reply = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "fault: closing"}
		case 2:
			f.Reply = &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "fault: refused"}
		case 3:
			f.Reply = &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 5, 3}, Message: "fault: too many"}
		case 4:
			f.Drop = true
		case 5: // the message kept, the reply lost
			f.Drop, f.Deliver = true, cmd == memsmtp.Data
		case 6: // the message kept, and 451 for it
			f.Reply = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "fault: kept, try again"}
			f.Deliver = cmd == memsmtp.Data
		case 7:
			f.Reply = &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 0}, Message: "fault: message refused"}
		}
		out = append(out, fuzzFault{cmd, f})
	}
	return out
}

// faultByte encodes one fault byte for fuzzFaults: cmd 0–3 is BANNER, MAIL,
// RCPT, DATA; kind 0–7 as in fuzzFaults.
func faultByte(cmd, kind int) byte { return byte(kind<<2 | cmd) }

// faultList lists fault bytes, the first applied first at its command.
func faultList(faults ...byte) []byte { return faults }

var errDeadline = errors.New("conversation deadline")

// dialAbortive dials a TCP connection that ends with a reset rather than
// in TIME_WAIT: a fuzzer opens thousands of connections a second, and
// TIME_WAIT would hold every ephemeral port within a minute.
func dialAbortive(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	c.(*net.TCPConn).SetLinger(0)
	return c, nil
}

// converse connects to addr and writes stream. It closes its side of the
// connection at once if hangUp is set; otherwise once attribute finds
// every line of the stream answered (or the server waiting for more
// input, or the model lost). It reads every reply until the server closes
// the connection. readErr is nil for a clean end; after a reset (the
// server closed with input unread) replies may have been lost.
func converse(addr string, stream []byte, hangUp bool) (raw []byte, readErr error) {
	ctx, cancel := context.WithTimeout(context.Background(), fuzzConversationTimeout)
	defer cancel()
	conn, err := dialAbortive(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(fuzzConversationTimeout))
	hangingUp, finished, wrote := make(chan struct{}), make(chan struct{}), make(chan struct{})
	var once sync.Once
	hangUpNow := func() { once.Do(func() { close(hangingUp) }) }
	if hangUp {
		hangUpNow()
	}
	go func() {
		defer close(wrote)
		if _, err := conn.Write(stream); err != nil {
			return
		}
		select {
		case <-hangingUp:
			conn.(*net.TCPConn).CloseWrite()
		case <-finished:
		}
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := conn.Read(buf)
		raw = append(raw, buf[:n]...)
		if err != nil {
			if err != io.EOF {
				readErr = err
			}
			break
		}
		if replies, malformed := parseReplies(raw, false); malformed != "" {
			hangUpNow()
		} else if a := attribute(stream, replies); !a.exact || !a.pending || a.incomplete {
			hangUpNow()
		}
	}
	close(finished)
	var netErr net.Error
	if errors.As(readErr, &netErr) && netErr.Timeout() {
		readErr = errDeadline
	}
	conn.Close() // stops a write the server no longer reads
	<-wrote
	return raw, readErr
}

// fuzzReply is one SMTP reply: its code and lines, without the code.
type fuzzReply struct {
	code  int
	lines []string // "2.0.0 OK: queued"
}

func (r fuzzReply) last() string { return strconv.Itoa(r.code) + " " + r.lines[len(r.lines)-1] }

// is reports whether r is exactly the one-line reply "code text".
func (r fuzzReply) is(code int, text string) bool {
	return r.code == code && len(r.lines) == 1 && r.lines[0] == text
}

// queued is the upstream's acceptance of a message, passed on by smtppool.
func (r fuzzReply) queued() bool { return r.is(250, "2.0.0 OK: queued") }

// internalError is go-smtp's answer to a panic it recovered.
func (r fuzzReply) internalError() bool { return r.is(421, "4.0.0 Internal server error") }

// parseReplies splits raw into replies. A reply that is not well formed
// is reported, except for a trailing fragment when the read ended with an
// error (a reset can cut a reply short).
func parseReplies(raw []byte, clean bool) (replies []fuzzReply, malformed string) {
	var cur *fuzzReply
	for len(raw) > 0 {
		end := bytes.Index(raw, []byte("\r\n"))
		if end < 0 {
			if clean {
				return replies, fmt.Sprintf("unterminated line %q", raw)
			}
			return replies, ""
		}
		line := string(raw[:end])
		raw = raw[end+2:]
		if len(line) < 4 || (line[3] != ' ' && line[3] != '-') || strings.Trim(line[:3], "0123456789") != "" || line[0] == '0' {
			return replies, fmt.Sprintf("line %q", line)
		}
		code, _ := strconv.Atoi(line[:3])
		if cur == nil {
			cur = &fuzzReply{code: code}
		} else if cur.code != code {
			return replies, fmt.Sprintf("line %q continues a %d reply", line, cur.code)
		}
		cur.lines = append(cur.lines, line[4:])
		if line[3] == ' ' {
			replies = append(replies, *cur)
			cur = nil
		}
	}
	if cur != nil && clean {
		return replies, fmt.Sprintf("reply %d cut short", cur.code)
	}
	return replies, ""
}

// sentMessage is a message the client sent, as smtppool read it, and the
// reply that answered it.
type sentMessage struct {
	offset int    // where its DATA or first BDAT command starts in the stream
	body   []byte // as go-smtp hands it to the backend
	id     string // its Message-ID, "" if none
	// final is its final reply: to the end of DATA, to BDAT LAST or to the
	// chunk that failed. nil: none came (the connection ended, or RSET,
	// EHLO or the end of the connection aborted a BDAT transfer).
	final *fuzzReply
}

// attribution is what attribute makes of a conversation, or of its
// beginning.
type attribution struct {
	messages []sentMessage
	// exact is unset when the model of go-smtp's server lost track: a
	// reply it could not have given, or a reply with no input left.
	exact bool
	why   string // why not exact
	// ended is set when the server closed the connection after its last
	// reply (QUIT, too many errors, a read error, a panic): it read no more.
	ended bool
	// pending is set when the replies ran out before the input: a reply is
	// still to come, or was lost. incomplete says that the server cannot
	// answer before it reads more, or the end of the input: the input ends
	// in the middle of a line, of a DATA message or of a BDAT chunk.
	pending, incomplete bool
}

func (a *attribution) summary() string {
	if !a.exact {
		return fmt.Sprintf("attribution inexact: %s", a.why)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d messages attributed:", len(a.messages))
	for _, m := range a.messages {
		final := "no reply"
		if m.final != nil {
			final = m.final.last()
		}
		fmt.Fprintf(&b, " [@%d %q: %s]", m.offset, m.id, final)
	}
	return b.String()
}

// attribute follows a conversation, or its beginning, with a model of
// go-smtp's server, to learn which reply answered which message.
//
// Reply attribution. go-smtp answers each command line with exactly one
// reply, in order (PIPELINING changes nothing on the server side), and
// reads nothing but command lines except:
//   - after a 354 (only DATA gets one), the message up to CRLF.CRLF, which
//     gets exactly one reply, the message's final reply: so the reply after
//     a 354 answers the message that follows it, whatever the rest of the
//     stream looks like;
//   - after BDAT with a well-formed size, that many bytes (even when the
//     command is refused), then one reply: "250 2.0.0 Continue" for a
//     chunk that is not the last, the final reply for a LAST chunk or for
//     a chunk that ended the transfer with an error;
//   - after a 334 (AUTH), one line of response, then another reply.
//
// So the model splits the stream into lines as textproto does, parses
// each as go-smtp's parseCmd does, and takes the next reply as its answer.
// The replies themselves say whether a message follows (354) and whether
// a BDAT transfer goes on (Continue) or ended, so the model need not
// predict smtppool's verdicts, only go-smtp's framing. It checks every
// prediction it can make (354 and Continue only for DATA and BDAT, 221
// exactly for QUIT, 501 exactly for a malformed BDAT, no reply without
// input to answer); a mismatch means that the model lost track, and the
// attribution is inexact: the checker then falls back to global checks.
// Replies after which go-smtp closes the connection end the model: the
// server reads nothing after them. A line too long for go-smtp (2000
// bytes) cuts the server's input where TCP happened to split it; the
// server answers what it got, then closes with "Too long line" (or fails
// the message being read): the replies so far remain attributable.
func attribute(stream []byte, replies []fuzzReply) (a attribution) {
	a.exact = true
	inexact := func(format string, args ...any) attribution {
		a.exact, a.why = false, fmt.Sprintf(format, args...)
		return a
	}
	next := func() (fuzzReply, bool) {
		if len(replies) == 0 {
			return fuzzReply{}, false
		}
		r := replies[0]
		replies = replies[1:]
		return r, true
	}
	pos := 0
	// readLine takes a line as textproto does; complete is false for a
	// line the input ends in the middle of.
	readLine := func() (line string, complete bool) {
		rest := stream[pos:]
		n := bytes.IndexByte(rest, '\n') + 1
		if n == 0 {
			n = len(rest)
		}
		pos += n
		return strings.TrimRight(string(rest[:n]), "\r\n"), n > 0 && rest[n-1] == '\n'
	}
	pend := func(complete bool) attribution {
		a.pending, a.incomplete = true, !complete
		return a
	}
	// ended checks that nothing follows the reply after which the server
	// closed the connection.
	ended := func(last fuzzReply) attribution {
		if len(replies) > 0 {
			return inexact("reply %q after %q, which closes the connection", replies[0].last(), last.last())
		}
		a.ended = true
		return a
	}

	var bdat *sentMessage // a BDAT transfer in progress
	endBDAT := func(final *fuzzReply) {
		if bdat != nil {
			bdat.id, bdat.final = messageID(bdat.body), final
			a.messages = append(a.messages, *bdat)
			bdat = nil
		}
	}
	defer endBDAT(nil) // the connection ended in the middle of a transfer

	if r, ok := next(); !ok {
		return pend(true)
	} else if r.code != 220 {
		return inexact("greeting %q", r.last())
	}
	for {
		if len(replies) > 0 {
			if r := replies[0]; r.is(500, "5.4.0 Too long line, closing connection") ||
				r.is(421, "4.4.2 Idle timeout, bye bye") || r.is(421, "4.4.0 Connection error, sorry") {
				// A read error, answered before a line is parsed.
				next()
				return ended(r)
			}
		}
		if pos >= len(stream) {
			if len(replies) > 0 {
				return inexact("reply %q with no input left", replies[0].last())
			}
			return a
		}
		start := pos
		line, complete := readLine()
		cmd, arg, parseErr := parseCmd(line)
		var chunk []byte // BDAT's
		size, last, bdatOK := rawsmtp.ParseBDAT(arg)
		bdatOK = bdatOK && cmd == "BDAT" && parseErr == nil
		if bdatOK {
			chunk = stream[pos:min(len(stream), pos+size)]
			pos += len(chunk)
			complete = complete && len(chunk) == size
		}
		r, ok := next()
		if !ok {
			return pend(complete)
		}

		switch {
		case r.code == 354:
			if cmd != "DATA" || arg != "" || parseErr != nil || bdat != nil {
				return inexact("354 for %q", line)
			}
			m := sentMessage{offset: start}
			var n int
			m.body, n, complete = readDataBody(stream[pos:])
			pos += n
			m.id = messageID(m.body)
			f, ok := next()
			if !ok {
				a.messages = append(a.messages, m)
				return pend(complete)
			}
			m.final = &f
			a.messages = append(a.messages, m)
			r = f
		case r.code == 334:
			// AUTH: each 334 is followed by a line of response and
			// another reply.
			for r.code == 334 && pos < len(stream) {
				_, complete := readLine()
				if r, ok = next(); !ok {
					return pend(complete)
				}
			}
		case cmd == "QUIT" && parseErr == nil:
			if r.code != 221 {
				return inexact("%q for QUIT", r.last())
			}
			return ended(r)
		case r.code == 221:
			return inexact("221 for %q", line)
		case cmd == "STARTTLS" && r.code == 220:
			return inexact("STARTTLS accepted: TLS cannot be followed")
		case cmd == "BDAT" && parseErr == nil && !bdatOK:
			if r.code != 501 {
				return inexact("%q for malformed %q, want 501", r.last(), line)
			}
		case bdatOK:
			if r.code == 501 && strings.HasPrefix(r.lines[0], "5.5.4 ") {
				return inexact("%q for well-formed %q", r.last(), line)
			}
			if bdat == nil {
				bdat = &sentMessage{offset: start}
			}
			bdat.body = append(bdat.body, chunk...)
			if r.is(250, "2.0.0 Continue") {
				if last {
					return inexact("Continue for %q", line)
				}
				break
			}
			endBDAT(&r)
		case r.is(250, "2.0.0 Continue"):
			return inexact("Continue for %q", line)
		case r.is(250, "2.0.0 Session reset") || (r.code == 250 && (cmd == "EHLO" || cmd == "HELO") && parseErr == nil):
			// RSET, and EHLO or HELO once there is a session, reset the
			// connection: a BDAT transfer in progress is abandoned.
			endBDAT(nil)
		}
		// go-smtp closes the connection after a panic, and after the reply
		// to one error too many.
		if r.internalError() {
			return ended(r)
		}
		if len(replies) > 0 && replies[0].is(500, "5.5.1 Too many errors. Quiting now") {
			r, _ := next()
			return ended(r)
		}
	}
}

// parseCmd is go-smtp's command line parser (parse.go, v0.25.1), which the
// model follows.
func parseCmd(line string) (cmd string, arg string, err error) {
	line = strings.TrimRight(line, "\r\n")
	l := len(line)
	switch {
	case strings.HasPrefix(strings.ToUpper(line), "STARTTLS"):
		return "STARTTLS", "", nil
	case l == 0:
		return "", "", nil
	case l < 4:
		return "", "", errors.New("command too short")
	case l == 4:
		return strings.ToUpper(line), "", nil
	case l == 5:
		return "", "", errors.New("mangled command")
	}
	if line[4] != ' ' {
		return "", "", errors.New("mangled command")
	}
	return strings.ToUpper(line[0:4]), strings.TrimSpace(line[5:]), nil
}

// readDataBody reads a DATA message from b as go-smtp's dataReader does:
// up to the line ".", dots at the start of lines removed, CRLF kept. It
// returns the message, the bytes of b it took, and whether it found the
// end of the message.
func readDataBody(b []byte) (body []byte, n int, complete bool) {
	const (
		stateBeginLine = iota
		stateDot
		stateDotCR
		stateCR
		stateData
		stateEOF
	)
	state := stateBeginLine
	for n < len(b) && state != stateEOF {
		c := b[n]
		n++
		switch state {
		case stateBeginLine:
			if c == '.' {
				state = stateDot
				continue
			}
			if c == '\r' {
				state = stateCR
				break
			}
			state = stateData
		case stateDot:
			if c == '\r' {
				state = stateDotCR
				continue
			}
			state = stateData
		case stateDotCR:
			if c == '\n' {
				state = stateEOF
				continue
			}
			state = stateData
		case stateCR:
			if c == '\n' {
				state = stateBeginLine
				break
			}
			state = stateData
		case stateData:
			if c == '\r' {
				state = stateCR
			}
		}
		body = append(body, c)
	}
	return body, n, state == stateEOF
}

// messageIDPattern finds a Message-ID. Its value has no CR or LF, so a
// message has the same Message-IDs before and after smtppool and go-smtp
// normalise its line ends.
var messageIDPattern = regexp.MustCompile(`(?i)message-id:[ \t]*<([^<>\s]*)>`)

// messageID returns the first Message-ID in a message, or "".
func messageID(body []byte) string {
	if m := messageIDPattern.FindSubmatch(body); m != nil {
		return string(m[1])
	}
	return ""
}

// relayed returns a message as the upstream stores it after smtppool
// relays it: bare CR and bare LF become CRLF, and the message ends with a
// line end.
func relayed(body []byte) []byte {
	var out []byte
	for i, c := range body {
		switch {
		case c == '\r' && (i+1 == len(body) || body[i+1] != '\n'):
			out = append(out, '\r', '\n')
		case c == '\n' && (i == 0 || body[i-1] != '\r'):
			out = append(out, '\r', '\n')
		default:
			out = append(out, c)
		}
	}
	if !bytes.HasSuffix(out, []byte("\r\n")) {
		out = append(out, '\r', '\n')
	}
	return out
}

// checkPromise checks the delivery promise: what the client was told
// against what the upstream stored, and returns what it finds broken.
// strict says that the upstream stored no message without answering 250
// for it, and that every reply was read.
//
// Globally, with or without attribution: every "250 2.0.0 OK: queued" (the
// upstream's acceptance, passed on) is one acceptance, so there are at
// most as many as stored messages; when strict, exactly as many (a stored
// message the client was not told 250 for would be one it may have been
// told 5xx for).
//
// Per message, when the attribution is exact, grouped by Message-ID
// (mutations may give two messages the same one, or none, which is ""):
// every OK: queued answers a message; each Message-ID has at least as many
// stored copies as 250s; every stored copy has the Message-ID of a message
// the client sent that was not answered with a 5xx (answered 250 or 4xx,
// or not at all), and equals that message as smtppool relays it (see
// relayed); when strict, no Message-ID has more copies than 250s plus
// messages left without a final reply.
func checkPromise(a attribution, replies []fuzzReply, stored []memsmtp.Message, strict bool) []string {
	var problems []string
	queued := 0
	for _, r := range replies {
		if r.queued() {
			queued++
		}
	}
	// Global checks, which need no attribution: each 250 for a message is
	// one acceptance by the upstream.
	if queued > len(stored) {
		problems = append(problems, fmt.Sprintf("%d messages acknowledged with 250, only %d stored upstream", queued, len(stored)))
	}
	if strict && queued != len(stored) {
		problems = append(problems, fmt.Sprintf("%d messages stored upstream but %d acknowledged with 250, with no fault that keeps a message unacknowledged",
			len(stored), queued))
	}
	if !a.exact {
		return problems
	}

	// Per message.
	type tally struct {
		acked, refused, other int
		bodies                [][]byte // what the client sent, under this Message-ID, not refused
	}
	byID := map[string]*tally{}
	get := func(id string) *tally {
		if byID[id] == nil {
			byID[id] = &tally{}
		}
		return byID[id]
	}
	attributedQueued := 0
	for _, m := range a.messages {
		t := get(m.id)
		switch {
		case m.final == nil:
			t.other++
		case m.final.code >= 500:
			t.refused++
			continue
		case m.final.code == 250:
			t.acked++
			if m.final.queued() {
				attributedQueued++
			}
		case m.final.code >= 200 && m.final.code < 400:
			problems = append(problems, fmt.Sprintf("message at byte %d answered %q", m.offset, m.final.last()))
		default:
			t.other++
		}
		t.bodies = append(t.bodies, relayed(m.body))
	}
	if attributedQueued != queued {
		problems = append(problems, fmt.Sprintf("%d replies say OK: queued, %d of them to a message", queued, attributedQueued))
	}
	storedByID := map[string]int{}
	for _, s := range stored {
		id := messageID(s.Data)
		storedByID[id]++
		t := get(id)
		if len(t.bodies) == 0 {
			what := "not sent by the client"
			if t.refused > 0 {
				what = "answered only with a 5xx"
			}
			problems = append(problems, fmt.Sprintf("stored message <%s> was %s", id, what))
			continue
		}
		found := false
		for _, b := range t.bodies {
			found = found || bytes.Equal(b, s.Data)
		}
		if !found {
			problems = append(problems, fmt.Sprintf("stored message <%s> %q differs from every message the client sent with that Message-ID %q", id, s.Data, t.bodies))
		}
	}
	for id, t := range byID {
		n := storedByID[id]
		if n < t.acked {
			problems = append(problems, fmt.Sprintf("<%s> acknowledged %d times with 250, stored %d times", id, t.acked, n))
		}
		if strict && n > t.acked+t.other {
			problems = append(problems, fmt.Sprintf("<%s> stored %d times, acknowledged %d times, unanswered %d times", id, n, t.acked, t.other))
		}
	}
	return problems
}

func describeStored(stored []memsmtp.Message) string {
	var b strings.Builder
	for _, m := range stored {
		fmt.Fprintf(&b, "\n  conn %d from %q to %q: %q", m.Conn, m.From, m.To, m.Data)
	}
	return b.String()
}

// unknownPanics returns the panics in a server's error log, but for a
// known race in go-smtp v0.25.1: handleBdat starts a goroutine that calls
// c.Session().Data, and a connection closed (QUIT, or the client leaving)
// right after a BDAT chunk that is not the last sets the session to nil
// first. go-smtp recovers that panic, the transfer was aborted anyway, and
// smtppool cannot prevent it.
func unknownPanics(log string) string {
	var unknown []string
	for _, entry := range strings.SplitAfter(log, "panic serving ")[1:] {
		if strings.Contains(entry, "nil pointer dereference") &&
			regexp.MustCompile(`panic\(\{[^\n]*\n[^\n]*\ngithub.com/emersion/go-smtp\.\(\*Conn\)\.handleBdat\.func1\(\)\n\s+\S+/go-smtp@v0\.25\.1/conn\.go:1059 `).MatchString(entry) {
			continue
		}
		unknown = append(unknown, "panic serving "+entry)
	}
	return strings.Join(unknown, "\n")
}

// goroutines returns every goroutine's stack, for a stranded session.
func goroutines() string {
	buf := make([]byte, 1<<20)
	return string(buf[:runtime.Stack(buf, true)])
}

// lockedBuffer is a bytes.Buffer safe for concurrent writers.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// clientStreamSeed is one seed of FuzzClientStream.
type clientStreamSeed struct {
	faults []byte
	hangUp bool
	stream string
}

// clientStreamSeeds are real SMTP dialogues and their usual mistakes, each
// message with a Message-ID of its own, so that the checker can tell them
// apart. Mutations of them reach most of go-smtp's and smtppool's paths.
func clientStreamSeeds() []clientStreamSeed {
	body := func(id string) string {
		return "Message-ID: <" + id + "@fuzz>\r\nSubject: " + id + "\r\n\r\nHello " + id + ".\r\n"
	}
	data := func(id string) string { return "DATA\r\n" + body(id) + ".\r\n" }
	bdat := func(last bool, chunk string) string {
		cmd := "BDAT " + strconv.Itoa(len(chunk))
		if last {
			cmd += " LAST"
		}
		return cmd + "\r\n" + chunk
	}
	const (
		ehlo = "EHLO client.fuzz\r\n"
		mail = "MAIL FROM:<app@example.com>\r\n"
		rcpt = "RCPT TO:<user@example.com>\r\n"
		quit = "QUIT\r\n"
	)
	tx := func(id string) string { return mail + rcpt + data(id) }
	long := strings.Repeat("x", 2100)
	big := strings.Repeat("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\r\n", 70) // > 4096 bytes
	b1 := body("bdat1")

	seeds := []clientStreamSeed{
		// Well-behaved.
		{nil, false, ehlo + tx("plain") + quit},
		{nil, false, "HELO client.fuzz\r\n" + tx("helo") + quit},
		{nil, false, ehlo + tx("one") + tx("two") + "RSET\r\n" + tx("three") + quit},
		{nil, false, ehlo + mail + rcpt + "RCPT TO:<second@example.com>\r\n" + data("tworcpt") + "NOOP\r\n" + quit},
		{nil, false, ehlo + mail + rcpt + bdat(false, b1[:20]) + bdat(true, b1[20:]) + quit},
		{nil, false, ehlo + mail + rcpt + bdat(true, body("bdatone")) + tx("afterbdat") + quit},
		{nil, false, ehlo + mail + rcpt + bdat(false, body("bdatzero")) + "BDAT 0 LAST\r\n" + quit},
		{nil, false, ehlo + "MAIL FROM:<app@example.com> SIZE=100 BODY=8BITMIME\r\n" + rcpt +
			"DATA\r\nMessage-ID: <eight@fuzz>\r\n\r\nh\xc3\xa9llo\r\n.\r\n" + quit},
		{nil, false, ehlo + "MAIL FROM:<j\xc3\xb6rg@example.com> SMTPUTF8\r\n" + "RCPT TO:<\xc3\xbcser@example.com>\r\n" + data("utf8") + quit},
		{nil, false, ehlo + "MAIL FROM:<>\r\n" + rcpt + data("nullsender") + quit},
		{nil, false, ehlo + tx("noquit")},
		// Pipelined in one write, and without line ends or with bare ones.
		{nil, false, ehlo + tx("pipe1") + mail + rcpt + bdat(true, body("pipe2")) + tx("pipe3") + quit},
		{nil, false, strings.ReplaceAll(ehlo+tx("barelf")+quit, "\r\n", "\n")},
		{nil, false, ehlo + mail + rcpt + "DATA\r\nMessage-ID: <smuggle@fuzz>\r\n\r\nhello\n.\nMAIL FROM:<evil@example.com>\nRCPT TO:<victim@example.com>\nDATA\nforged\n.\n\r\n.\r\n" + quit},
		{nil, false, ehlo + mail + rcpt + "DATA\r\nMessage-ID: <barecr@fuzz>\r\n\r\nbefore\r.\rMAIL FROM:<evil@example.com>\rafter\r\n.\r\n" + quit},
		{nil, false, ehlo + mail + rcpt + "DATA\r\nMessage-ID: <dots@fuzz>\r\n\r\n..leading dot\r\n.\r\n" + quit},
		{nil, false, ehlo + mail + rcpt + "DATA\r\nMessage-ID: <nul@fuzz>\r\n\r\nnul\x00byte\r\n.\r\n" + quit},
		{nil, false, ehlo + "MAIL FROM:<a\x00b@example.com>\r\n" + "MAIL FROM:<a\rb@example.com>\r\n" + mail + "RCPT TO:<u\rser@example.com>\r\n" + rcpt + data("ctl") + quit},
		{nil, false, ehlo + mail + rcpt + "DATA\r\n" + body("noend")},
		{nil, false, ehlo + mail + rcpt + "DATA\r\n" + body("lastline") + "."},
		// Out of order.
		{nil, false, ehlo + mail + "MAIL FROM:<second@example.com>\r\n" + rcpt + data("nested") + quit},
		{nil, false, ehlo + mail + data("norcpt") + quit},
		{nil, false, ehlo + data("nomail") + quit},
		{nil, false, tx("nohelo") + ehlo + tx("afterhelo") + quit},
		{nil, false, ehlo + rcpt + "RCPT TO:<a@example.com>\r\n" + quit},
		{nil, false, ehlo + mail + rcpt + "RSET\r\n" + data("afterrset") + quit},
		{nil, false, ehlo + mail + rcpt + bdat(false, body("rsetbdat")) + "RSET\r\n" + tx("rsetbdat2") + quit},
		{nil, false, ehlo + mail + rcpt + bdat(false, body("ehlobdat")) + ehlo + tx("ehlobdat2") + quit},
		{nil, false, ehlo + mail + rcpt + bdat(false, body("databdat")) + data("databdat2") + "BDAT 0 LAST\r\n" + quit},
		{nil, false, ehlo + mail + rcpt + bdat(false, body("mailbdat")) + mail + "BDAT 0 LAST\r\n" + quit},
		{nil, false, ehlo + mail + rcpt + "DATA extra\r\n" + data("dataarg") + quit},
		{nil, false, ehlo + tx("quitfirst") + quit + tx("afterquit")},
		// BDAT with wrong sizes.
		{nil, false, ehlo + mail + rcpt + "BDAT 10 LAST\r\n" + body("toolong") + quit},
		{nil, false, ehlo + mail + rcpt + "BDAT 1000 LAST\r\n" + body("truncated")},
		{nil, false, ehlo + mail + rcpt + "BDAT 1000\r\n" + body("truncated2")},
		{nil, false, ehlo + mail + rcpt + "BDAT 0\r\n" + quit},
		{nil, false, ehlo + mail + rcpt + "BDAT 0 LAST\r\n" + quit},
		{nil, false, ehlo + mail + rcpt + "BDAT\r\nBDAT x\r\nBDAT -1\r\nBDAT 1 2 3\r\nBDAT 5 NOTLAST\r\n" + quit},
		{nil, false, ehlo + mail + rcpt + "BDAT 4294967296 LAST\r\n" + body("overflow") + quit},
		{nil, false, ehlo + "BDAT 30 LAST\r\n" + body("bdatnomail") + quit},
		// Limits: message size, recipients, line length, errors.
		{nil, false, ehlo + mail + rcpt + "DATA\r\nMessage-ID: <big@fuzz>\r\n\r\n" + big + ".\r\n" + tx("afterbig") + quit},
		{nil, false, ehlo + mail + rcpt + bdat(false, "Message-ID: <bigbdat@fuzz>\r\n\r\n"+big) + "BDAT 10 LAST\r\n0123456789" + tx("afterbigbdat") + quit},
		{nil, false, ehlo + mail + "RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nRCPT TO:<d@example.com>\r\n" + data("rcpts") + quit},
		{nil, false, ehlo + "MAIL FROM:<app@example.com> SIZE=999999\r\n" + tx("sizeparam") + quit},
		{nil, false, ehlo + "NOOP " + long + "\r\n" + tx("longcmd") + quit},
		{nil, false, ehlo + mail + rcpt + "DATA\r\nMessage-ID: <longbody@fuzz>\r\n\r\n" + long + "\r\n.\r\n" + tx("afterlong") + quit},
		{nil, false, ehlo + mail + rcpt + bdat(true, "Message-ID: <longbdat@fuzz>\r\n\r\n"+long+"\r\n") + quit},
		{nil, false, ehlo + "FOO\r\nBAR baz\r\n\r\nXY\r\n" + tx("errors") + quit},
		// Other commands.
		{nil, false, ehlo + "AUTH PLAIN AGFwcABzM2NyZXQ=\r\nAUTH LOGIN\r\nYXBw\r\nSTARTTLS\r\nVRFY user\r\nHELP\r\nEXPN list\r\nLHLO x\r\nEHLO\r\n" + tx("misc") + quit},
		{nil, false, "\r\n\x00\xff\r\nEHLO \x00\r\n" + ehlo + tx("garbage") + quit},
		{nil, false, ""},
		{nil, false, "QUIT"},
	}
	// The same dialogues against upstream faults (faultByte(cmd, kind):
	// cmd 0 BANNER, 1 MAIL, 2 RCPT, 3 DATA; kinds as in fuzzFaults).
	faulty := ehlo + tx("f1") + mail + rcpt + bdat(true, body("f2")) + tx("f3") + quit
	for _, faults := range [][]byte{
		faultList(faultByte(3, 0)),                  // DATA 451: retried
		faultList(faultByte(3, 4)),                  // DATA dropped: retried
		faultList(faultByte(3, 7)),                  // DATA 554: passed on
		faultList(faultByte(3, 5)),                  // DATA kept, reply lost: retried, stored twice
		faultList(faultByte(3, 6)),                  // DATA kept, 451: retried, stored twice
		faultList(faultByte(3, 5), faultByte(3, 0)), // DATA kept, reply lost; then 451: retried again
		faultList(faultByte(3, 6), faultByte(3, 4)), // DATA kept, 451; then dropped: retried again
		faultList(faultByte(1, 1), faultByte(2, 0)), // MAIL 421, RCPT 451
		faultList(faultByte(2, 2), faultByte(2, 3)), // RCPT 550, RCPT 452
		faultList(faultByte(1, 4), faultByte(2, 4)), // MAIL and RCPT dropped
		faultList(faultByte(0, 1), faultByte(0, 4)), // banner 421, banner dropped
		faultList(faultByte(0, 2)),                  // banner 550
		faultList(faultByte(1, 2), faultByte(3, 0)), // MAIL 550, DATA 451
		faultList(faultByte(3, 0), faultByte(3, 0), faultByte(3, 4), faultByte(3, 1)),
	} {
		seeds = append(seeds, clientStreamSeed{faults, false, faulty})
	}
	// Clients that leave as soon as they have written everything.
	for _, s := range []string{
		ehlo + tx("leave1") + quit,
		ehlo + tx("leave2") + tx("leave3"),
		ehlo + mail + rcpt + bdat(false, body("leave4")) + "BDAT 0 LAST\r\n",
		ehlo + mail + rcpt + "BDAT 0\r\n",
		ehlo + mail + rcpt + "DATA\r\n" + body("leave5"),
	} {
		seeds = append(seeds, clientStreamSeed{nil, true, s})
	}
	seeds = append(seeds, clientStreamSeed{faultList(faultByte(3, 5), faultByte(3, 4)), true, faulty})
	return seeds
}
