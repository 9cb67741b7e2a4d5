package proxy_test

import (
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
	"github.com/smtppool/smtppool/proxy"
)

// TestExtensionsCarriedThrough: MAIL parameters reach an upstream that
// supports them. For one that does not, a parameter the client declared is
// left out where that changes nothing, and the client is refused where it
// would; what the client did not declare (a UTF-8 header or address without
// SMTPUTF8, 8-bit data without BODY=8BITMIME) goes through unaltered, as on
// a direct connection, and the upstream decides (issue 16, item 5: those
// were refused with 554 5.6.9, 553 5.6.7 and 554 5.6.3). The client is a
// raw one: go-smtp's client declares BODY=8BITMIME whenever it is offered.
func TestExtensionsCarriedThrough(t *testing.T) {
	ascii := message("ascii")
	eightBitBody := message("8bit") + "Grüße\r\n"
	utf8Header := "Subject: Grüße\r\n\r\nbody\r\n"
	tests := []struct {
		name     string
		hide     []string
		upSize   int64
		mail     string // MAIL's argument
		rcpt     string
		msg      string
		wantStep string // where the client is refused: MAIL, RCPT or "end of DATA"; "" delivered
		want     string // the refusal's code and enhanced code
		wantOpts smtp.MailOptions
	}{
		{name: "all supported", mail: "<josé@example.com> SMTPUTF8 SIZE=500 BODY=8BITMIME", msg: utf8Header,
			wantOpts: smtp.MailOptions{UTF8: true, Size: 500, Body: smtp.Body8BitMIME}},
		{name: "SMTPUTF8 on an ASCII message", hide: []string{"SMTPUTF8"}, mail: "<app@example.com> SMTPUTF8", msg: ascii,
			wantOpts: smtp.MailOptions{Body: smtp.Body8BitMIME}},
		{name: "non-ASCII sender with SMTPUTF8", hide: []string{"SMTPUTF8"}, mail: "<josé@example.com> SMTPUTF8", msg: ascii,
			wantStep: "MAIL", want: "553 5.6.7"},
		{name: "non-ASCII sender without SMTPUTF8", hide: []string{"SMTPUTF8"}, mail: "<josé@example.com>", msg: ascii,
			wantOpts: smtp.MailOptions{Body: smtp.Body8BitMIME}},
		{name: "non-ASCII recipient with SMTPUTF8", hide: []string{"SMTPUTF8"}, mail: "<app@example.com> SMTPUTF8", rcpt: "jörg@example.com", msg: ascii,
			wantStep: "RCPT", want: "553 5.6.7"},
		{name: "non-ASCII recipient without SMTPUTF8", hide: []string{"SMTPUTF8"}, mail: "<app@example.com>", rcpt: "jörg@example.com", msg: ascii,
			wantOpts: smtp.MailOptions{Body: smtp.Body8BitMIME}},
		{name: "non-ASCII header with SMTPUTF8", hide: []string{"SMTPUTF8"}, mail: "<app@example.com> SMTPUTF8", msg: utf8Header,
			wantStep: "end of DATA", want: "554 5.6.9"},
		{name: "non-ASCII header without SMTPUTF8", hide: []string{"SMTPUTF8"}, mail: "<app@example.com>", msg: utf8Header,
			wantOpts: smtp.MailOptions{Body: smtp.Body8BitMIME}},
		{name: "7-bit message without 8BITMIME", hide: []string{"8BITMIME"}, mail: "<app@example.com>", msg: ascii},
		{name: "7-bit message with BODY=8BITMIME", hide: []string{"8BITMIME"}, mail: "<app@example.com> BODY=8BITMIME", msg: ascii},
		{name: "8-bit message with BODY=8BITMIME", hide: []string{"8BITMIME"}, mail: "<app@example.com> BODY=8BITMIME", msg: eightBitBody,
			wantStep: "end of DATA", want: "554 5.6.3"},
		{name: "8-bit message without BODY=8BITMIME", hide: []string{"8BITMIME"}, mail: "<app@example.com>", msg: eightBitBody},
		{name: "SIZE over the upstream's limit", upSize: 400, mail: "<app@example.com> SIZE=500", msg: ascii,
			wantStep: "MAIL", want: "552 5.3.4"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, options{upstream: memsmtp.Options{Hide: tt.hide, MaxMessageBytes: tt.upSize}})
			if tt.rcpt == "" {
				tt.rcpt = "user@example.com"
			}
			c := rawDial(t, e.addr)
			c.must("EHLO client.test", 250)
			var step, got string
			for _, s := range []struct{ step, line, want string }{
				{"MAIL", "MAIL FROM:" + tt.mail + "\r\n", "250"},
				{"RCPT", "RCPT TO:<" + tt.rcpt + ">\r\n", "250"},
				{"DATA", "DATA\r\n", "354"},
				{"end of DATA", tt.msg + ".\r\n", "250"},
			} {
				c.write(s.line)
				code, msg := c.reply()
				if got = strconv.Itoa(code) + " " + msg; !strings.HasPrefix(got, s.want) {
					step = s.step
					break
				}
			}
			if step != tt.wantStep || !strings.HasPrefix(got, tt.want) {
				t.Fatalf("refused at %q with %q, want at %q with %q", step, got, tt.wantStep, tt.want)
			}
			msgs := e.up.Messages()
			if tt.wantStep != "" {
				if len(msgs) != 0 {
					t.Errorf("upstream got %d messages, want none", len(msgs))
				}
				return
			}
			if len(msgs) != 1 {
				t.Fatalf("upstream got %d messages, want 1", len(msgs))
			}
			m := msgs[0]
			if string(m.Data) != tt.msg {
				t.Errorf("upstream got %q, want the message unaltered: %q", m.Data, tt.msg)
			}
			if want := strings.Trim(strings.Fields(tt.mail)[0], "<>"); m.From != want || m.To[0] != tt.rcpt {
				t.Errorf("upstream envelope %s -> %v, want %s -> %s", m.From, m.To, want, tt.rcpt)
			}
			if m.Opts.UTF8 != tt.wantOpts.UTF8 || m.Opts.Size != tt.wantOpts.Size || m.Opts.Body != tt.wantOpts.Body {
				t.Errorf("upstream MAIL options = %+v, want %+v", m.Opts, tt.wantOpts)
			}
		})
	}
}

func TestClientAuthIdentityIsNotForwarded(t *testing.T) {
	e := newEnv(t, options{})
	c := e.dial(t)
	boss := "ceo@example.com"
	if err := c.Mail("app@example.com", &smtp.MailOptions{Auth: &boss}); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("user@example.com", nil); err != nil {
		t.Fatal(err)
	}
	w, _ := c.Data()
	w.Write([]byte(message("auth")))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if m := e.up.Messages(); len(m) != 1 || m[0].Opts.Auth != nil {
		t.Errorf("upstream MAIL AUTH= parameter = %v, want none", m[0].Opts.Auth)
	}
}

// TestFailoverEntryWithoutAnExtensionIsNotTheMessagesFault: a transaction
// whose first upstream entry offered SMTPUTF8 and whose retry lands on a
// failover entry without it gets a 4xx (the first entry may be back),
// never the 5xx that would make the client drop the message.
func TestFailoverEntryWithoutAnExtensionIsNotTheMessagesFault(t *testing.T) {
	first, second := startUpstreamEntry(t, memsmtp.Options{}), startUpstreamEntry(t, memsmtp.Options{Hide: []string{"SMTPUTF8"}})
	retries := &retryCounter{reasons: map[string]int{}}
	c := dialEntries(t, retries, first, second)
	if err := c.Mail("josé@example.com", &smtp.MailOptions{UTF8: true}); err != nil {
		t.Fatalf("MAIL with SMTPUTF8, first entry up: %v", err)
	}
	first.Close() // the first entry goes away; the retry lands on the second
	err := c.Rcpt("user@example.com", nil)
	var smtpErr *smtp.SMTPError
	if !errors.As(err, &smtpErr) || smtpErr.Code/100 != 4 {
		t.Errorf("RCPT once only the entry without SMTPUTF8 is left: %v, want a 4xx", err)
	}
	if n := second.Stats().Messages; n != 0 {
		t.Errorf("the second entry kept %d messages, want 0", n)
	}
	if retries.count("failover") == 0 {
		t.Errorf("retries by reason %v, want some for failover", retries)
	}
}

// TestNoEntryWithTheExtensionIsTheMessagesFault: when no upstream entry
// the transaction has used offers what the client declared its message
// needs (BODY=8BITMIME for an 8-bit body here), the refusal stays a 5xx
// after a failover: retrying could not help.
func TestNoEntryWithTheExtensionIsTheMessagesFault(t *testing.T) {
	hide := memsmtp.Options{Hide: []string{"8BITMIME"}}
	first, second := startUpstreamEntry(t, hide), startUpstreamEntry(t, hide)
	retries := &retryCounter{reasons: map[string]int{}}
	c := dialEntries(t, retries, first, second)
	if err := c.Mail("app@example.com", &smtp.MailOptions{Body: smtp.Body8BitMIME}); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("a@example.com", nil); err != nil {
		t.Fatal(err)
	}
	first.Close() // the next command fails over to the second entry
	if err := c.Rcpt("b@example.com", nil); err != nil {
		t.Fatalf("RCPT after the failover: %v", err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte("Subject: x\r\n\r\ncaf\xc3\xa9\r\n"))
	err = w.Close()
	var smtpErr *smtp.SMTPError
	if !errors.As(err, &smtpErr) || smtpErr.Code != 554 {
		t.Errorf("8-bit message, no entry with 8BITMIME: %v, want 554", err)
	}
	if n := retries.count("failover"); n != 0 {
		t.Errorf("%d failover retries, want none", n)
	}
}

// startUpstreamEntry starts an in-process upstream with the test's
// credentials, closed when the test ends.
func startUpstreamEntry(t *testing.T, o memsmtp.Options) *memsmtp.Server {
	t.Helper()
	o.Username, o.Password = "app", "s3cret"
	up, err := memsmtp.Start(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { up.Close() })
	return up
}

// dialEntries runs a proxy whose pool fails over across the entries, in
// order, with a short retry window, and returns a client connected to it;
// both end with the test.
func dialEntries(t *testing.T, observer proxy.Observer, entries ...*memsmtp.Server) *smtp.Client {
	t.Helper()
	addrs := make([]string, len(entries))
	for i, e := range entries {
		addrs[i] = e.Addr
	}
	p, err := pool.New(pool.Config{Addr: strings.Join(addrs, ","), TLS: pool.TLSNone,
		Auth: pool.PasswordAuth{Username: "app", Password: "s3cret"}, AllowInsecureAuth: true,
		ProbeBackoff: time.Millisecond, ProbeBackoffMax: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	_, addr := serve(t, p, proxy.Config{RetryTimeout: 300 * time.Millisecond, RetryBackoff: time.Millisecond, RetryBackoffMax: 5 * time.Millisecond,
		Observer: observer})
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
