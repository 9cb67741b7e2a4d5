//go:build e2e

package e2e

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"net/smtp"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
	"github.com/smtppool/smtppool/internal/memsmtp"
)

// TestRealClients sends one message with each of swaks, Python's smtplib and
// Go's net/smtp through the proxy, to a Postfix upstream that offers
// STARTTLS with a certificate made by the test: once with the proxy in plain
// text to the upstream, once with STARTTLS required. Each message must
// arrive, and Postfix's Received header and log must show TLS exactly when
// it was asked for.
func TestRealClients(t *testing.T) {
	certFile, keyFile := writeCertificate(t, "127.0.0.1", "localhost")
	pf := startPostfix(t, peers.PostfixOptions{TLSCert: certFile, TLSKey: keyFile})

	modes := []struct {
		name string
		env  map[string]string
		tls  bool
	}{
		{"plain", map[string]string{"SMTPPOOL_UPSTREAM_TLS": "none"}, false},
		{"starttls", map[string]string{"SMTPPOOL_UPSTREAM_TLS": "starttls", "SMTPPOOL_UPSTREAM_CA_FILE": certFile}, true},
	}
	clients := []struct {
		name string
		send func(addr string, m peers.Message) error
	}{
		{"swaks", sendWithSwaks},
		{"python-smtplib", sendWithPython},
		{"go-net-smtp", sendWithNetSMTP},
	}
	for _, mode := range modes {
		t.Run(mode.name, func(t *testing.T) {
			logStart := pf.LogSize()
			proxy := startProxy(t, pf.Addr, mode.env)
			var sent []peers.Message
			for _, c := range clients {
				m := peers.NewMessages("clients-"+mode.name+"-"+c.name, 1)[0]
				start := time.Now()
				if err := c.send(proxy.Addr, m); err != nil {
					t.Errorf("%s through the proxy (%s upstream): %v", c.name, mode.name, err)
					continue
				}
				t.Logf("%s: sent %s in %v", c.name, m.ID, time.Since(start).Round(time.Millisecond))
				sent = append(sent, m)
			}
			box := waitDelivered(t, pf, sent, 30*time.Second)
			for _, m := range sent {
				copies := box[m.ID]
				if len(copies) != 1 {
					t.Errorf("%s: %d copies in the mailbox; want 1", m.ID, len(copies))
					continue
				}
				// Postfix's own Received header is the first one; its
				// protocol (ESMTPS, or UTF8SMTPS when the client asked for
				// SMTPUTF8, as net/smtp does) has an S for TLS.
				received := copies[0].Header.Get("Received")
				proto := receivedProto.FindStringSubmatch(received)
				if proto == nil {
					t.Errorf("%s: no protocol in Postfix's Received header: %s", m.ID, received)
					continue
				}
				if encrypted := proto[1] == "S"; encrypted != mode.tls {
					t.Errorf("%s: upstream session encrypted %v; want %v. Received: %s", m.ID, encrypted, mode.tls, received)
				}
				// The body crossed two SMTP hops intact, a line that
				// starts with a dot included.
				if strings.HasSuffix(m.ID, "go-net-smtp-0."+peers.RunID()+"@e2e.smtppool.test>") {
					b, err := os.ReadFile(copies[0].Path)
					if err != nil {
						t.Fatal(err)
					}
					if want := "\n.A line that starts with a dot, to be dot-stuffed.\n"; !strings.Contains(string(b), want) {
						t.Errorf("%s: body lost the line %q:\n%s", m.ID, strings.TrimSpace(want), b)
					}
				}
			}
			upLog := pf.LogSince(logStart)
			tlsSessions := strings.Count(upLog, "TLS connection established from")
			t.Logf("%s upstream: %d/%d messages delivered; upstream log: %d TLS connections established, %d connections; proxy opened %d sessions",
				mode.name, len(sent), len(clients), tlsSessions, strings.Count(upLog, ": connect from "), proxy.Count("upstream session opened"))
			if mode.tls && tlsSessions == 0 {
				t.Errorf("STARTTLS required, but Postfix logged no \"TLS connection established\"")
			}
			if !mode.tls && tlsSessions > 0 {
				t.Errorf("plain text asked for, but Postfix logged %d TLS connections", tlsSessions)
			}
		})
	}
}

// receivedProto finds the protocol in a Received header written by
// Postfix, such as "with ESMTPS id"; its group is "S" for TLS.
var receivedProto = regexp.MustCompile(`\bwith (?:E|UTF8)?SMTP(S?)A? `)

// writeCertificate makes a self-signed certificate for hosts and writes it
// and its key as PEM files that Postfix can read.
func writeCertificate(t *testing.T, hosts ...string) (certFile, keyFile string) {
	t.Helper()
	cfg, _, err := memsmtp.SelfSigned(hosts...)
	if err != nil {
		t.Fatal(err)
	}
	cert := cfg.Certificates[0]
	key, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	dir := publicDir(t, "tls")
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	write := func(path, kind string, der []byte) {
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(certFile, "CERTIFICATE", cert.Certificate[0])
	write(keyFile, "PRIVATE KEY", key)
	return certFile, keyFile
}

// sendWithSwaks sends m with swaks; its exit code says where it failed.
func sendWithSwaks(addr string, m peers.Message) error {
	out, err := exec.Command("swaks", "--server", addr, "--timeout", "30",
		"--from", m.From, "--to", m.To,
		"--header", "Subject: "+m.Subject, "--header", "Message-Id: "+m.ID,
		"--body", "Sent by swaks through smtppool.").CombinedOutput()
	if err != nil {
		return fmt.Errorf("swaks: %v (exit 21 banner, 23 MAIL, 24 RCPT, 25 DATA, 26 after the dot)\n%s", err, peers.Tail(string(out), 15))
	}
	return nil
}

// pythonClient sends one message with smtplib: host port from to subject
// message-id.
const pythonClient = `
import smtplib, sys
from email.message import EmailMessage
host, port, sender, rcpt, subject, msgid = sys.argv[1:]
m = EmailMessage()
m["From"], m["To"], m["Subject"], m["Message-ID"] = sender, rcpt, subject, msgid
m.set_content("Sent by Python's smtplib through smtppool.\n")
with smtplib.SMTP(host, int(port), timeout=30) as s:
    refused = s.send_message(m)
    if refused:
        sys.exit("refused: %r" % refused)
`

// sendWithPython sends m with Python's smtplib.
func sendWithPython(addr string, m peers.Message) error {
	host, port, _ := net.SplitHostPort(addr)
	out, err := exec.Command("python3", "-c", pythonClient, host, port, m.From, m.To, m.Subject, m.ID).CombinedOutput()
	if err != nil {
		return fmt.Errorf("python3 smtplib: %v\n%s", err, peers.Tail(string(out), 15))
	}
	return nil
}

// sendWithNetSMTP sends m with Go's net/smtp, within a deadline.
func sendWithNetSMTP(addr string, m peers.Message) error {
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	host, _, _ := net.SplitHostPort(addr)
	c, err := smtp.NewClient(conn, host)
	if err != nil {
		return fmt.Errorf("greeting: %w", err)
	}
	if err := c.Hello("go-net-smtp.e2e.test"); err != nil {
		return fmt.Errorf("EHLO: %w", err)
	}
	if err := c.Mail(m.From); err != nil {
		return fmt.Errorf("MAIL: %w", err)
	}
	if err := c.Rcpt(m.To); err != nil {
		return fmt.Errorf("RCPT: %w", err)
	}
	w, err := c.Data()
	if err != nil {
		return fmt.Errorf("DATA: %w", err)
	}
	if _, err := w.Write(m.Bytes()); err != nil {
		return fmt.Errorf("DATA: write: %w", err)
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("end of data: %w", err)
	}
	if err := c.Quit(); err != nil {
		return fmt.Errorf("QUIT: %w", err)
	}
	return nil
}
