package proxy_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/proxy"
)

// The client credentials of these tests.
const (
	clientUser = "mattermost"
	clientPass = "pw-s3cret"
)

// clientAuth requires clientUser and clientPass, with a short pause after
// a wrong password.
func clientAuth() proxy.AccessConfig {
	return proxy.WithAuthFailureDelay(proxy.AccessConfig{Username: clientUser, Password: clientPass}, time.Millisecond)
}

// plainResponse is the base64 initial response of AUTH PLAIN.
func plainResponse(user, pass string) string {
	return base64.StdEncoding.EncodeToString([]byte("\x00" + user + "\x00" + pass))
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

// readAll reads what the server sends until it closes the connection.
func readAll(t *testing.T, addr string) string {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("reading until the server closes: %v (got %q)", err, b)
	}
	return string(b)
}

// countingListener counts the connections its Listener hands to the SMTP
// server.
type countingListener struct {
	*proxy.Listener
	n atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// TestClientOutsideAllowedNetworksGets554: the tests connect from
// 127.0.0.1, which an allowlist of 10.0.0.0/8 leaves out. The client gets
// 554 5.7.1 instead of the greeting and the connection ends; the SMTP
// server never sees the connection and the upstream sees nothing. Clients
// that never read their refusal do not hold up the others.
func TestClientOutsideAllowedNetworksGets554(t *testing.T) {
	e := newEnv(t, options{})
	var logged memsmtp.LogBuffer
	ln, err := proxy.Listen(context.Background(), "127.0.0.1:0", proxy.ListenConfig{
		AllowedNetworks: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")},
		Logger:          slog.New(slog.NewJSONHandler(&logged, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatal(err)
	}
	counted := &countingListener{Listener: ln}
	go e.srv.Serve(counted)
	addr := ln.Addr().String()

	// Clients that connect, send EHLO and MAIL at once, and never read.
	for range 20 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("EHLO client.test\r\nMAIL FROM:<app@example.com>\r\n"))
	}
	start := time.Now()
	got := readAll(t, addr)
	if !strings.HasPrefix(got, "554 5.7.1 ") || strings.Count(got, "\r\n") != 1 {
		t.Errorf("server sent %q, want one 554 5.7.1 line and the end of the connection", got)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("the refusal took %v", took)
	}
	if n := counted.n.Load(); n != 0 {
		t.Errorf("the listener handed %d refused connections to the SMTP server", n)
	}
	if n := ln.Open(); n != 0 {
		t.Errorf("the listener counts %d open connections, want 0", n)
	}
	if st := e.up.Stats(); st.Conns != 0 {
		t.Errorf("upstream saw %d connections, want none", st.Conns)
	}
	// Loopback clients, refused, are most likely smtppool's own liveness
	// check: logged at debug only.
	if lines := strings.Count(logged.String(), `"level":"DEBUG","msg":"client refused: its address is not in SMTPPOOL_ALLOWED_NETWORKS"`); lines != 21 {
		t.Errorf("%d debug lines for 21 refusals of loopback clients:\n%s", lines, logged.String())
	}
	if err := ln.CheckAccepting(context.Background()); err != nil {
		t.Errorf("liveness check of a listener that refuses loopback: %v", err)
	}
	// The allowed listener of the same server still works.
	if err := send(e.dial(t), "app@example.com", []string{"user@example.com"}, message("allowed")); err != nil {
		t.Fatal(err)
	}
}

// TestMaxClientConns: with 3 connections open, a fourth gets 421 4.7.0
// instead of the greeting and is disconnected, with one warning for many;
// once one closes, a new one is greeted.
func TestMaxClientConns(t *testing.T) {
	var logged memsmtp.LogBuffer
	e := newEnv(t, options{listen: proxy.ListenConfig{MaxClientConns: 3, Logger: slog.New(slog.NewJSONHandler(&logged, nil))}})
	var open []*rawClient
	for range 3 {
		open = append(open, rawDial(t, e.addr))
	}
	for range 5 {
		if got := readAll(t, e.addr); got != "421 4.7.0 Too many connections; try again later\r\n" {
			t.Errorf("fourth connection got %q, want 421 4.7.0 and the end of the connection", got)
		}
	}
	// A flood of refusals is one warning every 10 seconds.
	if lines := strings.Count(logged.String(), `"level":"WARN","msg":"client refused: SMTPPOOL_MAX_CLIENT_CONNS connections are open"`); lines != 1 {
		t.Errorf("%d warnings for 5 refusals, want 1:\n%s", lines, logged.String())
	}
	for _, c := range open {
		c.must("EHLO client.test", 250)
	}
	open[0].conn.Close()
	memsmtp.WaitFor(t, "a fourth client to be greeted", func() bool {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			return false
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 512)
		n, _ := c.Read(buf)
		return strings.HasPrefix(string(buf[:n]), "220 ")
	})
	if got := readAll(t, e.addr); !strings.HasPrefix(got, "421 4.7.0 ") {
		t.Errorf("with 3 open again, a new connection got %q, want 421 4.7.0", got)
	}
}

// TestEveryRefusedClientHearsWhy: a flood of clients beyond the cap, all
// connected at once and none reading or closing yet, each get 421 4.7.0
// and the end of the connection, not a silent close, however many there
// are (the code before wrote at most 256 refusals at once and closed the
// rest without a word), and the refusals leave no goroutine behind.
func TestEveryRefusedClientHearsWhy(t *testing.T) {
	const flood = 600
	e := newEnv(t, options{listen: proxy.ListenConfig{MaxClientConns: 1}})
	held := rawDial(t, e.addr) // the one client within the cap
	held.must("EHLO client.test", 250)
	before := runtime.NumGoroutine()
	conns := make([]net.Conn, 0, flood)
	closeAll := func() {
		for _, c := range conns {
			c.Close()
		}
	}
	t.Cleanup(closeAll)
	for range flood {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	silent, other := 0, map[string]int{}
	for _, c := range conns {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(c)
		switch got := string(b); {
		case got == "421 4.7.0 Too many connections; try again later\r\n":
		case got == "":
			silent++
		default:
			other[fmt.Sprintf("%q (%v)", got, err)]++
		}
	}
	if silent > 0 || len(other) > 0 {
		t.Errorf("of %d clients refused at once, %d were disconnected without a reply, and others got %v; want 421 4.7.0 for each",
			flood, silent, other)
	}
	// The clients have not closed yet, so the refusals still wait for them:
	// on a bounded number of goroutines.
	if n := runtime.NumGoroutine() - before; n > 256+20 {
		t.Errorf("%d more goroutines with %d refused clients still connected, want at most about 256", n, flood)
	}
	closeAll()
	memsmtp.WaitFor(t, "the refusals' goroutines to end once their clients closed", func() bool {
		return runtime.NumGoroutine() <= before+5
	})
	held.must("NOOP", 250)
}

// TestClientAuthRequired: with client credentials set, MAIL without AUTH
// gets 530 5.7.0 and nothing reaches the upstream; a wrong password gets
// 535 5.7.8, by PLAIN and by LOGIN, and the third ends the connection;
// the right one, by PLAIN and by LOGIN, lets the message through. The
// password never reaches the log.
func TestClientAuthRequired(t *testing.T) {
	var logged memsmtp.LogBuffer
	e := newEnv(t, options{proxy: proxy.Config{Access: clientAuth(),
		Logger: slog.New(slog.NewJSONHandler(&logged, &slog.HandlerOptions{Level: slog.LevelDebug}))}})

	c := rawDial(t, e.addr)
	c.write("EHLO client.test\r\n")
	if code, msg := c.reply(); code != 250 || !strings.Contains(msg, "AUTH PLAIN LOGIN") {
		t.Errorf("EHLO from loopback: %d %q, want AUTH PLAIN LOGIN offered", code, msg)
	}
	if code, msg := c.cmd("MAIL FROM:<app@example.com>"); code != 530 || !strings.HasPrefix(msg, "5.7.0 Authentication required") {
		t.Errorf("MAIL without AUTH: %d %s, want 530 5.7.0 Authentication required", code, msg)
	}
	if code, msg := c.cmd("AUTH PLAIN " + plainResponse(clientUser, "wrong-password")); code != 535 || !strings.HasPrefix(msg, "5.7.8") {
		t.Errorf("AUTH PLAIN with a wrong password: %d %s, want 535 5.7.8", code, msg)
	}
	if code, msg := c.cmd("AUTH LOGIN"); code != 334 || msg != b64("Username:") {
		t.Fatalf("AUTH LOGIN: %d %s, want 334 Username:", code, msg)
	}
	if code, msg := c.cmd(b64(clientUser)); code != 334 || msg != b64("Password:") {
		t.Fatalf("LOGIN user name: %d %s, want 334 Password:", code, msg)
	}
	if code, msg := c.cmd(b64("wrong-password")); code != 535 || !strings.HasPrefix(msg, "5.7.8") {
		t.Errorf("AUTH LOGIN with a wrong password: %d %s, want 535 5.7.8", code, msg)
	}
	if code, msg := c.cmd("AUTH PLAIN " + plainResponse("someone-else", clientPass)); code != 535 {
		t.Errorf("AUTH PLAIN with a wrong user name: %d %s, want 535", code, msg)
	}
	if code, msg := c.cmd("NOOP"); code != 0 {
		t.Errorf("after three failures the connection is still open: NOOP got %d %s", code, msg)
	}
	if st := e.up.Stats(); st.Conns != 0 {
		t.Errorf("upstream saw %d connections before any client authenticated", st.Conns)
	}

	for _, mech := range []sasl.Client{sasl.NewPlainClient("", clientUser, clientPass), sasl.NewLoginClient(clientUser, clientPass)} {
		name, _, _ := mech.Start()
		c := e.dial(t)
		if err := c.Auth(mech); err != nil {
			t.Fatalf("AUTH %s with the right password: %v", name, err)
		}
		if err := send(c, "app@example.com", []string{"user@example.com"}, message("auth-"+name)); err != nil {
			t.Errorf("after AUTH %s: %v", name, err)
		}
	}
	// LOGIN with the user name as initial response, as some clients send.
	c = rawDial(t, e.addr)
	c.must("EHLO client.test", 250)
	c.must("AUTH LOGIN "+b64(clientUser), 334)
	c.must(b64(clientPass), 235)
	c.must("MAIL FROM:<app@example.com>", 250)

	if n := len(e.up.Messages()); n != 2 {
		t.Errorf("upstream got %d messages, want 2", n)
	}
	if out := logged.String(); strings.Contains(out, clientPass) || strings.Contains(out, "wrong-password") ||
		strings.Contains(out, plainResponse(clientUser, clientPass)) {
		t.Errorf("the log shows a password:\n%s", out)
	}
	if n := strings.Count(logged.String(), "client authentication failed"); n != 3 {
		t.Errorf("%d failed authentications logged, want 3", n)
	}
}

// nonLoopbackIP returns an address of this machine beyond loopback, or
// skips the test.
func nonLoopbackIP(t *testing.T) netip.Addr {
	t.Helper()
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Skipf("interface addresses: %v", err)
	}
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is4() && !p.Addr().IsLoopback() {
			return p.Addr()
		}
	}
	t.Skip("no IPv4 address beyond loopback to connect from")
	return netip.Addr{}
}

// TestAuthOverPlaintextOnlyFromLoopback: a client that connects from an
// address beyond loopback is not offered AUTH in plain text, and AUTH gets
// 538 5.7.11, so its password never crosses the network in clear text;
// after STARTTLS it is offered AUTH and may send. (TestClientAuthRequired
// shows the loopback client offered AUTH in plain text.)
func TestAuthOverPlaintextOnlyFromLoopback(t *testing.T) {
	ip := nonLoopbackIP(t)
	files := newCertFiles(t, ip.String())
	access := clientAuth()
	access.TLSConfig = files.reloader(t, nil).TLSConfig()
	e := newEnv(t, options{proxy: proxy.Config{Access: access}, listenAddr: net.JoinHostPort(ip.String(), "0"),
		listen: proxy.ListenConfig{AllowedNetworks: []netip.Prefix{netip.PrefixFrom(ip, 32)}}})

	dial := func() net.Conn {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: ip.AsSlice()}, Timeout: 5 * time.Second}
		conn, err := d.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	c := smtp.NewClient(dial())
	if err := c.Hello("client.test"); err != nil {
		t.Fatal(err)
	}
	if ok, mechs := c.Extension("AUTH"); ok {
		t.Errorf("AUTH %s offered in plain text to %s", mechs, ip)
	}
	if ok, _ := c.Extension("STARTTLS"); !ok {
		t.Error("STARTTLS not offered")
	}
	var smtpErr *smtp.SMTPError
	if err := c.Auth(sasl.NewPlainClient("", clientUser, clientPass)); !errors.As(err, &smtpErr) || smtpErr.Code != 538 {
		t.Errorf("AUTH PLAIN in plain text from %s: %v, want 538 5.7.11", ip, err)
	}
	if err := c.Mail("app@example.com", nil); !errors.As(err, &smtpErr) || smtpErr.Code != 530 {
		t.Errorf("MAIL without AUTH: %v, want 530", err)
	}

	c, err := smtp.NewClientStartTLS(dial(), &tls.Config{RootCAs: files.roots, ServerName: ip.String()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Hello("client.test"); err != nil {
		t.Fatal(err)
	}
	if ok, mechs := c.Extension("AUTH"); !ok || mechs != "PLAIN LOGIN" {
		t.Errorf("after STARTTLS: AUTH offered %v (%q), want PLAIN LOGIN", ok, mechs)
	}
	if err := c.Auth(sasl.NewPlainClient("", clientUser, clientPass)); err != nil {
		t.Fatalf("AUTH PLAIN over TLS: %v", err)
	}
	if err := send(c, "app@example.com", []string{"user@example.com"}, message("remote-tls")); err != nil {
		t.Fatal(err)
	}
}

// TestStartTLSAndRequireTLS: with a certificate, STARTTLS is offered; with
// SMTPPOOL_LISTEN_REQUIRE_TLS, MAIL and AUTH before it are refused, to a
// loopback client too, and nothing reaches the upstream; after it, the
// client authenticates and sends.
func TestStartTLSAndRequireTLS(t *testing.T) {
	files := newCertFiles(t, "127.0.0.1", "localhost")
	access := clientAuth()
	access.TLSConfig, access.RequireTLS = files.reloader(t, nil).TLSConfig(), true
	e := newEnv(t, options{proxy: proxy.Config{Access: access}})

	c := rawDial(t, e.addr)
	c.write("EHLO client.test\r\n")
	if code, msg := c.reply(); code != 250 || !strings.Contains(msg, "STARTTLS") || strings.Contains(msg, "AUTH") {
		t.Errorf("EHLO before STARTTLS: %d %q, want STARTTLS and no AUTH", code, msg)
	}
	if code, msg := c.cmd("MAIL FROM:<app@example.com>"); code != 530 || msg != "5.7.0 Must issue a STARTTLS command first" {
		t.Errorf("MAIL before STARTTLS: %d %s, want 530 5.7.0 Must issue a STARTTLS command first", code, msg)
	}
	if code, msg := c.cmd("AUTH PLAIN " + plainResponse(clientUser, clientPass)); code != 538 {
		t.Errorf("AUTH before STARTTLS: %d %s, want 538", code, msg)
	}

	tc, err := smtp.DialStartTLS(e.addr, &tls.Config{RootCAs: files.roots, ServerName: "localhost"})
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	if err := tc.Auth(sasl.NewPlainClient("", clientUser, clientPass)); err != nil {
		t.Fatalf("AUTH after STARTTLS: %v", err)
	}
	if state, ok := tc.TLSConnectionState(); !ok || state.Version < tls.VersionTLS12 {
		t.Errorf("TLS state %v %x, want TLS 1.2 or later", ok, state.Version)
	}
	if err := send(tc, "app@example.com", []string{"user@example.com"}, message("tls")); err != nil {
		t.Fatal(err)
	}
	if n := len(e.up.Messages()); n != 1 {
		t.Errorf("upstream got %d messages, want 1", n)
	}
	// The 221 to QUIT reaches the client over TLS before the close.
	if err := tc.Quit(); err != nil {
		t.Errorf("QUIT over TLS: %v", err)
	}
}

// TestCertificateReloadedWhenFilesChange: new certificate files are
// served once they are written; files that do not load leave the last good
// certificate in service.
func TestCertificateReloadedWhenFilesChange(t *testing.T) {
	files := newCertFiles(t, "127.0.0.1", "localhost")
	var logged memsmtp.LogBuffer
	r := files.reloader(t, slog.New(slog.NewJSONHandler(&logged, nil)))
	r.SetCheckInterval(10 * time.Millisecond)
	e := newEnv(t, options{proxy: proxy.Config{Access: proxy.AccessConfig{TLSConfig: r.TLSConfig()}}})

	served := func() *big.Int {
		var serial *big.Int
		cfg := &tls.Config{InsecureSkipVerify: true, VerifyConnection: func(cs tls.ConnectionState) error {
			serial = cs.PeerCertificates[0].SerialNumber
			return nil
		}}
		c, err := smtp.DialStartTLS(e.addr, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Noop(); err != nil {
			t.Fatal(err)
		}
		return serial
	}
	first := files.serial
	if got := served(); got.Cmp(first) != 0 {
		t.Fatalf("served serial %v, want %v", got, first)
	}

	files.replace(t, []byte("not a certificate"), nil)
	memsmtp.WaitFor(t, "the broken files to be noticed", func() bool {
		return served().Cmp(first) == 0 && strings.Contains(logged.String(), "do not load")
	})
	if n := strings.Count(logged.String(), "do not load"); n != 1 {
		t.Errorf("the broken files were logged %d times, want once", n)
	}

	files.write(t, "127.0.0.1", "localhost")
	memsmtp.WaitFor(t, "the new certificate to be served", func() bool { return served().Cmp(files.serial) == 0 })
	if !strings.Contains(logged.String(), "listener certificate reloaded") {
		t.Errorf("no reload in the log:\n%s", logged.String())
	}
}

// TestAddressesOnlyAtDebugOrWhenAsked: at info, neither the transaction
// line nor the warning about an upstream refusal carries an envelope
// address, even one quoted in the upstream's reply; with LogAddresses, or
// at debug, the transaction line has them.
func TestAddressesOnlyAtDebugOrWhenAsked(t *testing.T) {
	for _, tt := range []struct {
		name      string
		level     slog.Level
		addresses bool
	}{
		{"info", slog.LevelInfo, false},
		{"info with LogAddresses", slog.LevelInfo, true},
		{"debug", slog.LevelDebug, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var logged memsmtp.LogBuffer
			e := newEnv(t, options{proxy: proxy.Config{Access: proxy.AccessConfig{LogAddresses: tt.addresses},
				Logger: slog.New(slog.NewJSONHandler(&logged, &slog.HandlerOptions{Level: tt.level}))}})
			e.up.Inject(memsmtp.Rcpt, memsmtp.Fault{Reply: &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1},
				Message: "<nobody-rcpt@example.com>: Recipient address rejected"}})
			c := e.dial(t)
			if err := send(c, "secret-sender@example.com", []string{"nobody-rcpt@example.com"}, message("refused")); err == nil {
				t.Fatal("refused recipient accepted")
			}
			c.Reset()
			if err := send(c, "secret-sender@example.com", []string{"secret-rcpt@example.com"}, message("sent")); err != nil {
				t.Fatal(err)
			}
			c.Quit()
			memsmtp.WaitFor(t, "two transaction lines", func() bool { return strings.Count(logged.String(), `"msg":"transaction"`) == 2 })
			out := logged.String()
			if !strings.Contains(out, "upstream failure, client told") {
				t.Fatalf("no warning about the refusal:\n%s", out)
			}
			want := tt.addresses || tt.level == slog.LevelDebug
			for _, addr := range []string{"secret-sender@example.com", "secret-rcpt@example.com", "nobody-rcpt@example.com"} {
				if strings.Contains(out, addr) != want {
					t.Errorf("address %s in the log: %v, want %v:\n%s", addr, !want, want, out)
				}
			}
			if !want && !strings.Contains(out, "<[address]>: Recipient address rejected") {
				t.Errorf("the upstream's reply is not in the warning, masked:\n%s", out)
			}
		})
	}
}

// certFiles are a certificate and key in PEM files, and the roots that
// trust the certificate last written.
type certFiles struct {
	cert, key string
	roots     *x509.CertPool
	serial    *big.Int
}

func newCertFiles(t *testing.T, hosts ...string) *certFiles {
	dir := t.TempDir()
	f := &certFiles{cert: filepath.Join(dir, "cert.pem"), key: filepath.Join(dir, "key.pem")}
	f.write(t, hosts...)
	return f
}

// write makes a new self-signed certificate for hosts and replaces the
// files with it.
func (f *certFiles) write(t *testing.T, hosts ...string) {
	t.Helper()
	cfg, roots, err := memsmtp.SelfSigned(hosts...)
	if err != nil {
		t.Fatal(err)
	}
	cert := cfg.Certificates[0]
	key, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	f.replace(t, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key}))
	f.roots, f.serial = roots, cert.Leaf.SerialNumber
}

// replace writes new contents into the files (nil leaves one alone), by
// renaming a new file over each, as deployment tools do.
func (f *certFiles) replace(t *testing.T, cert, key []byte) {
	t.Helper()
	for _, w := range []struct {
		path string
		b    []byte
	}{{f.key, key}, {f.cert, cert}} {
		if w.b == nil {
			continue
		}
		tmp := w.path + ".new"
		if err := os.WriteFile(tmp, w.b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, w.path); err != nil {
			t.Fatal(err)
		}
	}
}

func (f *certFiles) reloader(t *testing.T, logger *slog.Logger) *proxy.CertReloader {
	t.Helper()
	r, err := proxy.NewCertReloader(f.cert, f.key, logger)
	if err != nil {
		t.Fatal(err)
	}
	return r
}
