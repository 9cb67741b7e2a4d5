package proxy

import (
	"fmt"
	"strings"
	"testing"

	"github.com/emersion/go-smtp"
)

// classifyCommands are the commands FuzzClassify picks from by index: the
// three relay steps, and "" as transaction.stopped passes it.
var classifyCommands = []command{cmdMail, cmdRcpt, cmdData, ""}

// FuzzClassify feeds classify an upstream reply of any code, enhanced code
// and text, to any command, wrapped as the pool wraps it ("upstream X:
// %w") and, if setup is set, as a failure to set up a session (errSetup).
// Whatever the reply, classify must not panic and must give the client a
// 4xx or 5xx reply of its own (never the caller's error value, never 2xx
// or 3xx), and:
//   - an upstream 5xx is never retried; it reaches the client as it is
//     (each line of its text cut to maxClientText bytes), unless it came
//     from setting up a session (then 451 4.3.5: the operator's to fix);
//   - no line of the client's reply text is longer than maxClientText;
//   - 452 to RCPT, and 452 4.5.3 to anything, are passed on at once;
//   - any other 4xx is retried (421 reaching the client as 451), on the
//     same session only for RCPT;
//   - a 2xx or 3xx is out of sequence and retried on a fresh session, and
//     so is a code outside 200–599, except while setting up a session.
func FuzzClassify(f *testing.F) {
	for _, s := range []struct {
		code       int
		e1, e2, e3 int
		msg        string
		cmd        uint8
		setup      bool
	}{
		{250, 2, 0, 0, "OK", 2, false},
		{354, 0, 0, 0, "Go ahead", 0, false},
		{221, 2, 0, 0, "Bye", 1, false},
		{421, 4, 4, 2, "Idle timeout", 0, false},
		{421, 4, 3, 0, "shutting down", 2, true},
		{450, 4, 2, 1, "mailbox busy", 1, false},
		{451, 4, 3, 0, "try later", 2, false},
		{452, 4, 5, 3, "too many recipients", 0, false},
		{452, 4, 2, 2, "mailbox full", 1, false},
		{452, 4, 3, 1, "insufficient storage", 2, false},
		{454, 4, 7, 0, "TLS not available", 0, true},
		{500, 5, 5, 2, "syntax error", 3, false},
		{530, 5, 7, 0, "Authentication required", 0, false},
		{535, 5, 7, 8, "bad credentials", 0, true},
		{550, 5, 1, 1, "no such user", 1, false},
		{552, 5, 3, 4, "too big", 2, false},
		{554, 5, 7, 1, "rejected", 2, true},
		{599, 5, 9, 9, "", 1, false},
		{600, 6, 0, 0, "out of range", 0, false},
		{0, 0, 0, 0, "", 0, false},
		{-1, -1, -1, -1, "negative", 2, false},
		{199, 1, 9, 9, "preliminary", 0, false},
		{999, 9, 9, 9, "huge", 1, true},
		{4520, 4, 5, 3, "looks like 452", 1, false},
	} {
		f.Add(s.code, s.e1, s.e2, s.e3, s.msg, s.cmd, s.setup)
	}
	f.Fuzz(func(t *testing.T, code, e1, e2, e3 int, msg string, cmdIndex uint8, setup bool) {
		cmd := classifyCommands[int(cmdIndex)%len(classifyCommands)]
		upstream := &smtp.SMTPError{Code: code, EnhancedCode: smtp.EnhancedCode{e1, e2, e3}, Message: msg}
		before := *upstream
		var err error = fmt.Errorf("upstream %s: %w", cmd, upstream)
		if setup {
			err = fmt.Errorf("%w: %w", errSetup, err)
		}

		v := classify(cmd, err)

		if *upstream != before {
			t.Errorf("classify changed the upstream's error to %+v", *upstream)
		}
		if v.reply == nil {
			t.Fatalf("classify(%q, %v) gave no reply", cmd, err)
		}
		if v.reply == upstream {
			t.Errorf("classify returned the upstream's error value itself, not a reply of its own")
		}
		for _, line := range strings.Split(v.reply.Message, "\n") {
			if len(line) > maxClientText {
				t.Errorf("classify(%q, %v): a reply line of %d bytes for the client, over %d", cmd, err, len(line), maxClientText)
			}
		}
		if v.reply.Code < 400 || v.reply.Code > 599 {
			t.Errorf("classify(%q, %v): client reply %d, want 4xx or 5xx", cmd, err, v.reply.Code)
		}
		if v.now {
			t.Errorf("classify(%q, %v) asks for an immediate retry; only judge may", cmd, err)
		}
		if v.sameSession && cmd != cmdRcpt {
			t.Errorf("classify(%q, %v): same session for %q; only a refused RCPT keeps the transaction's session", cmd, err, cmd)
		}

		permanent := code >= 500 && code <= 599
		passedOn := code == 452 && (cmd == cmdRcpt || upstream.EnhancedCode == smtp.EnhancedCode{4, 5, 3})
		switch {
		case permanent && v.retry:
			t.Errorf("classify(%q, %v) retries a %d", cmd, err, code)
		case permanent && setup && *v.reply != *replyMisconfigured:
			t.Errorf("classify(%q, %v) = %+v, want the misconfiguration reply %+v", cmd, err, *v.reply, *replyMisconfigured)
		case permanent && !setup && (v.reply.Code != code || v.reply.EnhancedCode != upstream.EnhancedCode || v.reply.Message != clientText(msg)):
			t.Errorf("classify(%q, %v) = %+v, want the upstream's %d as it is, each line cut to %d bytes", cmd, err, *v.reply, code, maxClientText)
		case passedOn && (v.retry || v.reply.Code != 452):
			t.Errorf("classify(%q, %v) = %+v, retry %v; want 452 passed on, not retried", cmd, err, *v.reply, v.retry)
		case code >= 400 && code <= 499 && !passedOn && !v.retry:
			t.Errorf("classify(%q, %v) does not retry a %d", cmd, err, code)
		case code == 421 && v.reply.Code != 451:
			t.Errorf("classify(%q, %v) = %d, want 421 turned into 451: the proxy keeps the client's connection", cmd, err, v.reply.Code)
		case code >= 200 && code <= 399 && (!v.retry || v.sameSession):
			t.Errorf("classify(%q, %v): retry %v, same session %v; want an out-of-sequence %d retried on a fresh session",
				cmd, err, v.retry, v.sameSession, code)
		case (code < 200 || code > 599) && !setup && (!v.retry || v.sameSession):
			// (During set-up, classify takes any code from 500 up for a
			// 5xx: not retried, 451 4.3.5. Harmless, so not asserted.)
			t.Errorf("classify(%q, %v): retry %v, same session %v; want a meaningless code %d retried on a fresh session",
				cmd, err, v.retry, v.sameSession, code)
		}
	})
}
