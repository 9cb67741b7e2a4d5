package main

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net"
	"net/netip"
	netsmtp "net/smtp"
	"net/textproto"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/proxy"
)

// writeListenCert writes a self-signed certificate for localhost and its
// key as PEM files.
func writeListenCert(t *testing.T) (certFile, keyFile string) {
	t.Helper()
	cfg, _, err := memsmtp.SelfSigned("127.0.0.1", "localhost")
	if err != nil {
		t.Fatal(err)
	}
	key, err := x509.MarshalPKCS8PrivateKey(cfg.Certificates[0].PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cfg.Certificates[0].Certificate[0]}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key}), 0o600)
	return certFile, keyFile
}

func TestAccessConfigErrorsNameTheVariable(t *testing.T) {
	certFile, keyFile := writeListenCert(t)
	otherCert, _ := writeListenCert(t)
	base := []string{"SMTPPOOL_UPSTREAM_ADDR=smtp.corp.example:587"}
	tests := []configError{
		{"removed variable", append(base, "SMTPPOOL_ALLOW_REMOTE_CLIENTS=true"), "SMTPPOOL_ALLOW_REMOTE_CLIENTS"},
		{"removed variable, false", append(base, "SMTPPOOL_ALLOW_REMOTE_CLIENTS=false"), "SMTPPOOL_ALLOW_REMOTE_CLIENTS"},
		{"bad CIDR", append(base, "SMTPPOOL_ALLOWED_NETWORKS=10.0.0.0/33"), "SMTPPOOL_ALLOWED_NETWORKS"},
		{"not a network", append(base, "SMTPPOOL_ALLOWED_NETWORKS=127.0.0.0/8,intranet"), "SMTPPOOL_ALLOWED_NETWORKS"},
		{"empty allowlist", append(base, "SMTPPOOL_ALLOWED_NETWORKS="), "SMTPPOOL_ALLOWED_NETWORKS"},
		{"only commas", append(base, "SMTPPOOL_ALLOWED_NETWORKS=, ,"), "SMTPPOOL_ALLOWED_NETWORKS"},
		{"IPv4-mapped network", append(base, "SMTPPOOL_ALLOWED_NETWORKS=::ffff:10.0.0.0/104"), "SMTPPOOL_ALLOWED_NETWORKS"},
		{"zero client conns", append(base, "SMTPPOOL_MAX_CLIENT_CONNS=0"), "SMTPPOOL_MAX_CLIENT_CONNS"},
		{"client conns not a number", append(base, "SMTPPOOL_MAX_CLIENT_CONNS=many"), "SMTPPOOL_MAX_CLIENT_CONNS"},
		{"client password without user", append(base, "SMTPPOOL_CLIENT_PASSWORD=pw-s3cret"), "SMTPPOOL_CLIENT_USERNAME"},
		{"client user without password", append(base, "SMTPPOOL_CLIENT_USERNAME=mattermost"), "SMTPPOOL_CLIENT_PASSWORD"},
		{"client password twice", append(base, "SMTPPOOL_CLIENT_USERNAME=mattermost", "SMTPPOOL_CLIENT_PASSWORD=pw-s3cret",
			"SMTPPOOL_CLIENT_PASSWORD_FILE=/etc/hostname"), "SMTPPOOL_CLIENT_PASSWORD_FILE"},
		{"missing client password file", append(base, "SMTPPOOL_CLIENT_USERNAME=mattermost", "SMTPPOOL_CLIENT_PASSWORD_FILE=/nonexistent"), "SMTPPOOL_CLIENT_PASSWORD_FILE"},
		{"cert without key", append(base, "SMTPPOOL_LISTEN_TLS_CERT="+certFile), "SMTPPOOL_LISTEN_TLS_KEY"},
		{"key without cert", append(base, "SMTPPOOL_LISTEN_TLS_KEY="+keyFile), "SMTPPOOL_LISTEN_TLS_CERT"},
		{"unreadable cert", append(base, "SMTPPOOL_LISTEN_TLS_CERT=/nonexistent", "SMTPPOOL_LISTEN_TLS_KEY="+keyFile), "SMTPPOOL_LISTEN_TLS_CERT"},
		{"cert not PEM", append(base, "SMTPPOOL_LISTEN_TLS_CERT=/etc/hostname", "SMTPPOOL_LISTEN_TLS_KEY="+keyFile), "SMTPPOOL_LISTEN_TLS_CERT"},
		{"key of another cert", append(base, "SMTPPOOL_LISTEN_TLS_CERT="+otherCert, "SMTPPOOL_LISTEN_TLS_KEY="+keyFile), "SMTPPOOL_LISTEN_TLS_CERT"},
		{"TLS required without cert", append(base, "SMTPPOOL_LISTEN_REQUIRE_TLS=true"), "SMTPPOOL_LISTEN_REQUIRE_TLS"},
		{"client auth beyond loopback without TLS", append(base, "SMTPPOOL_ALLOWED_NETWORKS=127.0.0.1,10.0.0.0/8",
			"SMTPPOOL_CLIENT_USERNAME=mattermost", "SMTPPOOL_CLIENT_PASSWORD=pw-s3cret"), "SMTPPOOL_CLIENT_USERNAME"},
	}
	checkConfigErrors(t, tests)
}

func TestAccessConfigAccepts(t *testing.T) {
	certFile, keyFile := writeListenCert(t)
	pwFile := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pwFile, []byte("pw-s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := loadConfig([]string{"SMTPPOOL_UPSTREAM_ADDR=smtp.corp.example:587",
		"SMTPPOOL_LISTEN_ADDR=0.0.0.0:2525",
		"SMTPPOOL_ALLOWED_NETWORKS= 10.1.2.0/24 , fd00:1::/64,192.0.2.7",
		"SMTPPOOL_MAX_CLIENT_CONNS=50",
		"SMTPPOOL_CLIENT_USERNAME=mattermost",
		"SMTPPOOL_CLIENT_PASSWORD_FILE=" + pwFile,
		"SMTPPOOL_LISTEN_TLS_CERT=" + certFile,
		"SMTPPOOL_LISTEN_TLS_KEY=" + keyFile,
		"SMTPPOOL_LISTEN_REQUIRE_TLS=true",
		"SMTPPOOL_LOG_ADDRESSES=true",
	}, false)
	if err != nil {
		t.Fatal(err)
	}
	lc := cfg.listenConfig(nil)
	want := []netip.Prefix{netip.MustParsePrefix("10.1.2.0/24"), netip.MustParsePrefix("fd00:1::/64"), netip.MustParsePrefix("192.0.2.7/32")}
	if !reflect.DeepEqual(lc.AllowedNetworks, want) || lc.MaxClientConns != 50 {
		t.Errorf("listen config %+v, want networks %v and 50 connections", lc, want)
	}
	ac, err := cfg.accessConfig(nil)
	if err != nil {
		t.Fatal(err)
	}
	if ac.Username != "mattermost" || ac.Password != "pw-s3cret" || ac.TLSConfig == nil || !ac.RequireTLS || !ac.LogAddresses {
		t.Errorf("access config %+v: want the file's password, TLS required, addresses logged", ac)
	}
	if w := cfg.accessWarning(); w != "" {
		t.Errorf("warning %q for narrow networks and client auth", w)
	}
	if strings.Contains(stringOf(cfg), "pw-s3cret") {
		t.Errorf("the start-up log shows the client password")
	}

	// Client auth without TLS is fine when only loopback may connect.
	if _, err := loadConfig([]string{"SMTPPOOL_UPSTREAM_ADDR=a.example:25", "SMTPPOOL_ALLOWED_NETWORKS=127.0.0.1/32,::1",
		"SMTPPOOL_CLIENT_USERNAME=mattermost", "SMTPPOOL_CLIENT_PASSWORD=pw-s3cret"}, false); err != nil {
		t.Errorf("client auth on loopback without TLS: %v", err)
	}
	// Everyone, without client auth, starts with a warning.
	open, err := loadConfig([]string{"SMTPPOOL_UPSTREAM_ADDR=a.example:25", "SMTPPOOL_LISTEN_ADDR=:2525", "SMTPPOOL_ALLOWED_NETWORKS=0.0.0.0/0,::/0"}, false)
	if err != nil {
		t.Fatal(err)
	}
	if open.accessWarning() == "" {
		t.Error("no warning for an allowlist of every address without client auth")
	}
}

// stringOf renders the configuration as the start-up log line does.
func stringOf(cfg config) string { return cfg.LogValue().Resolve().String() }

// TestListenDefaultsAreThePackagesDefaults: the listener's defaults are
// written once, in proxy.DefaultListenConfig.
func TestListenDefaultsAreThePackagesDefaults(t *testing.T) {
	cfg, err := loadConfig([]string{"SMTPPOOL_UPSTREAM_ADDR=smtp.corp.example:587"}, false)
	if err != nil {
		t.Fatal(err)
	}
	lc, ld := cfg.listenConfig(nil), proxy.DefaultListenConfig()
	// The cap is derived at start (see capacity_test.go); without a memory
	// limit it is the listener's default.
	if lc.MaxClientConns != 0 || ld.MaxClientConns != unlimitedClientConns {
		t.Errorf("client cap before it is derived %d, the listener's default %d; want 0 and %d", lc.MaxClientConns, ld.MaxClientConns, unlimitedClientConns)
	}
	lc.MaxClientConns = ld.MaxClientConns
	if !reflect.DeepEqual(lc, ld) {
		t.Errorf("listen config from the environment's defaults:\n got %+v\nwant %+v", lc, ld)
	}
	if ac, err := cfg.accessConfig(nil); err != nil || ac != (proxy.AccessConfig{}) {
		t.Errorf("access config from the defaults: %+v, %v; want the zero value", ac, err)
	}
}

// TestMattermostPlainAuthOnLoopback is Mattermost's path with client
// authentication: Go's net/smtp sends PLAIN credentials without TLS only to
// a server named "localhost" (or 127.0.0.1 or ::1), and smtppool offers
// AUTH in plain text to a loopback client, so it works; the message is
// relayed only after AUTH.
func TestMattermostPlainAuthOnLoopback(t *testing.T) {
	up, err := memsmtp.Start(memsmtp.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	addr, log, stop := startRun(t, nil, []string{"SMTPPOOL_UPSTREAM_ADDR=" + up.Addr, "SMTPPOOL_UPSTREAM_TLS=none",
		"SMTPPOOL_CLIENT_USERNAME=mattermost", "SMTPPOOL_CLIENT_PASSWORD=pw-s3cret"})

	var clients []*netsmtp.Client
	dial := func(serverName string) *netsmtp.Client {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c, err := netsmtp.NewClient(conn, serverName)
		if err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
		return c
	}

	// Without AUTH: 530 at MAIL.
	c := dial("localhost")
	var protoErr *textproto.Error
	if err := c.Mail("app@example.com"); !errors.As(err, &protoErr) || protoErr.Code != 530 || !strings.HasPrefix(protoErr.Msg, "5.7.0") {
		t.Errorf("MAIL without AUTH: %v, want 530 5.7.0", err)
	}
	// net/smtp's own rule: no PLAIN in plain text to another name, such as
	// the name of the pod or host that Mattermost might be given.
	c = dial("smtppool.internal")
	if err := c.Auth(netsmtp.PlainAuth("", "mattermost", "pw-s3cret", "smtppool.internal")); err == nil {
		t.Error("net/smtp sent PLAIN credentials without TLS to a server not named localhost")
	}
	// Mattermost's settings: server localhost, no TLS, SMTP authentication on.
	c = dial("localhost")
	if ok, mechs := c.Extension("AUTH"); !ok || !strings.Contains(mechs, "PLAIN") {
		t.Fatalf("AUTH offered %v %q to a loopback client, want PLAIN", ok, mechs)
	}
	if err := c.Auth(netsmtp.PlainAuth("", "mattermost", "pw-s3cret", "localhost")); err != nil {
		t.Fatalf("AUTH PLAIN: %v", err)
	}
	if err := c.Mail("app@example.com"); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("user@example.com"); err != nil {
		t.Fatal(err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte("Subject: notification\r\n\r\nbody\r\n"))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	for _, c := range clients {
		c.Close()
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if n := len(up.Messages()); n != 1 {
		t.Errorf("upstream got %d messages, want 1", n)
	}
	if strings.Contains(log.String(), "pw-s3cret") {
		t.Error("the log contains the client password")
	}
}

// TestLogAddressesVariable: at info, smtppool's log carries no envelope
// address unless SMTPPOOL_LOG_ADDRESSES=true.
func TestLogAddressesVariable(t *testing.T) {
	for _, on := range []bool{false, true} {
		up, err := memsmtp.Start(memsmtp.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer up.Close()
		env := []string{"SMTPPOOL_UPSTREAM_ADDR=" + up.Addr, "SMTPPOOL_UPSTREAM_TLS=none", "SMTPPOOL_LOG_LEVEL=info"}
		if on {
			env = append(env, "SMTPPOOL_LOG_ADDRESSES=true")
		}
		addr, log, stop := startRun(t, nil, env)
		c, err := smtp.Dial(addr)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.SendMail("secret-sender@example.com", []string{"secret-rcpt@example.com"}, strings.NewReader("Subject: x\r\n\r\nbody\r\n")); err != nil {
			t.Fatal(err)
		}
		c.Quit()
		if err := stop(); err != nil {
			t.Fatal(err)
		}
		out := log.String()
		if !strings.Contains(out, `"msg":"transaction"`) {
			t.Fatalf("no transaction line:\n%s", out)
		}
		for _, a := range []string{"secret-sender@example.com", "secret-rcpt@example.com"} {
			if strings.Contains(out, a) != on {
				t.Errorf("SMTPPOOL_LOG_ADDRESSES=%v: %s in the log %v:\n%s", on, a, !on, out)
			}
		}
	}
}
