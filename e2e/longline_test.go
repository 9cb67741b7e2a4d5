//go:build e2e

package e2e

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// TestLongLineRefusalReachesCurl (issue 16, item 6): curl, a real client
// that writes the whole message before it reads the reply, sends through
// the real binary a message with one 3,000-byte line (over go-smtp's limit
// of 2,000) followed by 8 MB of ordinary lines, more than loopback's socket
// buffers hold. smtppool refuses it with 554 5.6.0 and, as go-smtp cannot
// find the end of such a message, ends the connection. Asserted: curl
// reports the 554, not "Connection reset by peer" (what curl, msmtp and
// nodemailer reported when smtppool closed while they were still sending:
// here "curl: (55) Send failure: Connection reset by peer" before the fix;
// with 1.5 MB the loopback buffers took the whole message and curl heard the
// 554 even then), and nothing reaches Postfix. The control: a message as
// large without the long line, sent the same way, is delivered.
func TestLongLineRefusalReachesCurl(t *testing.T) {
	pf := startPostfix(t, peers.PostfixOptions{})
	proxy := startProxy(t, pf.Addr, map[string]string{"SMTPPOOL_UPSTREAM_TLS": "none"})
	dir := publicDir(t, "curl")

	msgs := peers.NewMessages("long-line", 2)
	const size = 8 << 20
	control, long := msgs[0].Padded(size), msgs[1]
	long.Body += strings.Repeat("x", 3000) + "\r\n"
	long = long.Padded(size)

	curl := func(m peers.Message) (exit int, out string) {
		t.Helper()
		file := filepath.Join(dir, strings.Trim(m.ID, "<>"))
		if err := os.WriteFile(file, m.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
		cmd := exec.CommandContext(t.Context(), "curl", "--silent", "--show-error", "--verbose", "--max-time", "60",
			"--url", "smtp://"+proxy.Addr, "--mail-from", m.From, "--mail-rcpt", m.To, "--upload-file", file)
		b, err := cmd.CombinedOutput()
		var exitErr *exec.ExitError
		switch {
		case errors.As(err, &exitErr):
			exit = exitErr.ExitCode()
		case err != nil:
			t.Fatalf("curl: %v", err)
		}
		// The verbose output has the whole dialogue but for the message.
		return exit, string(b)
	}

	start := time.Now()
	exit, out := curl(control)
	t.Logf("control: curl exited %d after %v", exit, time.Since(start).Round(time.Millisecond))
	if exit != 0 {
		t.Fatalf("control: curl exited %d sending a %d-byte message without the long line:\n%s", exit, len(control.Bytes()), peers.Tail(out, 20))
	}
	waitDelivered(t, pf, []peers.Message{control}, 30*time.Second)

	logStart := pf.LogSize()
	start = time.Now()
	exit, out = curl(long)
	var replies []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "< 5") || strings.HasPrefix(l, "curl: (") {
			replies = append(replies, strings.TrimSpace(l))
		}
	}
	t.Logf("long line: curl exited %d after %v: %s", exit, time.Since(start).Round(time.Millisecond), strings.Join(replies, " | "))
	switch {
	case exit == 0:
		t.Errorf("curl reports success for a message with a 3,000-byte line:\n%s", peers.Tail(out, 20))
	case !strings.Contains(out, "< 554 5.6.0"):
		t.Errorf("curl did not hear the 554 5.6.0 (exit %d):\n%s", exit, peers.Tail(out, 20))
	case strings.Contains(strings.ToLower(out), "reset by peer"):
		t.Errorf("curl met a connection reset (exit %d):\n%s", exit, peers.Tail(out, 20))
	}
	// Nothing of it may reach Postfix: an absence, watched for 2 s, ten
	// times Postfix's delivery latency, once curl is done.
	_ = peers.Poll(t.Context(), 2*time.Second, "the refused message to show up (it must not)", func() (bool, string) {
		if strings.Contains(pf.LogSince(logStart), "message-id="+long.ID) {
			t.Errorf("postfix received the refused message %s", long.ID)
			return true, ""
		}
		return false, "absent"
	})
}
