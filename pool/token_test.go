package pool

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smtppool/smtppool/internal/memsmtp"
)

// startTokenEndpoint serves h over HTTP on loopback and returns its URL.
func startTokenEndpoint(t *testing.T, h http.Handler) string {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv.URL + "/tenant/oauth2/v2.0/token"
}

// fakeClock is the clock of a token source under test; the token endpoint
// keeps real time.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// newTestSource returns a source for an endpoint at tokenURL that accepts
// app/s3cret, running on a fake clock.
func newTestSource(t *testing.T, tokenURL, secret string) (*ClientCredentialsTokenSource, *fakeClock) {
	t.Helper()
	src, err := NewClientCredentialsTokenSource(ClientCredentials{TokenURL: tokenURL, ClientID: "app", ClientSecret: secret,
		Scopes: []string{"https://outlook.office365.com/.default"}})
	if err != nil {
		t.Fatal(err)
	}
	clock := &fakeClock{t: time.Now()}
	src.now = clock.Now
	return src, clock
}

// waitIdle waits until no fetch is in flight.
func waitIdle(t *testing.T, src *ClientCredentialsTokenSource) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		src.mu.Lock()
		idle := src.flight == nil
		src.mu.Unlock()
		if idle {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("timed out waiting for the token fetch to end")
		}
		time.Sleep(time.Millisecond)
	}
}

func mustToken(t *testing.T, src TokenSource) string {
	t.Helper()
	tok, err := src.Token(context.Background())
	if err != nil {
		t.Fatalf("Token: %v", err)
	}
	return tok
}

// The request is the client-credentials grant as Entra ID documents it,
// with the secret in the form body only.
func TestClientCredentialsRequest(t *testing.T) {
	issuer := &memsmtp.TokenIssuer{ClientID: "app", ClientSecret: "s3cret", Scope: "https://outlook.office365.com/.default"}
	var form url.Values
	var header http.Header
	endpoint := startTokenEndpoint(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.ParseForm()
		form, header = r.PostForm, r.Header
		issuer.ServeHTTP(w, r)
	}))
	src, _ := newTestSource(t, endpoint, "s3cret")
	tok := mustToken(t, src)
	if issuer.Check("", tok) != nil {
		t.Errorf("Token returned %q, which the issuer did not issue", tok)
	}
	want := url.Values{"grant_type": {"client_credentials"}, "client_id": {"app"}, "client_secret": {"s3cret"},
		"scope": {"https://outlook.office365.com/.default"}}
	if form.Encode() != want.Encode() {
		t.Errorf("form = %v, want %v", form, want)
	}
	if header.Get("Authorization") != "" || header.Get("Content-Type") != "application/x-www-form-urlencoded" {
		t.Errorf("headers = %v; want a form and no Authorization", header)
	}
}

// A token is reused until five minutes before it expires; then a refresh
// runs in the background while the current token stays in use, also when
// the refresh fails; once the token is too old, callers wait for a new one.
func TestClientCredentialsCachesAndRefreshesEarly(t *testing.T) {
	issuer := &memsmtp.TokenIssuer{ClientID: "app", ClientSecret: "s3cret", Lifetime: time.Hour}
	src, clock := newTestSource(t, startTokenEndpoint(t, issuer), "s3cret")
	a := mustToken(t, src)

	clock.Add(54 * time.Minute)
	if got := mustToken(t, src); got != a || issuer.Requests() != 1 {
		t.Fatalf("at 54 min: token changed or fetched (%d requests); want the cached one", issuer.Requests())
	}

	clock.Add(2 * time.Minute) // 56 min: due for renewal, still good
	issuer.FailNext(http.StatusServiceUnavailable)
	if got := mustToken(t, src); got != a {
		t.Fatal("at 56 min with the endpoint failing: got another token, want the current one")
	}
	waitIdle(t, src)
	if n := issuer.Requests(); n != 2 {
		t.Fatalf("%d requests, want 2: one background refresh", n)
	}
	if got := mustToken(t, src); got != a {
		t.Fatal("after a failed refresh: want the current token")
	}
	waitIdle(t, src) // the refresh that this call started, which succeeds
	b := mustToken(t, src)
	if b == a || issuer.Requests() != 3 {
		t.Fatalf("after a successful refresh: same token: %v, %d requests; want a new token after 3", b == a, issuer.Requests())
	}

	clock.Add(59*time.Minute + 30*time.Second) // b is too old to use
	issuer.FailNext(http.StatusServiceUnavailable)
	_, err := src.Token(context.Background())
	if err == nil || errors.Is(err, ErrTokenRefused) || !strings.Contains(err.Error(), "HTTP 503") {
		t.Fatalf("Token with an old token and a failing endpoint: %v, want a transient HTTP 503 error", err)
	}
	if c := mustToken(t, src); c == a || c == b {
		t.Fatal("after the endpoint recovered: want a new token")
	}
}

// A token that lives a minute is renewed a tenth of its lifetime early.
func TestClientCredentialsShortLifetime(t *testing.T) {
	issuer := &memsmtp.TokenIssuer{ClientID: "app", ClientSecret: "s3cret", Lifetime: time.Minute}
	src, clock := newTestSource(t, startTokenEndpoint(t, issuer), "s3cret")
	a := mustToken(t, src)
	clock.Add(53 * time.Second)
	if mustToken(t, src) != a || issuer.Requests() != 1 {
		t.Fatal("at 53 s of 60: want the cached token")
	}
	clock.Add(6 * time.Second) // 59 s: past the 6-second margin
	mustToken(t, src)
	waitIdle(t, src)
	if issuer.Requests() != 2 {
		t.Fatalf("at 59 s of 60: %d requests, want a refresh", issuer.Requests())
	}
}

func TestClientCredentialsErrors(t *testing.T) {
	tests := []struct {
		name        string
		secret      string
		fail        int  // status the endpoint answers with
		down        bool // endpoint not listening
		wantRefused bool
		wantText    []string
	}{
		{name: "wrong secret", secret: "wrong-secret", wantRefused: true,
			wantText: []string{"HTTP 401", "invalid_client", `client ID "app"`, "/tenant/oauth2/v2.0/token", "AADSTS7000215"}},
		{name: "bad request", secret: "s3cret", fail: http.StatusBadRequest, wantRefused: true, wantText: []string{"HTTP 400"}},
		{name: "endpoint unavailable", secret: "s3cret", fail: http.StatusServiceUnavailable, wantText: []string{"HTTP 503"}},
		{name: "throttled", secret: "s3cret", fail: http.StatusTooManyRequests, wantText: []string{"HTTP 429"}},
		{name: "endpoint down", secret: "s3cret", down: true, wantText: []string{"connection refused"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			issuer := &memsmtp.TokenIssuer{ClientID: "app", ClientSecret: "s3cret"}
			srv := httptest.NewServer(issuer)
			t.Cleanup(srv.Close)
			if tt.down {
				srv.Close()
			}
			if tt.fail != 0 {
				issuer.FailNext(tt.fail)
			}
			src, clock := newTestSource(t, srv.URL+"/tenant/oauth2/v2.0/token", tt.secret)
			_, err := src.Token(context.Background())
			if err == nil || errors.Is(err, ErrTokenRefused) != tt.wantRefused {
				t.Fatalf("Token: %v; want ErrTokenRefused: %v", err, tt.wantRefused)
			}
			for _, s := range tt.wantText {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q lacks %q", err, s)
				}
			}
			if strings.Contains(err.Error(), tt.secret) {
				t.Errorf("error shows the secret: %v", err)
			}
			// A refusal is remembered; a transient failure is not.
			requests := issuer.Requests()
			_, err2 := src.Token(context.Background())
			if tt.wantRefused {
				if err2 == nil || err2.Error() != err.Error() || issuer.Requests() != requests {
					t.Errorf("second Token: %v after %d requests; want the same refusal and no new request", err2, issuer.Requests())
				}
				clock.Add(31 * time.Second)
				src.Token(context.Background())
				if issuer.Requests() != requests+1 {
					t.Errorf("after RetryRefusedAfter: %d requests, want %d", issuer.Requests(), requests+1)
				}
			} else if !tt.down && (err2 != nil || issuer.Requests() != requests+1) {
				t.Errorf("second Token: %v after %d requests; want a token from a new request", err2, issuer.Requests())
			}
		})
	}
}

// Callers that find no usable token share one request.
func TestClientCredentialsSingleFlight(t *testing.T) {
	issuer := &memsmtp.TokenIssuer{ClientID: "app", ClientSecret: "s3cret"}
	gate := make(chan struct{})
	entered := make(chan struct{}, 100)
	endpoint := startTokenEndpoint(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		entered <- struct{}{}
		<-gate
		issuer.ServeHTTP(w, r)
	}))
	src, _ := newTestSource(t, endpoint, "s3cret")

	// One caller gives up; the request goes on for the others.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := src.Token(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Token with a short deadline: %v, want DeadlineExceeded", err)
	}
	<-entered
	tokens := make(chan string, 20)
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() { defer wg.Done(); tokens <- mustToken(t, src) }()
	}
	close(gate)
	wg.Wait()
	close(tokens)
	first := <-tokens
	for tok := range tokens {
		if tok != first {
			t.Fatal("callers got different tokens")
		}
	}
	if n := issuer.Requests(); n != 1 {
		t.Errorf("%d requests for 21 callers, want 1", n)
	}
}

func TestClientCredentialsInvalidate(t *testing.T) {
	issuer := &memsmtp.TokenIssuer{ClientID: "app", ClientSecret: "s3cret"}
	src, _ := newTestSource(t, startTokenEndpoint(t, issuer), "s3cret")
	a := mustToken(t, src)
	src.Invalidate("some-older-token")
	if mustToken(t, src) != a || issuer.Requests() != 1 {
		t.Fatal("Invalidate of another token dropped the current one")
	}
	src.Invalidate(a)
	if b := mustToken(t, src); b == a || issuer.Requests() != 2 {
		t.Fatalf("after Invalidate: same token %v, %d requests; want a new token", b == a, issuer.Requests())
	}
}

func TestNewClientCredentialsTokenSourceChecks(t *testing.T) {
	good := ClientCredentials{TokenURL: "https://login.microsoftonline.com/t/oauth2/v2.0/token", ClientID: "app", ClientSecret: "s3cret"}
	tests := []struct {
		name    string
		edit    func(*ClientCredentials)
		wantErr string
	}{
		{"https", func(*ClientCredentials) {}, ""},
		{"http to loopback", func(c *ClientCredentials) { c.TokenURL = "http://127.0.0.1:8080/token" }, ""},
		{"http to localhost", func(c *ClientCredentials) { c.TokenURL = "http://localhost:8080/token" }, ""},
		{"http elsewhere", func(c *ClientCredentials) { c.TokenURL = "http://login.example/token" }, "https"},
		{"no URL", func(c *ClientCredentials) { c.TokenURL = "" }, "TokenURL is required"},
		{"no client ID", func(c *ClientCredentials) { c.ClientID = "" }, "ClientID is required"},
		{"no secret", func(c *ClientCredentials) { c.ClientSecret = "" }, "ClientSecret is required"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := good
			tt.edit(&cfg)
			_, err := NewClientCredentialsTokenSource(cfg)
			if (err == nil) != (tt.wantErr == "") || (err != nil && !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("NewClientCredentialsTokenSource: %v, want %q", err, tt.wantErr)
			}
		})
	}
}

func TestFileTokenSource(t *testing.T) {
	path := filepath.Join(t.TempDir(), "token")
	src, err := NewFileTokenSource(path)
	if err != nil {
		t.Fatal(err)
	}
	write := func(content string, mtime time.Time) {
		t.Helper()
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(path, mtime, mtime); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := src.Token(context.Background()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Token without the file: %v, want ErrNotExist", err)
	}
	t0 := time.Now().Add(-time.Hour)
	write("  tok-1\n", t0)
	if got := mustToken(t, src); got != "tok-1" {
		t.Fatalf("Token = %q, want tok-1", got)
	}
	write("tok-22", t0.Add(time.Second))
	if got := mustToken(t, src); got != "tok-22" {
		t.Fatalf("after a change: Token = %q, want tok-22", got)
	}
	// Same size, same time, same file: looks unchanged, so the cached token
	// stays until the upstream refuses it.
	write("tok-33", t0.Add(time.Second))
	if got := mustToken(t, src); got != "tok-22" {
		t.Fatalf("after an invisible change: Token = %q, want the cached tok-22", got)
	}
	src.Invalidate("tok-22")
	if got := mustToken(t, src); got != "tok-33" {
		t.Fatalf("after Invalidate: Token = %q, want tok-33", got)
	}
	// A new file moved into place, as a Kubernetes secret volume does.
	tmp := path + ".new"
	if err := os.WriteFile(tmp, []byte("tok-44"), 0o600); err != nil {
		t.Fatal(err)
	}
	os.Chtimes(tmp, t0.Add(time.Second), t0.Add(time.Second))
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	if got := mustToken(t, src); got != "tok-44" {
		t.Fatalf("after a rename: Token = %q, want tok-44", got)
	}
	write("\n \n", t0.Add(2*time.Second))
	if _, err := src.Token(context.Background()); err == nil || !strings.Contains(err.Error(), "empty") {
		t.Fatalf("Token from an empty file: %v, want an error", err)
	}
	if _, err := NewFileTokenSource(""); err == nil {
		t.Error("NewFileTokenSource(\"\") succeeded")
	}
}
