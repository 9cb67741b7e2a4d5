package proxy_test

import (
	"strings"
	"testing"

	"github.com/smtppool/smtppool/internal/memsmtp"
)

// The tests below check FuzzClientStream's checker on made-up
// conversations: a checker that cannot fail would make the fuzzer prove
// nothing.

// cannedReplies parses replies written one a line, "\n"-separated, as the
// server would send them.
func cannedReplies(t *testing.T, s string) []fuzzReply {
	t.Helper()
	replies, malformed := parseReplies([]byte(strings.ReplaceAll(s, "\n", "\r\n")), true)
	if malformed != "" {
		t.Fatalf("canned replies: %s", malformed)
	}
	return replies
}

// A pipelined DATA message and a two-chunk BDAT message, the first
// accepted and the second refused.
const (
	cannedStream = "EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nMessage-ID: <one@t>\r\n\r\n..dot\r\n.\r\n" +
		"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 21\r\nMessage-ID: <two@t>\r\nBDAT 4 LAST\r\nhi\r\nQUIT\r\n"
	cannedReplyText = "220 ready\n250-hello\n250 SIZE\n250 2.0.0 Roger\n250 2.0.0 OK\n354 Go ahead\n250 2.0.0 OK: queued\n" +
		"250 2.0.0 Roger\n250 2.0.0 OK\n250 2.0.0 Continue\n554 5.6.0 refused\n221 2.0.0 Bye\n"
)

func TestAttributeFollowsDataAndBDAT(t *testing.T) {
	a := attribute([]byte(cannedStream), cannedReplies(t, cannedReplyText))
	if !a.exact || a.pending || !a.ended {
		t.Fatalf("attribution exact %v (%s), pending %v, ended %v; want exact, not pending, ended", a.exact, a.why, a.pending, a.ended)
	}
	if len(a.messages) != 2 {
		t.Fatalf("%d messages attributed, want 2: %s", len(a.messages), a.summary())
	}
	one, two := a.messages[0], a.messages[1]
	if one.id != "one@t" || one.final == nil || !one.final.queued() || string(one.body) != "Message-ID: <one@t>\r\n\r\n.dot\r\n" {
		t.Errorf("first message %q %q answered %v, want one@t, unstuffed, answered OK: queued", one.id, one.body, one.final)
	}
	if two.id != "two@t" || two.final == nil || two.final.code != 554 || string(two.body) != "Message-ID: <two@t>\r\nhi\r\n" {
		t.Errorf("second message %q %q answered %v, want two@t, both chunks, answered 554", two.id, two.body, two.final)
	}
}

func TestAttributeLosesTrackVisibly(t *testing.T) {
	for name, replies := range map[string]string{
		"354 to MAIL":      "220 ready\n250 hello\n354 Go ahead\n",
		"reply after QUIT": cannedReplyText + "500 5.5.2 extra\n",
		"Continue to LAST": "220 ready\n250 hello\n250 2.0.0 Roger\n250 2.0.0 OK\n354 Go ahead\n250 2.0.0 OK: queued\n250 2.0.0 Roger\n250 2.0.0 OK\n250 2.0.0 Continue\n250 2.0.0 Continue\n",
	} {
		if a := attribute([]byte(cannedStream), cannedReplies(t, replies)); a.exact {
			t.Errorf("%s: attribution exact, want inexact: %s", name, a.summary())
		}
	}
}

func TestCheckPromiseCatchesBrokenPromises(t *testing.T) {
	replies := cannedReplies(t, cannedReplyText)
	a := attribute([]byte(cannedStream), replies)
	stored := func(bodies ...string) []memsmtp.Message {
		var ms []memsmtp.Message
		for _, b := range bodies {
			ms = append(ms, memsmtp.Message{Data: []byte(b)})
		}
		return ms
	}
	one := "Message-ID: <one@t>\r\n\r\n.dot\r\n"
	two := "Message-ID: <two@t>\r\nhi\r\n"
	if problems := checkPromise(a, replies, stored(one), true); len(problems) > 0 {
		t.Fatalf("promise kept, checker reports %q", problems)
	}
	inexact := a
	inexact.exact = false
	for _, c := range []struct {
		name   string
		a      attribution
		stored []memsmtp.Message
		strict bool
		want   string
	}{
		{"5xx delivered", a, stored(one, two), false, "answered only with a 5xx"},
		{"250 not delivered", a, nil, false, "only 0 stored"},
		{"altered", a, stored("Message-ID: <one@t>\r\n\r\n..dot\r\n"), false, "differs"},
		{"invented", a, stored(one, "Message-ID: <three@t>\r\n"), false, "not sent by the client"},
		{"unacknowledged, strict", a, stored(one, one), true, "acknowledged with 250, with no fault"},
		{"global: more 250 than stored", inexact, nil, false, "only 0 stored"},
		{"global: strict count", inexact, stored(one, two), true, "with no fault"},
	} {
		problems := strings.Join(checkPromise(c.a, replies, c.stored, c.strict), "\n")
		if !strings.Contains(problems, c.want) {
			t.Errorf("%s: checker reports %q, want %q", c.name, problems, c.want)
		}
	}
}

func TestUnknownPanicsSkipsOnlyGoSMTPsBDATRace(t *testing.T) {
	race := "smtppool: panic serving 127.0.0.1:49578: runtime error: invalid memory address or nil pointer dereference\n" +
		"goroutine 556 [running]:\nruntime/debug.Stack()\n\t/usr/local/go/src/runtime/debug/stack.go:26 +0x5e\n" +
		"github.com/emersion/go-smtp.(*Conn).handlePanic(0x3edbed6186e0, {0x7b8f00, 0xb2fda0}, 0x3edbed7725cf?)\n" +
		"\t/root/go/pkg/mod/github.com/emersion/go-smtp@v0.25.1/conn.go:1142 +0x85\n" +
		"github.com/emersion/go-smtp.(*Conn).handleBdat.func1.1()\n\t/root/go/pkg/mod/github.com/emersion/go-smtp@v0.25.1/conn.go:1050 +0x45\n" +
		"panic({0x7b8f00?, 0xb2fda0?})\n\t/usr/local/go/src/runtime/panic.go:860 +0x13a\n" +
		"github.com/emersion/go-smtp.(*Conn).handleBdat.func1()\n\t/root/go/pkg/mod/github.com/emersion/go-smtp@v0.25.1/conn.go:1059 +0x9a\n" +
		"created by github.com/emersion/go-smtp.(*Conn).handleBdat in goroutine 597\n\t/root/go/pkg/mod/github.com/emersion/go-smtp@v0.25.1/conn.go:1047 +0x7ab\n\n"
	if u := unknownPanics(race); u != "" {
		t.Errorf("go-smtp's BDAT race reported: %s", u)
	}
	other := "smtppool: panic serving 127.0.0.1:1: runtime error: index out of range\ngoroutine 1 [running]:\n"
	if u := unknownPanics(race + other); !strings.Contains(u, "index out of range") {
		t.Errorf("another panic hidden: %q", u)
	}
}
