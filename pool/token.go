package pool

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"
)

// TokenSource supplies the OAuth2 access tokens that XOAUTH2 presents to the
// upstream. Implementations are safe for concurrent use.
type TokenSource interface {
	// Token returns a token that is valid for a while yet.
	Token(ctx context.Context) (string, error)
	// Invalidate drops token, which the upstream refused, from any cache,
	// so that the next Token returns another one. A token that is no longer
	// the current one is ignored.
	Invalidate(token string)
}

// Defaults of a ClientCredentialsTokenSource.
const (
	defaultTokenHTTPTimeout  = 30 * time.Second
	defaultRetryRefusedAfter = 30 * time.Second
	// A token is replaced this long before it expires, or a tenth of its
	// lifetime before if that is shorter, and used until half that time
	// before: sessions are dialled with a token that has minutes left, and
	// a failed refresh leaves time to try again with the current token
	// still in use.
	maxEarlyRefresh = 5 * time.Minute
	// noExpiry stands for the lifetime of a token that came without
	// expires_in.
	noExpiry = 100 * 365 * 24 * time.Hour
)

// ClientCredentials configures the OAuth2 client-credentials grant
// (RFC 6749, section 4.4), as Microsoft Entra ID offers it for Exchange
// Online.
type ClientCredentials struct {
	// TokenURL is the token endpoint; for Microsoft,
	// https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token. It must
	// be https, or http to a loopback address.
	TokenURL string
	// ClientID is the application (client) ID.
	ClientID string
	// ClientSecret is the client secret's value, sent in the request body.
	ClientSecret string
	// Scopes are requested space-separated; for Exchange Online,
	// https://outlook.office365.com/.default.
	Scopes []string
	// HTTPClient sends the token requests; default one with a 30-second
	// timeout.
	HTTPClient *http.Client
	// RetryRefusedAfter is how long a refusal (ErrTokenRefused) is
	// returned from the cache before the endpoint is asked again; default
	// 30 seconds.
	RetryRefusedAfter time.Duration
	// Logger receives refreshes and their failures; default discards them.
	Logger *slog.Logger
}

// LogValue keeps the client secret out of logs.
func (c ClientCredentials) LogValue() slog.Value {
	return slog.GroupValue(slog.String("token_url", c.TokenURL), slog.String("client_id", c.ClientID),
		slog.String("client_secret", "<redacted>"), slog.Any("scopes", c.Scopes))
}

// String keeps the client secret out of formatted output.
func (c ClientCredentials) String() string {
	return fmt.Sprintf("ClientCredentials{TokenURL: %q, ClientID: %q, ClientSecret: <redacted>, Scopes: %q}",
		c.TokenURL, c.ClientID, c.Scopes)
}

// GoString keeps the client secret out of %#v.
func (c ClientCredentials) GoString() string { return c.String() }

// ClientCredentialsTokenSource fetches tokens with the client-credentials
// grant and caches each until shortly before it expires. One request at a
// time goes to the endpoint, whatever the number of callers. It is safe for
// concurrent use.
type ClientCredentialsTokenSource struct {
	cfg  clientcredentials.Config
	http *http.Client
	desc ClientCredentials // without the secret, for errors and logs
	log  *slog.Logger
	now  func() time.Time

	mu           sync.Mutex
	token        string
	refreshAt    time.Time // replace the token from then on
	usableUntil  time.Time // use the token until then if no other comes
	flight       *tokenFetch
	refused      error // the endpoint's last refusal, returned until refusedUntil
	refusedUntil time.Time
}

// tokenFetch is one request to the token endpoint, shared by every caller
// that waits for it.
type tokenFetch struct {
	done  chan struct{}
	token string
	err   error
}

// NewClientCredentialsTokenSource checks cfg and returns a source for it.
// It fetches no token yet.
func NewClientCredentialsTokenSource(cfg ClientCredentials) (*ClientCredentialsTokenSource, error) {
	if err := checkTokenURL(cfg.TokenURL); err != nil {
		return nil, err
	}
	if cfg.ClientID == "" {
		return nil, errors.New("OAuth2 client credentials: ClientID is required")
	}
	if cfg.ClientSecret == "" {
		return nil, errors.New("OAuth2 client credentials: ClientSecret is required")
	}
	if cfg.RetryRefusedAfter < 0 {
		return nil, errors.New("OAuth2 client credentials: RetryRefusedAfter must not be negative")
	}
	setDefault(&cfg.RetryRefusedAfter, defaultRetryRefusedAfter)
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = &http.Client{Timeout: defaultTokenHTTPTimeout}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	s := &ClientCredentialsTokenSource{
		cfg: clientcredentials.Config{
			ClientID:     cfg.ClientID,
			ClientSecret: cfg.ClientSecret,
			TokenURL:     cfg.TokenURL,
			Scopes:       cfg.Scopes,
			// Microsoft and Google both take the secret in the body; the
			// default, auto-detection, would send each wrong secret twice.
			AuthStyle: oauth2.AuthStyleInParams,
		},
		http: cfg.HTTPClient,
		log:  cfg.Logger,
		now:  time.Now,
	}
	s.desc = cfg
	s.desc.ClientSecret = ""
	return s, nil
}

// checkTokenURL accepts https URLs, and http ones to loopback addresses,
// where the client secret does not cross the network in clear text.
func checkTokenURL(raw string) error {
	if raw == "" {
		return errors.New("OAuth2 client credentials: TokenURL is required")
	}
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Errorf("OAuth2 client credentials: TokenURL: %w", err)
	}
	switch {
	case u.Scheme == "https" && u.Host != "":
		return nil
	case u.Scheme == "http" && isLoopback(u.Hostname()):
		return nil
	}
	return fmt.Errorf("OAuth2 client credentials: TokenURL %q must be an https URL (or http to a loopback address), so that the client secret is never sent in clear text", raw)
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Token returns the cached token, or fetches a new one when there is none or
// it is due for renewal. While the current token is still good, a renewal
// runs in the background and a failed one leaves the current token in use;
// only a caller without a usable token waits for the endpoint. After the
// endpoint refused the client, its refusal is returned, without asking again,
// for RetryRefusedAfter.
func (s *ClientCredentialsTokenSource) Token(ctx context.Context) (string, error) {
	s.mu.Lock()
	now := s.now()
	if s.token != "" && now.Before(s.refreshAt) {
		defer s.mu.Unlock()
		return s.token, nil
	}
	usable := s.token != "" && now.Before(s.usableUntil)
	f := s.flight
	if f == nil && s.refused != nil && now.Before(s.refusedUntil) {
		err := s.refused
		tok := s.token
		s.mu.Unlock()
		if usable {
			return tok, nil
		}
		return "", err
	}
	if f == nil {
		f = &tokenFetch{done: make(chan struct{})}
		s.flight = f
		// The fetch outlives a caller that gives up, so that those waiting
		// with it still get its result; the HTTP client's timeout bounds it.
		go s.fetch(context.WithoutCancel(ctx), f)
	}
	tok := s.token
	s.mu.Unlock()
	if usable {
		return tok, nil
	}
	select {
	case <-f.done:
		return f.token, f.err
	case <-ctx.Done():
		return "", fmt.Errorf("waiting for an OAuth2 token from %s: %w", s.desc.TokenURL, context.Cause(ctx))
	}
}

// fetch runs f and stores its outcome.
func (s *ClientCredentialsTokenSource) fetch(ctx context.Context, f *tokenFetch) {
	start := s.now()
	tok, err := s.cfg.Token(context.WithValue(ctx, oauth2.HTTPClient, s.http))
	received := time.Now()

	s.mu.Lock()
	defer close(f.done)
	defer s.mu.Unlock()
	s.flight = nil
	if err != nil {
		f.err = s.explain(err)
		attrs := []any{"token_url", s.desc.TokenURL, "client_id", s.desc.ClientID, "err", f.err}
		if errors.Is(f.err, ErrTokenRefused) {
			s.refused, s.refusedUntil = f.err, start.Add(s.desc.RetryRefusedAfter)
			s.log.Error("OAuth2 token endpoint refused the client; fix the OAuth2 settings", attrs...)
		} else if s.token != "" && s.now().Before(s.usableUntil) {
			s.log.Warn("OAuth2 token refresh failed; the current token stays in use until shortly before it expires", attrs...)
		}
		return
	}
	s.refused = nil
	f.token = tok.AccessToken
	s.token = tok.AccessToken
	// The expiry is counted from the request, not the reply, so that it is
	// never later than the endpoint's own.
	if tok.Expiry.IsZero() { // no expires_in: used until the upstream refuses it
		s.refreshAt = start.Add(noExpiry)
		s.usableUntil = s.refreshAt
	} else {
		lifetime := tok.Expiry.Sub(received)
		early := min(maxEarlyRefresh, lifetime/10)
		s.refreshAt = start.Add(lifetime - early)
		s.usableUntil = start.Add(lifetime - early/2)
	}
	s.log.Debug("OAuth2 token fetched", "token_url", s.desc.TokenURL, "client_id", s.desc.ClientID,
		"expires_in", tok.Expiry.Sub(received).Round(time.Second))
}

// explain turns an error of the endpoint into one that says, in plain words,
// who refused what, without the secret and without the endpoint's raw reply.
func (s *ClientCredentialsTokenSource) explain(err error) error {
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) {
		return fmt.Errorf("fetching an OAuth2 token from %s: %w", s.desc.TokenURL, err)
	}
	status := 0
	if re.Response != nil {
		status = re.Response.StatusCode
	}
	code := re.ErrorCode
	if code == "" {
		code = "no OAuth2 error code"
	}
	desc := firstLine(re.ErrorDescription, 300)
	if desc != "" {
		desc = ": " + desc
	}
	// 408, 429 and 5xx are the endpoint's own trouble; any other 4xx, and an
	// error in a 2xx reply, is about the request, that is, the settings.
	if status == http.StatusRequestTimeout || status == http.StatusTooManyRequests || status >= 500 {
		return fmt.Errorf("fetching an OAuth2 token from %s: HTTP %d (%s)%s", s.desc.TokenURL, status, code, desc)
	}
	return fmt.Errorf("%w: %s answered HTTP %d, %s, to client ID %q: check the tenant in the token URL, the client ID, the client secret (and whether it has expired), the scopes %q and the admin consent%s",
		ErrTokenRefused, s.desc.TokenURL, status, code, s.desc.ClientID, s.desc.Scopes, desc)
}

// firstLine returns s's first line, at most n bytes of it.
func firstLine(s string, n int) string {
	s, _, _ = strings.Cut(s, "\n")
	s = strings.TrimSpace(s)
	if len(s) > n {
		s = s[:n] + "..."
	}
	return s
}

// Invalidate implements TokenSource.
func (s *ClientCredentialsTokenSource) Invalidate(token string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if token != "" && token == s.token {
		s.token = ""
		s.refreshAt, s.usableUntil = time.Time{}, time.Time{}
	}
}

// LogValue keeps the secret and the token out of logs.
func (s *ClientCredentialsTokenSource) LogValue() slog.Value {
	return slog.GroupValue(slog.String("type", "client_credentials"), slog.Any("config", s.desc))
}

// String keeps the secret and the token out of formatted output.
func (s *ClientCredentialsTokenSource) String() string {
	return fmt.Sprintf("ClientCredentialsTokenSource{%v}", s.desc)
}

// GoString keeps the secret and the token out of %#v.
func (s *ClientCredentialsTokenSource) GoString() string { return s.String() }

// FileTokenSource reads the token from a file that an external agent keeps
// fresh, and reads it again whenever the file changes (another file, size or
// modification time, as when a Kubernetes secret volume is updated). It is
// safe for concurrent use.
type FileTokenSource struct {
	path string

	mu    sync.Mutex
	token string
	info  os.FileInfo // of the file token was read from; nil to read again
}

// NewFileTokenSource returns a source for the token in the file at path.
// The file need not exist yet: Token fails until it does.
func NewFileTokenSource(path string) (*FileTokenSource, error) {
	if path == "" {
		return nil, errors.New("OAuth2 token file: path is required")
	}
	return &FileTokenSource{path: path}, nil
}

// Token returns the file's content without surrounding white space, read
// again if the file has changed since it was last read. An empty or missing
// file is an error.
func (s *FileTokenSource) Token(context.Context) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	info, err := os.Stat(s.path)
	if err != nil {
		return "", fmt.Errorf("OAuth2 token file: %w", err)
	}
	if s.info != nil && os.SameFile(info, s.info) && info.Size() == s.info.Size() && info.ModTime().Equal(s.info.ModTime()) {
		return s.token, nil
	}
	b, err := os.ReadFile(s.path)
	if err != nil {
		return "", fmt.Errorf("OAuth2 token file: %w", err)
	}
	token := strings.TrimSpace(string(b))
	if token == "" {
		return "", fmt.Errorf("OAuth2 token file %s is empty", s.path)
	}
	s.token, s.info = token, info
	return token, nil
}

// Invalidate implements TokenSource: the next Token reads the file again,
// changed or not.
func (s *FileTokenSource) Invalidate(token string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if token != "" && token == s.token {
		s.info = nil
	}
}

// LogValue keeps the token out of logs.
func (s *FileTokenSource) LogValue() slog.Value {
	return slog.GroupValue(slog.String("type", "file"), slog.String("path", s.path))
}

// String keeps the token out of formatted output.
func (s *FileTokenSource) String() string {
	return fmt.Sprintf("FileTokenSource{Path: %q}", s.path)
}

// GoString keeps the token out of %#v.
func (s *FileTokenSource) GoString() string { return s.String() }
