package main

import (
	"errors"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/internal/memsmtp"
)

// oauth2Env is a token endpoint and an upstream that accepts only the
// tokens it issued, as Exchange Online does, and the variables that point
// smtppool at them.
func oauth2Env(t *testing.T, secret string) (*memsmtp.TokenIssuer, *memsmtp.Server, []string) {
	t.Helper()
	issuer := &memsmtp.TokenIssuer{ClientID: "app-id", ClientSecret: "sec-Qw7-right", Scope: "https://outlook.office365.com/.default"}
	endpoint := httptest.NewServer(issuer)
	t.Cleanup(endpoint.Close)
	up, err := memsmtp.Start(memsmtp.Options{Username: "mattermost@corp.example", AuthMechanisms: []string{"XOAUTH2"},
		XOAUTH2: &memsmtp.XOAUTH2{Check: issuer.Check}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { up.Close() })
	secretFile := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secretFile, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return issuer, up, []string{"SMTPPOOL_UPSTREAM_ADDR=" + up.Addr, "SMTPPOOL_UPSTREAM_TLS=none",
		"SMTPPOOL_UPSTREAM_ALLOW_INSECURE_AUTH=true", "SMTPPOOL_UPSTREAM_AUTH=xoauth2",
		"SMTPPOOL_UPSTREAM_USERNAME=mattermost@corp.example",
		"SMTPPOOL_OAUTH2_TOKEN_URL=" + endpoint.URL + "/tenant/oauth2/v2.0/token",
		"SMTPPOOL_OAUTH2_CLIENT_ID=app-id", "SMTPPOOL_OAUTH2_CLIENT_SECRET_FILE=" + secretFile,
		"SMTPPOOL_OAUTH2_SCOPES= https://outlook.office365.com/.default ", "SMTPPOOL_RETRY_TIMEOUT=300ms"}
}

// TestXOAUTH2FromTheEnvironment: configured by its variables, smtppool
// fetches a token with the client-credentials grant and relays with it.
func TestXOAUTH2FromTheEnvironment(t *testing.T) {
	issuer, up, env := oauth2Env(t, "sec-Qw7-right")
	addr, log, stop := startRun(t, nil, env)
	for range 3 {
		c, err := smtp.Dial(addr)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.SendMail("app@example.com", []string{"user@example.com"}, strings.NewReader("Subject: x\r\n\r\nbody\r\n")); err != nil {
			t.Fatalf("send: %v", err)
		}
		c.Quit()
	}
	stop()
	if st := up.Stats(); st.Messages != 3 || st.Auths != 1 {
		t.Errorf("upstream: %d messages, %d AUTH; want 3 over one authenticated session", st.Messages, st.Auths)
	}
	if n := issuer.Requests(); n != 1 {
		t.Errorf("token endpoint asked %d times, want 1", n)
	}
	for _, secret := range append(issuer.Issued(), "sec-Qw7-right") {
		if strings.Contains(log.String(), secret) {
			t.Errorf("the log holds a secret or token")
		}
	}
}

// TestXOAUTH2WrongSecretIsTheOperatorsToFix: a token endpoint that refuses
// the client gives 451 4.3.5, a log line in plain words, upstream_up 0,
// and no AUTH at the upstream.
func TestXOAUTH2WrongSecretIsTheOperatorsToFix(t *testing.T) {
	issuer, up, env := oauth2Env(t, "sec-Qw7-wrong")
	addr, log, _ := startRun(t, nil, env)
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Mail("app@example.com", nil)
	var got *smtp.SMTPError
	if !errors.As(err, &got) || got.Code != 451 || got.EnhancedCode != (smtp.EnhancedCode{4, 3, 5}) {
		t.Fatalf("MAIL with a refused client secret: %v, want 451 4.3.5", err)
	}
	if !strings.Contains(log.String(), "refused the client") || !strings.Contains(log.String(), "client secret") {
		t.Errorf("the log does not say that the token endpoint refused the client secret:\n%s", log.String())
	}
	if strings.Contains(log.String(), "sec-Qw7-wrong") {
		t.Error("the log holds the secret")
	}
	_, metrics := httpGet(t, "http://"+adminAddr(t, log)+"/metrics")
	if !strings.Contains(metrics, `smtppool_upstream_up{upstream="`+up.Addr+`"} 0`) {
		t.Error("smtppool_upstream_up is not 0")
	}
	if n := up.Stats().Commands["AUTH"]; n != 0 || issuer.Requests() > 2 {
		t.Errorf("upstream saw %d AUTH and the endpoint %d requests; want none and at most 2", n, issuer.Requests())
	}
}
