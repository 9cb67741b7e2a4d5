package proxy_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
	"github.com/smtppool/smtppool/proxy"
)

// TestExtensionsCarriedThrough: MAIL parameters reach an upstream that
// supports them; one that does not gets the message unaltered where the
// parameter changes nothing, and the client gets an error otherwise.
func TestExtensionsCarriedThrough(t *testing.T) {
	ascii := message("ascii")
	eightBitBody := message("8bit") + "Grüße\r\n"
	utf8Header := "Subject: Grüße\r\n\r\nbody\r\n"
	tests := []struct {
		name     string
		hide     []string
		upSize   int64
		from     string
		opts     smtp.MailOptions
		msg      string
		wantStep string
		want     *smtp.SMTPError
		wantOpts smtp.MailOptions
	}{
		{name: "all supported", from: "josé@example.com", opts: smtp.MailOptions{UTF8: true, Size: 500}, msg: utf8Header,
			wantOpts: smtp.MailOptions{UTF8: true, Size: 500, Body: smtp.Body8BitMIME}},
		{name: "SMTPUTF8 on an ASCII message", hide: []string{"SMTPUTF8"}, from: "app@example.com", opts: smtp.MailOptions{UTF8: true}, msg: ascii,
			wantOpts: smtp.MailOptions{Body: smtp.Body8BitMIME}},
		{name: "non-ASCII sender without SMTPUTF8", hide: []string{"SMTPUTF8"}, from: "josé@example.com", opts: smtp.MailOptions{UTF8: true}, msg: ascii,
			wantStep: "MAIL", want: reply(553, [3]int{5, 6, 7}, "")},
		{name: "non-ASCII header without SMTPUTF8", hide: []string{"SMTPUTF8"}, from: "app@example.com", opts: smtp.MailOptions{UTF8: true}, msg: utf8Header,
			wantStep: "end of DATA", want: reply(554, [3]int{5, 6, 9}, "")},
		{name: "7-bit message without 8BITMIME", hide: []string{"8BITMIME"}, from: "app@example.com", msg: ascii},
		{name: "8-bit message without 8BITMIME", hide: []string{"8BITMIME"}, from: "app@example.com", msg: eightBitBody,
			wantStep: "end of DATA", want: reply(554, [3]int{5, 6, 3}, "")},
		{name: "SIZE over the upstream's limit", upSize: 400, from: "app@example.com", opts: smtp.MailOptions{Size: 500}, msg: ascii,
			wantStep: "MAIL", want: reply(552, [3]int{5, 3, 4}, "")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, options{upstream: memsmtp.Options{Hide: tt.hide, MaxMessageBytes: tt.upSize}})
			c := e.dial(t)
			err := c.Mail(tt.from, &tt.opts)
			step := "MAIL"
			if err == nil {
				step = "RCPT"
				if err = c.Rcpt("user@example.com", nil); err == nil {
					var w *smtp.DataCommand
					if w, err = c.Data(); err == nil {
						w.Write([]byte(tt.msg))
						step, err = "end of DATA", w.Close()
					}
				}
			}
			var got *smtp.SMTPError
			switch {
			case tt.want == nil && err != nil:
				t.Fatalf("%s: %v", step, err)
			case tt.want != nil && (step != tt.wantStep || !errors.As(err, &got) || got.Code != tt.want.Code || got.EnhancedCode != tt.want.EnhancedCode):
				t.Fatalf("%s: %v, want %d %v at %s", step, err, tt.want.Code, tt.want.EnhancedCode, tt.wantStep)
			}
			msgs := e.up.Messages()
			if tt.want != nil {
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
// the transaction has used offers what the message needs (8BITMIME here),
// the refusal stays a 5xx after a failover: retrying could not help.
func TestNoEntryWithTheExtensionIsTheMessagesFault(t *testing.T) {
	hide := memsmtp.Options{Hide: []string{"8BITMIME"}}
	first, second := startUpstreamEntry(t, hide), startUpstreamEntry(t, hide)
	retries := &retryCounter{reasons: map[string]int{}}
	c := dialEntries(t, retries, first, second)
	if err := c.Mail("app@example.com", nil); err != nil {
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
