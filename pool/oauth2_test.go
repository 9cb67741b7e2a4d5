package pool_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
)

const (
	mailbox      = "mattermost@corp.example"
	clientID     = "11111111-2222-3333-4444-555555555555"
	clientSecret = "Xy7~client.secret-value_do-not-print"
	scope        = "https://outlook.office365.com/.default"
)

// oauth2Upstream is an XOAUTH2 upstream over STARTTLS that accepts only
// unexpired tokens from its token endpoint, which runs over HTTP.
type oauth2Upstream struct {
	issuer   *memsmtp.TokenIssuer
	tokenURL string
	up       *memsmtp.Server
	tls      *tls.Config // for the pool
}

func startOAuth2Upstream(t *testing.T, lifetime time.Duration, google bool) *oauth2Upstream {
	t.Helper()
	serverTLS, roots, err := memsmtp.SelfSigned("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	issuer := &memsmtp.TokenIssuer{ClientID: clientID, ClientSecret: clientSecret, Scope: scope, Lifetime: lifetime,
		TokenBytes: 1500} // an Entra-sized token: the payload line is over 2 KB
	endpoint := httptest.NewServer(issuer)
	t.Cleanup(endpoint.Close)
	up := startUpstream(t, memsmtp.Options{TLS: serverTLS, Username: mailbox, AuthMechanisms: []string{"XOAUTH2"},
		XOAUTH2: &memsmtp.XOAUTH2{Check: issuer.Check, GoogleChallenge: google}})
	return &oauth2Upstream{issuer: issuer, tokenURL: endpoint.URL + "/tenant/oauth2/v2.0/token", up: up,
		tls: &tls.Config{RootCAs: roots}}
}

// clientCredentials returns a token source for u with secret.
func (u *oauth2Upstream) clientCredentials(t *testing.T, secret string, log *slog.Logger) *pool.ClientCredentialsTokenSource {
	t.Helper()
	src, err := pool.NewClientCredentialsTokenSource(pool.ClientCredentials{TokenURL: u.tokenURL, ClientID: clientID,
		ClientSecret: secret, Scopes: []string{scope}, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	return src
}

// pool returns a pool to u that authenticates with tokens.
func (u *oauth2Upstream) pool(t *testing.T, tokens pool.TokenSource, cfg pool.Config) *pool.Pool {
	t.Helper()
	cfg.TLS, cfg.TLSConfig = pool.TLSStartTLS, u.tls
	cfg.Auth = pool.OAuth2Auth{Username: mailbox, Tokens: tokens}
	return newPool(t, u.up, cfg)
}

// writeTokenFile replaces the file at path with token, as an agent does:
// a new file renamed into place.
func writeTokenFile(t *testing.T, path, token string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func TestOAuth2MailFlows(t *testing.T) {
	for _, google := range []bool{false, true} {
		for _, source := range []string{"client credentials", "token file"} {
			t.Run(fmt.Sprintf("%s, Google %v", source, google), func(t *testing.T) {
				u := startOAuth2Upstream(t, time.Hour, google)
				var tokens pool.TokenSource = u.clientCredentials(t, clientSecret, nil)
				if source == "token file" {
					path := filepath.Join(t.TempDir(), "token")
					writeTokenFile(t, path, u.issuer.Issue())
					var err error
					if tokens, err = pool.NewFileTokenSource(path); err != nil {
						t.Fatal(err)
					}
				}
				p := u.pool(t, tokens, pool.Config{})
				for i := range 3 {
					c := acquire(t, p)
					if err := send(c, i); err != nil {
						t.Fatal(err)
					}
					c.Release()
				}
				if st := u.up.Stats(); st.Auths != 1 || st.Commands["AUTH"] != 1 || st.Messages != 3 {
					t.Errorf("upstream saw %d AUTH commands, %d accepted, %d messages; want 1, 1, 3", st.Commands["AUTH"], st.Auths, st.Messages)
				}
				if n := len(u.issuer.Issued()); n != 1 {
					t.Errorf("%d tokens issued, want 1", n)
				}
			})
		}
	}
}

// A session outlives its token: it stays authenticated and keeps sending.
// The session that replaces it needs, and gets, a new token.
func TestOAuth2TokenExpiresWhileSessionSitsInThePool(t *testing.T) {
	u := startOAuth2Upstream(t, time.Second, false)
	p := u.pool(t, u.clientCredentials(t, clientSecret, nil), pool.Config{MaxConnLifetime: 2 * time.Second})

	c := acquire(t, p)
	acquired := time.Now() // the session and its token are older
	first := c.ID()
	if err := send(c, 1); err != nil {
		t.Fatal(err)
	}
	c.Release()
	tokenA := u.issuer.Issued()[0]
	expiry, _ := u.issuer.Expiry(tokenA)
	time.Sleep(time.Until(expiry)) // the token expires; nothing to wait on but time
	if err := u.issuer.Check(mailbox, tokenA); !errors.Is(err, memsmtp.ErrTokenExpired) {
		t.Fatalf("token A: %v, want expired", err)
	}

	c = acquire(t, p)
	if c.ID() != first {
		t.Fatalf("session %d, want %d: the session is younger than MaxConnLifetime", c.ID(), first)
	}
	if err := send(c, 2); err != nil {
		t.Fatalf("send on a session whose token has expired: %v", err)
	}
	c.Release()

	time.Sleep(time.Until(acquired.Add(2 * time.Second))) // the session reaches MaxConnLifetime
	c = acquire(t, p)
	if c.ID() == first {
		t.Fatal("session past MaxConnLifetime reused")
	}
	if err := send(c, 3); err != nil {
		t.Fatalf("send on a new session: %v", err)
	}
	c.Release()

	st := u.up.Stats()
	if st.Messages != 3 || st.Auths != 2 || st.Commands["AUTH"] != 2 {
		t.Errorf("upstream saw %d messages, %d AUTH commands, %d accepted; want 3, 2, 2 (no refused AUTH)",
			st.Messages, st.Commands["AUTH"], st.Auths)
	}
	if n := u.issuer.Requests(); n != 2 {
		t.Errorf("token endpoint got %d requests, want 2", n)
	}
}

// Sessions come and go many times over several token lifetimes, from
// concurrent senders; every message goes through and no AUTH is refused,
// with far fewer token requests than sessions.
func TestOAuth2MailFlowsAcrossTokenLifetimes(t *testing.T) {
	u := startOAuth2Upstream(t, time.Second, false)
	p := u.pool(t, u.clientCredentials(t, clientSecret, nil), pool.Config{MaxConns: 3, MaxConnLifetime: 200 * time.Millisecond})
	const run = 2500 * time.Millisecond
	deadline := time.Now().Add(run)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var sent int
	errs := make(chan error, 3)
	for w := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Now().Before(deadline); i++ {
				c, err := p.Acquire(context.Background())
				if err != nil {
					errs <- err
					return
				}
				err = send(c, w*100000+i)
				c.Release()
				if err != nil {
					errs <- err
					return
				}
				mu.Lock()
				sent++
				mu.Unlock()
				time.Sleep(10 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	st, ps := u.up.Stats(), p.Stat()
	// A token is renewed a tenth of its life before expiry and handed out
	// until half that margin is left: 50 ms for these 1-second tokens. On a
	// loaded machine a handshake can outlast that; the upstream then
	// refuses the token and the pool's one fresh-token retry carries the
	// session. Allow a few such refusals, never a failed session.
	if refused := st.Commands["AUTH"] - st.Auths; st.Messages != int64(sent) || st.Auths != ps.ConnsOpened || refused > max(2, ps.ConnsOpened/4) {
		t.Errorf("upstream saw %d of %d messages, %d AUTH commands, %d accepted, for %d sessions", st.Messages, sent,
			st.Commands["AUTH"], st.Auths, ps.ConnsOpened)
	}
	requests := u.issuer.Requests()
	t.Logf("%d messages, %d sessions, %d token requests over %v", sent, ps.ConnsOpened, requests, run)
	if requests < 2 || requests > 6 || ps.ConnsOpened < 3*int64(requests) {
		t.Errorf("%d token requests for %d sessions over %v of 1-second tokens; want 2 to 6, each serving several sessions",
			requests, ps.ConnsOpened, run)
	}
}

// A wrong secret is an error that names the cause, fails at once, and
// reaches the token endpoint once for a burst of sessions; the upstream
// sees no AUTH at all.
func TestOAuth2WrongSecret(t *testing.T) {
	u := startOAuth2Upstream(t, time.Hour, false)
	p := u.pool(t, u.clientCredentials(t, "wrong-secret-value", nil), pool.Config{MaxConns: 5})
	_, err := p.Acquire(context.Background())
	if !errors.Is(err, pool.ErrTokenRefused) {
		t.Fatalf("Acquire: %v, want ErrTokenRefused", err)
	}
	for _, want := range []string{u.tokenURL, "invalid_client", clientID, "client secret"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "wrong-secret-value") {
		t.Errorf("error shows the secret: %v", err)
	}
	t.Logf("Acquire: %v", err)

	start := time.Now()
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if _, err := p.Acquire(ctx); !errors.Is(err, pool.ErrTokenRefused) {
				t.Errorf("Acquire in a burst: %v, want ErrTokenRefused", err)
			}
		}()
	}
	wg.Wait()
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("20 failing Acquires took %v", d)
	}
	if n := u.issuer.Requests(); n != 1 {
		t.Errorf("token endpoint got %d requests for 21 sessions, want 1", n)
	}
	if st := u.up.Stats(); st.Commands["AUTH"] != 0 {
		t.Errorf("upstream saw %d AUTH commands without a token, want 0", st.Commands["AUTH"])
	}
	// The prober lets the first failure stand until its next probe: the
	// burst fails at once with it, without a set-up of its own.
	if st := p.Stat(); st.ConnectFailures < 1 || st.ConnectFailures > 2 || st.TotalConns != 0 || st.UpstreamUp {
		t.Errorf("Stat = %+v, want one or two set-up failures, no session, upstream down", st)
	}
}

// The agent replaces the token file; the next session uses the new token.
func TestOAuth2TokenFileIsReadAgainWhenItChanges(t *testing.T) {
	u := startOAuth2Upstream(t, time.Hour, false)
	path := filepath.Join(t.TempDir(), "token")
	tokenA := u.issuer.Issue()
	writeTokenFile(t, path, tokenA)
	src, err := pool.NewFileTokenSource(path)
	if err != nil {
		t.Fatal(err)
	}
	p := u.pool(t, src, pool.Config{MaxMessagesPerConn: 1}) // a new session for each message
	c := acquire(t, p)
	if err := send(c, 1); err != nil {
		t.Fatal(err)
	}
	c.Release()

	writeTokenFile(t, path, u.issuer.Issue())
	u.issuer.Revoke(tokenA) // the upstream takes only the new one now
	c = acquire(t, p)
	if err := send(c, 2); err != nil {
		t.Fatalf("send after the token file changed: %v", err)
	}
	c.Release()
	if st := u.up.Stats(); st.Auths != 2 || st.Commands["AUTH"] != 2 {
		t.Errorf("upstream saw %d AUTH commands, %d accepted; want 2 and 2", st.Commands["AUTH"], st.Auths)
	}
}

// Google answers a refused token with a JSON challenge; the client answers
// with an empty line, and the error is Google's final 535.
func TestOAuth2GoogleChallengeEndsWithTheFinal535(t *testing.T) {
	u := startOAuth2Upstream(t, time.Hour, true)
	path := filepath.Join(t.TempDir(), "token")
	writeTokenFile(t, path, "ya29.not-a-token-it-issued")
	src, err := pool.NewFileTokenSource(path)
	if err != nil {
		t.Fatal(err)
	}
	p := u.pool(t, src, pool.Config{})
	_, err = p.Acquire(context.Background())
	var smtpErr *smtp.SMTPError
	if !errors.As(err, &smtpErr) || smtpErr.Code != 535 || smtpErr.EnhancedCode != (smtp.EnhancedCode{5, 7, 8}) ||
		!strings.Contains(err.Error(), "Username and Password not accepted") {
		t.Fatalf("Acquire: %v, want Google's 535 5.7.8", err)
	}
	if strings.Contains(err.Error(), "not-a-token") {
		t.Errorf("error shows the token: %v", err)
	}
}

// Neither the secret nor a token appears in formatted values, in logs of
// the pool and the token source, or in errors.
func TestOAuth2SecretsNeverPrinted(t *testing.T) {
	u := startOAuth2Upstream(t, time.Hour, false)
	var logs bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	src := u.clientCredentials(t, clientSecret, log)
	auth := pool.OAuth2Auth{Username: mailbox, Tokens: src}
	p := u.pool(t, src, pool.Config{Logger: log, MaxMessagesPerConn: 1})

	var errs []error
	c := acquire(t, p)
	errs = append(errs, send(c, 1))
	c.Release()
	first := u.issuer.Issued()[0]
	u.issuer.Revoke(first) // the next session is refused: 535 5.7.3
	c, err := p.Acquire(context.Background())
	if err == nil { // the pool got a fresh token by itself
		c.Release()
	}
	errs = append(errs, err)
	src.Invalidate(first) // as the pool's handshake does on 535 5.7.3
	c = acquire(t, p)
	errs = append(errs, send(c, 2))
	c.Release()
	wrong := u.pool(t, u.clientCredentials(t, clientSecret+"-old", log), pool.Config{Logger: log})
	_, err = wrong.Acquire(context.Background())
	errs = append(errs, err)
	fileSrc, _ := pool.NewFileTokenSource(filepath.Join(t.TempDir(), "token"))

	cfg := pool.ClientCredentials{TokenURL: u.tokenURL, ClientID: clientID, ClientSecret: clientSecret}
	log.Info("values", "auth", auth, "source", src, "config", cfg, "file", fileSrc)
	printed := []string{logs.String()}
	for _, v := range []any{auth, &auth, src, cfg, &cfg, fileSrc, pool.OAuth2Auth{Username: mailbox, Tokens: fileSrc}} {
		printed = append(printed, fmt.Sprintf("%v %+v %#v %s", v, v, v, v))
	}
	for _, err := range errs {
		if err != nil {
			printed = append(printed, err.Error(), fmt.Sprintf("%+v", err))
		}
	}
	if len(u.issuer.Issued()) < 2 {
		t.Fatalf("%d tokens issued; the test wants 2", len(u.issuer.Issued()))
	}
	for _, s := range printed {
		if strings.Contains(s, clientSecret) {
			t.Errorf("secret printed: %s", s)
		}
		for _, tok := range u.issuer.Issued() {
			if strings.Contains(s, tok) || strings.Contains(s, tok[:40]) {
				t.Errorf("token printed: %s", s)
			}
		}
	}
	if !strings.Contains(logs.String(), "invalid_client") || !strings.Contains(logs.String(), `"client_secret":"<redacted>"`) {
		t.Errorf("logs lack the refusal or the redacted secret:\n%s", logs.String())
	}
}
