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

// TestClientAccessWithSwaks drives the smtppool binary with swaks, a real
// client, with client authentication and TLS required, into smtp-sink:
// swaks with STARTTLS (verifying the certificate the test made) and AUTH
// PLAIN or LOGIN delivers; without STARTTLS it is refused at MAIL and
// never offered AUTH; a wrong password gets 535 5.7.8; without AUTH, 530.
// A second smtppool whose allowed networks leave out loopback answers
// swaks with 554 5.7.1 at the greeting, and nothing reaches the sink.
func TestClientAccessWithSwaks(t *testing.T) {
	sink := startSink(t, true)
	certFile, keyFile := writeCertificate(t, "127.0.0.1", "localhost")
	pwFile := filepath.Join(publicDir(t, "secret"), "client-password")
	const password = "pw-e2e-s3cret"
	if err := os.WriteFile(pwFile, []byte(password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	proxy := startProxy(t, sink.Addr, map[string]string{
		"SMTPPOOL_UPSTREAM_TLS":         "none",
		"SMTPPOOL_CLIENT_USERNAME":      "mattermost",
		"SMTPPOOL_CLIENT_PASSWORD_FILE": pwFile,
		"SMTPPOOL_LISTEN_TLS_CERT":      certFile,
		"SMTPPOOL_LISTEN_TLS_KEY":       keyFile,
		"SMTPPOOL_LISTEN_REQUIRE_TLS":   "true",
	})

	swaks := func(addr string, m peers.Message, args ...string) (exit int, out string) {
		all := append([]string{"--server", addr, "--timeout", "30", "--from", m.From, "--to", m.To,
			"--header", "Subject: " + m.Subject, "--header", "Message-Id: " + m.ID,
			"--body", "Sent by swaks through smtppool with AUTH and STARTTLS."}, args...)
		b, err := exec.Command("swaks", all...).CombinedOutput()
		var exitErr *exec.ExitError
		switch {
		case errors.As(err, &exitErr):
			return exitErr.ExitCode(), string(b)
		case err != nil:
			t.Fatalf("swaks: %v", err)
		}
		return 0, string(b)
	}
	tlsArgs := []string{"--tls", "--tls-verify", "--tls-ca-path", certFile}
	auth := func(mech, pass string) []string {
		return append(append([]string{}, tlsArgs...), "--auth", mech, "--auth-user", "mattermost", "--auth-password", pass)
	}

	msgs := peers.NewMessages("access", 6)
	var delivered []peers.Message
	for i, tt := range []struct {
		name    string
		args    []string
		exit    int    // swaks: 0 sent, 23 MAIL refused, 28 AUTH failed
		reply   string // in swaks's transcript
		deliver bool
	}{
		{"STARTTLS and AUTH PLAIN", auth("PLAIN", password), 0, "235 2.0.0 Authentication succeeded", true},
		{"STARTTLS and AUTH LOGIN", auth("LOGIN", password), 0, "235 2.0.0 Authentication succeeded", true},
		{"plain text", nil, 23, "530 5.7.0 Must issue a STARTTLS command first", false},
		{"wrong password", auth("PLAIN", "not-the-password"), 28, "535 5.7.8", false},
		{"no AUTH", tlsArgs, 23, "530 5.7.0 Authentication required", false},
	} {
		exit, out := swaks(proxy.Addr, msgs[i], tt.args...)
		if exit != tt.exit || !strings.Contains(out, tt.reply) {
			t.Errorf("%s: swaks exited %d, want %d with %q:\n%s", tt.name, exit, tt.exit, tt.reply, peers.Tail(out, 30))
		}
		if tt.args == nil && strings.Contains(out, "AUTH PLAIN") {
			t.Errorf("%s: AUTH offered before STARTTLS:\n%s", tt.name, peers.Tail(out, 30))
		}
		if tt.deliver {
			delivered = append(delivered, msgs[i])
		}
	}
	if _, err := sink.WaitCounters(t.Context(), 10*time.Second, func(c peers.SinkCounters) bool { return c.Mesg >= len(delivered) }); err != nil {
		t.Fatal(err)
	}
	box, err := sink.Dumped()
	if err != nil {
		t.Fatal(err)
	}
	once, missing, duplicated := peers.Copies(box, delivered)
	if once != len(delivered) || len(box) != len(delivered) {
		t.Errorf("sink has %d messages: %d of %d sent delivered once, %d missing, %d duplicated", len(box), once, len(delivered), missing, duplicated)
	}

	// Loopback left out of the allowed networks: 554 at the greeting.
	before := sink.Counters()
	refusing := startProxy(t, sink.Addr, map[string]string{"SMTPPOOL_UPSTREAM_TLS": "none", "SMTPPOOL_ALLOWED_NETWORKS": "10.0.0.0/8"})
	exit, out := swaks(refusing.Addr, msgs[5])
	if exit != 21 || !strings.Contains(out, "554 5.7.1") {
		t.Errorf("client outside the allowed networks: swaks exited %d, want 21 (banner) with 554 5.7.1:\n%s", exit, peers.Tail(out, 20))
	}
	if after := sink.Settle(t.Context(), 200*time.Millisecond, 5*time.Second); after != before {
		t.Errorf("sink counters went from %v to %v for a refused client", before, after)
	}
	stopProxy(t, refusing)
	stopProxy(t, proxy)
	for _, p := range []*peers.Proxy{proxy, refusing} {
		if strings.Contains(p.Log(), password) {
			t.Errorf("%s's log contains the client password", p.Name)
		}
	}
	if !strings.Contains(refusing.Log(), "its address is not in SMTPPOOL_ALLOWED_NETWORKS") {
		t.Errorf("the refusal is not in the log:\n%s", peers.Tail(refusing.Log(), 20))
	}
}
