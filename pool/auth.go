package pool

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"

	"github.com/emersion/go-sasl"
)

// Authenticator prepares the SASL exchange that authenticates a new session.
// It is called once per session, so an implementation may fetch a fresh
// credential (an OAuth2 token, say) each time.
type Authenticator interface {
	// SASLClient returns a client for one of mechanisms, the list the
	// upstream offered in its EHLO reply.
	SASLClient(ctx context.Context, mechanisms []string) (sasl.Client, error)
}

// PasswordAuth authenticates with a user name and password, using PLAIN, or
// LOGIN when the upstream offers only that (on-premises Exchange often does).
type PasswordAuth struct {
	Username string
	Password string
	// Mechanism, if set, is the only one used: "PLAIN" or "LOGIN".
	Mechanism string
}

// SASLClient implements Authenticator.
func (a PasswordAuth) SASLClient(_ context.Context, mechanisms []string) (sasl.Client, error) {
	offered := func(name string) bool {
		return slices.ContainsFunc(mechanisms, func(m string) bool { return strings.EqualFold(m, name) })
	}
	switch {
	case a.Mechanism != "" && !strings.EqualFold(a.Mechanism, sasl.Plain) && !strings.EqualFold(a.Mechanism, sasl.Login):
		return nil, fmt.Errorf("%w: unknown mechanism %q", ErrAuthUnavailable, a.Mechanism)
	case a.Mechanism != "" && !offered(a.Mechanism):
		return nil, fmt.Errorf("%w: upstream offers %q, not %s", ErrAuthUnavailable, mechanisms, strings.ToUpper(a.Mechanism))
	case strings.EqualFold(a.Mechanism, sasl.Login):
		return sasl.NewLoginClient(a.Username, a.Password), nil
	case offered(sasl.Plain):
		return sasl.NewPlainClient("", a.Username, a.Password), nil
	case offered(sasl.Login):
		return sasl.NewLoginClient(a.Username, a.Password), nil
	}
	return nil, fmt.Errorf("%w: upstream offers %q, want PLAIN or LOGIN", ErrAuthUnavailable, mechanisms)
}

// LogValue keeps the password out of logs.
func (a PasswordAuth) LogValue() slog.Value {
	return slog.GroupValue(slog.String("username", a.Username), slog.String("password", "<redacted>"))
}

// String keeps the password out of formatted output.
func (a PasswordAuth) String() string {
	return fmt.Sprintf("PasswordAuth{Username: %q, Password: <redacted>}", a.Username)
}
