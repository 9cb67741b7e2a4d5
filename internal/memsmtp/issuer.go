package memsmtp

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"math"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
)

// TokenIssuer is an OAuth2 token endpoint for the client-credentials grant,
// as an http.Handler (serve it with httptest), and the judge of the tokens it
// issued: plug its Check into XOAUTH2, and the upstream accepts only
// unexpired, unrevoked tokens from it.
type TokenIssuer struct {
	// ClientID and ClientSecret are the only credentials it accepts, in
	// the form body or with HTTP basic authentication.
	ClientID, ClientSecret string
	// Scope, if set, must be among the requested scopes.
	Scope string
	// Lifetime of the tokens, in whole seconds (expires_in); default 1 hour.
	Lifetime time.Duration
	// TokenBytes is the size of the random part of each token; default 32.
	// Entra ID's tokens run to a couple of kilobytes.
	TokenBytes int

	mu       sync.Mutex
	requests int
	issued   []string
	fail     []int // statuses for the next requests
	tokens   map[string]time.Time
}

// ServeHTTP answers a token request.
func (ti *TokenIssuer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	ti.requests++
	if len(ti.fail) > 0 {
		status := ti.fail[0]
		ti.fail = ti.fail[1:]
		tokenError(w, status, "temporarily_unavailable", "injected failure")
		return
	}
	if r.Method != http.MethodPost {
		tokenError(w, http.StatusMethodNotAllowed, "invalid_request", "POST only")
		return
	}
	if err := r.ParseForm(); err != nil {
		tokenError(w, http.StatusBadRequest, "invalid_request", err.Error())
		return
	}
	id, secret, basic := r.BasicAuth()
	if !basic {
		id, secret = r.PostForm.Get("client_id"), r.PostForm.Get("client_secret")
	}
	switch {
	case r.PostForm.Get("grant_type") != "client_credentials":
		tokenError(w, http.StatusBadRequest, "unsupported_grant_type", "AADSTS70003: grant type not supported")
		return
	case id != ti.ClientID || secret != ti.ClientSecret:
		tokenError(w, http.StatusUnauthorized, "invalid_client", "AADSTS7000215: Invalid client secret provided.")
		return
	case ti.Scope != "" && !slices.Contains(strings.Fields(r.PostForm.Get("scope")), ti.Scope):
		tokenError(w, http.StatusBadRequest, "invalid_scope", "AADSTS70011: The provided value for the input parameter 'scope' is not valid.")
		return
	}
	token, secs := ti.issue()
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{
		"token_type": "Bearer", "expires_in": secs, "ext_expires_in": secs, "access_token": token,
	})
}

// Issue issues a token as a request would, for a test that plays the
// external agent of a token file.
func (ti *TokenIssuer) Issue() string {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	token, _ := ti.issue()
	return token
}

// issue makes a token and returns it with its lifetime in seconds.
func (ti *TokenIssuer) issue() (string, int64) {
	lifetime := ti.Lifetime
	if lifetime <= 0 {
		lifetime = time.Hour
	}
	secs := int64(math.Ceil(lifetime.Seconds()))
	n := ti.TokenBytes
	if n <= 0 {
		n = 32
	}
	token := base64.RawURLEncoding.EncodeToString(randomBytes(n))
	if ti.tokens == nil {
		ti.tokens = map[string]time.Time{}
	}
	ti.tokens[token] = time.Now().Add(time.Duration(secs) * time.Second)
	ti.issued = append(ti.issued, token)
	return token, secs
}

func tokenError(w http.ResponseWriter, status int, code, desc string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]string{"error": code, "error_description": desc})
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// Errors of Check.
var (
	ErrUnknownToken = errors.New("memsmtp: token not issued here, or revoked")
	ErrTokenExpired = errors.New("memsmtp: token expired")
)

// Check accepts a token it issued that has neither expired nor been
// revoked; user is not checked (XOAUTH2 checks it against
// Options.Username).
func (ti *TokenIssuer) Check(_, token string) error {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	expiry, ok := ti.tokens[token]
	switch {
	case !ok:
		return ErrUnknownToken
	case !time.Now().Before(expiry):
		return ErrTokenExpired
	}
	return nil
}

// Revoke makes Check refuse token from now on.
func (ti *TokenIssuer) Revoke(token string) {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	delete(ti.tokens, token)
}

// Expiry returns when token expires, and false if it was not issued here.
func (ti *TokenIssuer) Expiry(token string) (time.Time, bool) {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	t, ok := ti.tokens[token]
	return t, ok
}

// Issued returns every token issued, revoked ones included.
func (ti *TokenIssuer) Issued() []string {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	return slices.Clone(ti.issued)
}

// Requests returns the number of requests received, refused ones included.
func (ti *TokenIssuer) Requests() int {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	return ti.requests
}

// FailNext answers the next requests with these HTTP statuses (503, say)
// and an OAuth2 error, one each, whatever they ask.
func (ti *TokenIssuer) FailNext(statuses ...int) {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	ti.fail = append(ti.fail, statuses...)
}
