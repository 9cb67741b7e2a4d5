//go:build e2e

package e2e

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// TestUndeclaredEightBitGoesThrough (issue 16, item 5): a Postfix upstream
// that offers neither SMTPUTF8 (smtputf8_enable = no) nor 8BITMIME (dropped
// from its EHLO reply) takes, sent straight to it by swaks, a message with a
// raw UTF-8 Subject and one with an 8-bit body, neither declared (no
// SMTPUTF8, no BODY=8BITMIME), as msmtp or Perl's Net::SMTP send them.
// Through smtppool the same messages must be delivered too, unaltered (the
// code before refused them with 554 5.6.9 and 554 5.6.3: for a chat server,
// a bounce is a lost email). What smtppool refuses is only what the client
// declared and the upstream lacks: BODY=8BITMIME with an 8-bit body gets
// 554 5.6.3, and Postfix never sees it.
func TestUndeclaredEightBitGoesThrough(t *testing.T) {
	pf := startPostfix(t, peers.PostfixOptions{Postconf: []string{
		"smtputf8_enable = no",
		"smtpd_discard_ehlo_keywords = 8bitmime",
	}})
	proxy := startProxy(t, pf.Addr, map[string]string{"SMTPPOOL_UPSTREAM_TLS": "none"})
	up := dialRaw(t, pf.Addr)
	up.write(t, "EHLO chat.e2e.test\r\n", nil)
	if code, text, err := up.reply(10 * time.Second); err != nil || code != 250 || strings.Contains(text, "SMTPUTF8") || strings.Contains(text, "8BITMIME") {
		t.Fatalf("postfix's EHLO reply: %d %q (err %v), want neither SMTPUTF8 nor 8BITMIME", code, text, err)
	}
	up.quit()

	swaks := func(addr string, m peers.Message, header, body string) error {
		out, err := exec.CommandContext(t.Context(), "swaks", "--server", addr, "--timeout", "30",
			"--from", m.From, "--to", m.To, "--header", "Message-Id: "+m.ID, "--header", header,
			"--body", body).CombinedOutput()
		var exitErr *exec.ExitError
		if errors.As(err, &exitErr) {
			return errors.New("swaks exited " + exitErr.Error() + " (23 MAIL, 24 RCPT, 25 DATA, 26 after the dot):\n" + peers.Tail(string(out), 12))
		}
		if err != nil {
			return err
		}
		for _, l := range strings.Split(string(out), "\n") {
			if strings.Contains(l, "MAIL FROM:") && (strings.Contains(l, "SMTPUTF8") || strings.Contains(l, "BODY=")) {
				return errors.New("swaks declared a parameter, the test needs none: " + l)
			}
		}
		return nil
	}
	msgs := peers.NewMessages("undeclared-8bit", 5)
	cases := []struct {
		name, via, header, body string
		m                       peers.Message
	}{
		{"UTF-8 Subject, straight to Postfix", pf.Addr, "Subject: Grüße aus Zürich", "A plain body.", msgs[0]},
		{"8-bit body, straight to Postfix", pf.Addr, "Subject: 8-bit body", "Grüße aus Zürich.", msgs[1]},
		{"UTF-8 Subject, through smtppool", proxy.Addr, "Subject: Grüße aus Zürich", "A plain body.", msgs[2]},
		{"8-bit body, through smtppool", proxy.Addr, "Subject: 8-bit body", "Grüße aus Zürich.", msgs[3]},
	}
	var sent []peers.Message
	for _, c := range cases {
		if err := swaks(c.via, c.m, c.header, c.body); err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		t.Logf("%s: delivered to the upstream (swaks exit 0)", c.name)
		sent = append(sent, c.m)
	}
	box := waitDelivered(t, pf, sent, 30*time.Second)
	for _, c := range cases[2:] {
		stored := box[c.m.ID]
		if len(stored) == 0 {
			continue
		}
		b, err := os.ReadFile(stored[0].Path)
		if err != nil {
			t.Fatal(err)
		}
		want := c.header
		if strings.HasPrefix(c.name, "8-bit") {
			want = c.body
		}
		if !bytes.Contains(b, []byte(want)) {
			t.Errorf("%s: the delivered copy lacks %q, unaltered", c.name, want)
		}
	}

	// Declared and not offered: refused, and never relayed.
	declared := msgs[4]
	declared.Body = "Grüße aus Zürich.\r\n"
	c, err := peers.Open(proxy.Addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	logStart := pf.LogSize()
	for _, step := range []struct {
		line string
		want int
	}{{"MAIL FROM:<" + declared.From + "> BODY=8BITMIME", 250}, {"RCPT TO:<" + declared.To + ">", 250}, {"DATA", 354}} {
		if err := c.Expect(step.want, step.line); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.WriteData(declared.Bytes()); err != nil {
		t.Fatal(err)
	}
	code, text, err := c.Cmd("")
	t.Logf("8-bit body declared with BODY=8BITMIME, through smtppool: %d %s", code, text)
	if err != nil || code != 554 || !strings.HasPrefix(text, "5.6.3") {
		t.Errorf("8-bit body declared with BODY=8BITMIME to an upstream without 8BITMIME: %d %s (err %v), want 554 5.6.3", code, text, err)
	}
	c.Quit()
	_ = peers.Poll(t.Context(), 2*time.Second, "the refused message to show up (it must not)", func() (bool, string) {
		if strings.Contains(pf.LogSince(logStart), "message-id="+declared.ID) {
			t.Errorf("postfix received the refused message %s", declared.ID)
			return true, ""
		}
		return false, "absent"
	})
}
