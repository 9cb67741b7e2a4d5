package pool

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// xoauth2 is the SASL mechanism of Google and Microsoft for OAuth2 bearer
// tokens.
const xoauth2 = "XOAUTH2"

// AuthRefusalHandler is implemented by an Authenticator that makes sense of
// the upstream's refusal of its exchange, and acts on it (by dropping a
// token, say).
type AuthRefusalHandler interface {
	// AuthRefused is called with the client that SASLClient returned and
	// the error that the exchange ended with; it returns the error to
	// report. That error wraps ErrTokenNotAccepted when a new session, with
	// a fresh credential, may succeed.
	AuthRefused(sc sasl.Client, err error) error
}

// authRefused explains err, the failure of a's exchange through sc: it lets
// a make sense of it if a can, and names a disabled SMTP AUTH otherwise.
func authRefused(a Authenticator, sc sasl.Client, err error) error {
	if h, ok := a.(AuthRefusalHandler); ok {
		return h.AuthRefused(sc, err)
	}
	if isAuthDisabledReply(err) {
		return authDisabled(err)
	}
	return err
}

// isExpiredTokenReply reports whether err is Exchange Online's refusal of a
// bad or expired token, 535 5.7.3.
func isExpiredTokenReply(err error) bool {
	return isReply(err, 535, smtp.EnhancedCode{5, 7, 3})
}

// isAuthDisabledReply reports whether err is Exchange Online's 535 5.7.139:
// SMTP AUTH disabled for the tenant or the mailbox, or blocked by security
// defaults.
func isAuthDisabledReply(err error) bool {
	return isReply(err, 535, smtp.EnhancedCode{5, 7, 139})
}

// replyCode returns the code and enhanced code of the SMTP reply in err,
// such as "535 5.7.3", which go-smtp's error text leaves out.
func replyCode(err error) string {
	var smtpErr *smtp.SMTPError
	if !errors.As(err, &smtpErr) {
		return "no SMTP reply"
	}
	if e := smtpErr.EnhancedCode; e != smtp.NoEnhancedCode && e != (smtp.EnhancedCode{}) {
		return fmt.Sprintf("%d %d.%d.%d", smtpErr.Code, e[0], e[1], e[2])
	}
	return fmt.Sprint(smtpErr.Code)
}

func isReply(err error, code int, enhanced smtp.EnhancedCode) bool {
	var smtpErr *smtp.SMTPError
	return errors.As(err, &smtpErr) && smtpErr.Code == code && smtpErr.EnhancedCode == enhanced
}

// authDisabled wraps err, a 535 5.7.139, with what the operator can do.
func authDisabled(err error) error {
	return fmt.Errorf("%w (535 5.7.139): enable it for the mailbox (Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false) "+
		"and check that the tenant allows it (Get-TransportConfig | Format-List SmtpClientAuthenticationDisabled) "+
		"and that neither security defaults nor a conditional access policy blocks it: %w", ErrAuthDisabled, err)
}

// OAuth2Auth authenticates with SASL XOAUTH2: the mailbox and an OAuth2
// bearer token, which Tokens supplies for each new session.
type OAuth2Auth struct {
	// Username is the mailbox, such as mattermost@corp.example.
	Username string
	// Tokens supplies the access tokens.
	Tokens TokenSource
}

// SASLClient implements Authenticator. It fetches a token, so it fails when
// Tokens does.
func (a OAuth2Auth) SASLClient(ctx context.Context, mechanisms []string) (sasl.Client, error) {
	if !slices.ContainsFunc(mechanisms, func(m string) bool { return strings.EqualFold(m, xoauth2) }) {
		return nil, fmt.Errorf("%w: upstream offers %q, want XOAUTH2", ErrAuthUnavailable, mechanisms)
	}
	if a.Tokens == nil {
		return nil, errors.New("XOAUTH2: OAuth2Auth.Tokens is nil")
	}
	if a.Username == "" || strings.ContainsFunc(a.Username, isControl) {
		return nil, fmt.Errorf("XOAUTH2: user name %q is empty or holds control characters", a.Username)
	}
	token, err := a.Tokens.Token(ctx)
	if err != nil {
		return nil, fmt.Errorf("XOAUTH2 for %s: %w", a.Username, err)
	}
	if !isBearerToken(token) {
		a.Tokens.Invalidate(token)
		return nil, fmt.Errorf("XOAUTH2 for %s: the token from %v holds characters that a bearer token cannot have (RFC 6750)", a.Username, a.Tokens)
	}
	return &xoauth2Client{user: a.Username, token: token}, nil
}

// AuthRefused implements AuthRefusalHandler. A refused token is dropped
// from Tokens, and the error says so; Google's error challenge is added to
// the error, which is its only explanation.
func (a OAuth2Auth) AuthRefused(sc sasl.Client, err error) error {
	c, ok := sc.(*xoauth2Client)
	if !ok {
		return authRefused(nil, sc, err)
	}
	if c.challenge != "" {
		// Never repeat the token, even if a server echoes it.
		err = fmt.Errorf("%w (XOAUTH2 challenge: %s)", err, strings.ReplaceAll(c.challenge, c.token, "[token]"))
	}
	switch {
	case isAuthDisabledReply(err):
		return authDisabled(err)
	case isExpiredTokenReply(err) || c.status == "401":
		a.Tokens.Invalidate(c.token)
		return fmt.Errorf("%w for %s (%s); the next session fetches a fresh one. If a fresh token is refused too, "+
			"check that the application has SMTP.SendAsApp with admin consent, that Exchange knows its service principal (New-ServicePrincipal) "+
			"and that it has FullAccess to the mailbox (Add-MailboxPermission): %w", ErrTokenNotAccepted, a.Username, replyCode(err), err)
	}
	return err
}

// LogValue keeps the token out of logs.
func (a OAuth2Auth) LogValue() slog.Value {
	return slog.GroupValue(slog.String("mechanism", xoauth2), slog.String("username", a.Username), slog.Any("tokens", a.Tokens))
}

// String keeps the token out of formatted output.
func (a OAuth2Auth) String() string {
	return fmt.Sprintf("OAuth2Auth{Username: %q, Tokens: %v}", a.Username, a.Tokens)
}

// GoString keeps the token out of %#v.
func (a OAuth2Auth) GoString() string { return a.String() }

// xoauth2Client is the client side of XOAUTH2, which go-sasl no longer
// has. It sends no initial response: the payload, which holds a token of
// a couple of kilobytes from Entra ID, goes on its own line after the
// server's first 334, as Microsoft documents. A second 334 is an error
// challenge (Google sends a base64 JSON object); it is answered with an
// empty line, after which the server sends its final reply.
type xoauth2Client struct {
	user, token string
	step        int
	// From the error challenge: its status, and a printable summary.
	status, challenge string
}

// Start implements sasl.Client; a nil initial response makes go-smtp send
// "AUTH XOAUTH2" alone.
func (c *xoauth2Client) Start() (mech string, ir []byte, err error) {
	return xoauth2, nil, nil
}

// Next implements sasl.Client.
func (c *xoauth2Client) Next(challenge []byte) ([]byte, error) {
	c.step++
	switch c.step {
	case 1:
		return []byte("user=" + c.user + "\x01auth=Bearer " + c.token + "\x01\x01"), nil
	case 2:
		c.status, c.challenge = parseXOAUTH2Challenge(challenge)
		return []byte{}, nil
	}
	return nil, sasl.ErrUnexpectedServerChallenge
}

// String keeps the token out of formatted output.
func (c *xoauth2Client) String() string { return fmt.Sprintf("XOAUTH2 client for %q", c.user) }

// GoString keeps the token out of %#v.
func (c *xoauth2Client) GoString() string { return c.String() }

// parseXOAUTH2Challenge reads an error challenge, such as Google's
// {"status":"401","schemes":"bearer","scope":"https://mail.google.com/"},
// and returns its status and a printable summary.
func parseXOAUTH2Challenge(challenge []byte) (status, summary string) {
	var ch struct {
		Status  string `json:"status"`
		Schemes string `json:"schemes"`
		Scope   string `json:"scope"`
	}
	if err := json.Unmarshal(challenge, &ch); err != nil {
		return "", fmt.Sprintf("%q", firstLine(string(challenge), 200))
	}
	return ch.Status, fmt.Sprintf("status %q, schemes %q, scope %q", ch.Status, ch.Schemes, ch.Scope)
}

// isBearerToken reports whether t has the form of RFC 6750's b64token,
// which keeps it from breaking the XOAUTH2 payload.
func isBearerToken(t string) bool {
	body := strings.TrimRight(t, "=")
	if body == "" {
		return false
	}
	for _, r := range body {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', strings.ContainsRune("-._~+/", r):
		default:
			return false
		}
	}
	return true
}

func isControl(r rune) bool { return r < 0x20 || r == 0x7f }
