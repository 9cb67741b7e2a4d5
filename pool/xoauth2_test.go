package pool

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/textproto"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/internal/memsmtp"
)

// staticTokens is a TokenSource that hands out a fixed list of tokens, one
// after each Invalidate, and records the invalidations.
type staticTokens struct {
	mu          sync.Mutex
	tokens      []string
	err         error
	invalidated []string
}

func (s *staticTokens) Token(context.Context) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return "", s.err
	}
	return s.tokens[0], nil
}

func (s *staticTokens) Invalidate(token string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.invalidated = append(s.invalidated, token)
	if len(s.tokens) > 1 && s.tokens[0] == token {
		s.tokens = s.tokens[1:]
	}
}

func (s *staticTokens) String() string { return "staticTokens" }

func TestXOAUTH2ClientExchange(t *testing.T) {
	c := &xoauth2Client{user: "mbox@corp.example", token: "ya29.tok-en_1~/+=="}
	mech, ir, err := c.Start()
	if mech != "XOAUTH2" || ir != nil || err != nil {
		t.Fatalf("Start() = %q, %q (nil: %v), %v; want XOAUTH2 and a nil initial response", mech, ir, ir == nil, err)
	}
	resp, err := c.Next([]byte{}) // the server's "334 "
	if want := "user=mbox@corp.example\x01auth=Bearer ya29.tok-en_1~/+==\x01\x01"; string(resp) != want || err != nil {
		t.Fatalf("Next(first 334) = %q, %v; want %q", resp, err, want)
	}
	resp, err = c.Next([]byte(`{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}`))
	if resp == nil || len(resp) != 0 || err != nil {
		t.Fatalf("Next(error challenge) = %q (nil: %v), %v; want an empty, non-nil response", resp, resp == nil, err)
	}
	if c.status != "401" || !strings.Contains(c.challenge, `scope "https://mail.google.com/"`) {
		t.Errorf("challenge kept as status %q, %q", c.status, c.challenge)
	}
	if _, err := c.Next([]byte("again")); !errors.Is(err, sasl.ErrUnexpectedServerChallenge) {
		t.Errorf("Next(third 334) = %v, want ErrUnexpectedServerChallenge", err)
	}
}

func TestIsBearerToken(t *testing.T) {
	tests := []struct {
		token string
		want  bool
	}{
		{"eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL291dGxvb2sub2ZmaWNlMzY1LmNvbSJ9.c2ln", true},
		{"ya29.a0AfH6SMB-x_y~z+/==", true},
		{"", false},
		{"==", false},
		{"two words", false},
		{"tok\x01en", false},
		{"tok\nen", false},
		{"a=b", false},
		{"tök", false},
	}
	for _, tt := range tests {
		if got := isBearerToken(tt.token); got != tt.want {
			t.Errorf("isBearerToken(%q) = %v, want %v", tt.token, got, tt.want)
		}
	}
}

// scriptedServer accepts one connection on 127.0.0.1 and plays an SMTP
// server that offers AUTH XOAUTH2 and answers the AUTH exchange with
// replies, one after each line it reads. It returns the lines it read from
// AUTH on, exactly.
func scriptedServer(t *testing.T, replies ...string) (addr string, lines <-chan []string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	out := make(chan []string, 1)
	go func() {
		var got []string
		defer func() { out <- got }()
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		tp := textproto.NewConn(conn)
		tp.PrintfLine("220 scripted.test ESMTP")
		if l, err := tp.ReadLine(); err != nil || !strings.HasPrefix(l, "EHLO ") {
			return
		}
		tp.PrintfLine("250-scripted.test")
		tp.PrintfLine("250 AUTH PLAIN XOAUTH2")
		for _, reply := range replies {
			l, err := tp.ReadLine()
			if err != nil {
				return
			}
			got = append(got, l)
			tp.PrintfLine("%s", reply)
		}
		for { // QUIT or whatever follows
			l, err := tp.ReadLine()
			if err != nil {
				return
			}
			got = append(got, l)
			if l == "QUIT" {
				tp.PrintfLine("221 bye")
				return
			}
			tp.PrintfLine("250 ok")
		}
	}()
	return ln.Addr().String(), out
}

// authOnce runs what the pool's authenticate does, with a's refusal
// handling, over a new connection to addr.
func authOnce(t *testing.T, addr string, a Authenticator) error {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c := smtp.NewClient(conn)
	defer c.Close()
	if err := c.Hello("localhost"); err != nil {
		t.Fatal(err)
	}
	_, mechs := c.Extension("AUTH")
	sc, err := a.SASLClient(context.Background(), strings.Fields(mechs))
	if err != nil {
		return fmt.Errorf("auth: %w", err)
	}
	if err := c.Auth(sc); err != nil {
		return fmt.Errorf("auth: %w", authRefused(a, sc, err))
	}
	c.Quit()
	return nil
}

// The exact lines on the wire: AUTH without an initial response, the
// payload after the 334, and an empty line after Google's challenge. (After
// a failure reply go-smtp's client sends "*" as if the exchange were still
// open; the server answers it as an unknown command, and the pool closes
// the session anyway.)
func TestXOAUTH2OnTheWire(t *testing.T) {
	const user = "mbox@corp.example"
	longToken := "eyJ0eXAiOiJKV1Qi." + strings.Repeat("A", 3000) + ".sig" // Entra's run to kilobytes
	payload := func(token string) string {
		return base64.StdEncoding.EncodeToString([]byte("user=" + user + "\x01auth=Bearer " + token + "\x01\x01"))
	}
	googleChallenge := base64.StdEncoding.EncodeToString([]byte(`{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}`))
	tests := []struct {
		name        string
		token       string
		replies     []string
		wantLines   []string
		wantErr     error // sentinel the error wraps; nil for success
		wantCode    smtp.EnhancedCode
		wantText    string // in the error
		invalidated bool
	}{
		{name: "accepted", token: "tok1", replies: []string{"334 ", "235 2.7.0 Authentication successful"},
			wantLines: []string{"AUTH XOAUTH2", payload("tok1"), "QUIT"}},
		{name: "long Entra token goes after the 334", token: longToken, replies: []string{"334 ", "235 2.7.0 Authentication successful"},
			wantLines: []string{"AUTH XOAUTH2", payload(longToken), "QUIT"}},
		{name: "Exchange: bad or expired token", token: "tok1", replies: []string{"334 ", "535 5.7.3 Authentication unsuccessful"},
			wantLines: []string{"AUTH XOAUTH2", payload("tok1"), "*"}, wantErr: ErrTokenNotAccepted, wantCode: smtp.EnhancedCode{5, 7, 3},
			wantText: "Authentication unsuccessful", invalidated: true},
		{name: "Exchange: SMTP AUTH disabled", token: "tok1",
			replies:   []string{"334 ", "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."},
			wantLines: []string{"AUTH XOAUTH2", payload("tok1"), "*"}, wantErr: ErrAuthDisabled, wantCode: smtp.EnhancedCode{5, 7, 139},
			wantText: "Set-CASMailbox"},
		{name: "Google: JSON challenge, empty line, final reply", token: "tok1",
			replies: []string{"334 ", "334 " + googleChallenge,
				"535-5.7.8 Username and Password not accepted. For more information, go to\r\n535 5.7.8  https://support.google.com/mail/?p=BadCredentials x1-20020a"},
			wantLines: []string{"AUTH XOAUTH2", payload("tok1"), "", "*"}, wantErr: ErrTokenNotAccepted, wantCode: smtp.EnhancedCode{5, 7, 8},
			wantText: `Username and Password not accepted`, invalidated: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr, lines := scriptedServer(t, tt.replies...)
			src := &staticTokens{tokens: []string{tt.token, "tok2"}}
			err := authOnce(t, addr, OAuth2Auth{Username: user, Tokens: src})
			if got := <-lines; !equalLines(got, tt.wantLines) {
				t.Errorf("server read %q, want %q", abbreviate(got), abbreviate(tt.wantLines))
			}
			if tt.wantErr == nil {
				if err != nil {
					t.Fatalf("auth: %v", err)
				}
				return
			}
			var smtpErr *smtp.SMTPError
			if !errors.Is(err, tt.wantErr) || !errors.As(err, &smtpErr) || smtpErr.Code != 535 || smtpErr.EnhancedCode != tt.wantCode {
				t.Fatalf("auth: %v; want %v wrapping the server's 535 %v", err, tt.wantErr, tt.wantCode)
			}
			if !strings.Contains(err.Error(), tt.wantText) {
				t.Errorf("error %q does not mention %q", err, tt.wantText)
			}
			if strings.Contains(err.Error(), tt.token) {
				t.Errorf("error shows the token: %v", err)
			}
			if got := len(src.invalidated) == 1 && src.invalidated[0] == tt.token; got != tt.invalidated {
				t.Errorf("invalidated %q; want the token invalidated: %v", src.invalidated, tt.invalidated)
			}
		})
	}
}

func equalLines(a, b []string) bool {
	return strings.Join(a, "\n") == strings.Join(b, "\n") && len(a) == len(b)
}

func abbreviate(lines []string) []string {
	out := make([]string, len(lines))
	for i, l := range lines {
		if len(l) > 60 {
			l = fmt.Sprintf("%s...(%d bytes)", l[:60], len(l))
		}
		out[i] = l
	}
	return out
}

// Google's challenge is part of the error; its status tells an expired
// token (401) from other trouble, which does not drop the token.
func TestGoogleChallengeInError(t *testing.T) {
	challenge := base64.StdEncoding.EncodeToString([]byte(`{"status":"400","schemes":"bearer","scope":"https://mail.google.com/"}`))
	addr, lines := scriptedServer(t, "334 ", "334 "+challenge, "535 5.7.8 Username and Password not accepted")
	src := &staticTokens{tokens: []string{"tok1"}}
	err := authOnce(t, addr, OAuth2Auth{Username: "mbox@corp.example", Tokens: src})
	<-lines
	var smtpErr *smtp.SMTPError
	if !errors.As(err, &smtpErr) || smtpErr.Code != 535 || errors.Is(err, ErrTokenNotAccepted) {
		t.Fatalf("auth: %v; want the 535, not ErrTokenNotAccepted", err)
	}
	if want := `XOAUTH2 challenge: status "400", schemes "bearer", scope "https://mail.google.com/"`; !strings.Contains(err.Error(), want) {
		t.Errorf("error %q lacks %q", err, want)
	}
	if len(src.invalidated) != 0 {
		t.Errorf("token invalidated after a status 400 challenge")
	}
}

func TestOAuth2AuthSASLClient(t *testing.T) {
	refused := fmt.Errorf("%w: no", ErrTokenRefused)
	tests := []struct {
		name    string
		auth    OAuth2Auth
		mechs   []string
		wantErr error
		wantMsg string
	}{
		{name: "XOAUTH2 offered", auth: OAuth2Auth{Username: "m@x", Tokens: &staticTokens{tokens: []string{"t"}}},
			mechs: []string{"PLAIN", "xoauth2"}},
		{name: "XOAUTH2 not offered", auth: OAuth2Auth{Username: "m@x", Tokens: &staticTokens{tokens: []string{"t"}}},
			mechs: []string{"PLAIN", "LOGIN"}, wantErr: ErrAuthUnavailable},
		{name: "token endpoint refuses", auth: OAuth2Auth{Username: "m@x", Tokens: &staticTokens{err: refused}},
			mechs: []string{"XOAUTH2"}, wantErr: ErrTokenRefused},
		{name: "not a bearer token", auth: OAuth2Auth{Username: "m@x", Tokens: &staticTokens{tokens: []string{"secret token\x01"}}},
			mechs: []string{"XOAUTH2"}, wantMsg: "cannot have"},
		{name: "control character in user", auth: OAuth2Auth{Username: "m@x\x01", Tokens: &staticTokens{tokens: []string{"t"}}},
			mechs: []string{"XOAUTH2"}, wantMsg: "control characters"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sc, err := tt.auth.SASLClient(context.Background(), tt.mechs)
			switch {
			case tt.wantErr == nil && tt.wantMsg == "":
				if err != nil || sc == nil {
					t.Fatalf("SASLClient: %v", err)
				}
			case tt.wantErr != nil && !errors.Is(err, tt.wantErr):
				t.Fatalf("SASLClient: %v, want %v", err, tt.wantErr)
			case tt.wantMsg != "" && (err == nil || !strings.Contains(err.Error(), tt.wantMsg)):
				t.Fatalf("SASLClient: %v, want an error about %q", err, tt.wantMsg)
			}
			if err != nil && strings.Contains(err.Error(), "secret token") {
				t.Errorf("error shows the token: %v", err)
			}
		})
	}
}

// authRefused leaves other authenticators' errors alone, except that it
// names a disabled SMTP AUTH.
func TestAuthRefusedWithPasswordAuth(t *testing.T) {
	disabled := &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 139}, Message: "Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."}
	wrong := &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 3}, Message: "Authentication unsuccessful"}
	a := PasswordAuth{Username: "u", Password: "p"}
	if err := authRefused(a, nil, disabled); !errors.Is(err, ErrAuthDisabled) || !errors.Is(err, disabled) {
		t.Errorf("535 5.7.139: %v, want ErrAuthDisabled wrapping the reply", err)
	}
	if err := authRefused(a, nil, wrong); err != wrong {
		t.Errorf("535 5.7.3 to a password: %v, want the reply as it is", err)
	}
}

// The refresh the pool's handshake does on 535 5.7.3: the refused token
// is dropped, and the next session, with a fresh token, gets in. The
// upstream is memsmtp with a real token endpoint's judgement.
func TestRefusedTokenIsReplacedForTheNextSession(t *testing.T) {
	issuer := &memsmtp.TokenIssuer{ClientID: "app", ClientSecret: "s3cret"}
	endpoint := startTokenEndpoint(t, issuer)
	up, err := memsmtp.Start(memsmtp.Options{Username: "mbox@corp.example", AuthMechanisms: []string{"XOAUTH2"},
		XOAUTH2: &memsmtp.XOAUTH2{Check: issuer.Check}})
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	src, err := NewClientCredentialsTokenSource(ClientCredentials{TokenURL: endpoint, ClientID: "app", ClientSecret: "s3cret"})
	if err != nil {
		t.Fatal(err)
	}
	auth := OAuth2Auth{Username: "mbox@corp.example", Tokens: src}
	if err := authOnce(t, up.Addr, auth); err != nil {
		t.Fatal(err)
	}
	first, _ := src.Token(context.Background())
	issuer.Revoke(first) // the upstream no longer takes it; the source does not know

	err = authOnce(t, up.Addr, auth)
	if !errors.Is(err, ErrTokenNotAccepted) || !isExpiredTokenReply(err) {
		t.Fatalf("auth with a revoked token: %v, want ErrTokenNotAccepted wrapping 535 5.7.3", err)
	}
	if err := authOnce(t, up.Addr, auth); err != nil {
		t.Fatalf("auth on a fresh session: %v", err)
	}
	if n := issuer.Requests(); n != 2 {
		t.Errorf("token endpoint got %d requests, want 2", n)
	}
	if st := up.Stats(); st.Auths != 2 {
		t.Errorf("upstream counted %d AUTH, want 2", st.Auths)
	}
}
