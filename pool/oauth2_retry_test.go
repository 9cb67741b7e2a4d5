package pool_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
)

// 535 5.7.3 on a token the source still thought good (revoked, or expired
// early): the token is dropped and one fresh session, with a fresh token,
// takes over within the same Acquire.
func TestOAuth2RefusedTokenIsRefreshedOnce(t *testing.T) {
	u := startOAuth2Upstream(t, time.Hour, false)
	src := u.clientCredentials(t, clientSecret, nil)
	p := u.pool(t, src, pool.Config{MaxMessagesPerConn: 1})
	c := acquire(t, p)
	if err := send(c, 1); err != nil {
		t.Fatal(err)
	}
	c.Release()
	u.issuer.Revoke(u.issuer.Issued()[0])
	c = acquire(t, p)
	if err := send(c, 2); err != nil {
		t.Fatalf("send after the token was revoked: %v", err)
	}
	c.Release()
	if st := u.up.Stats(); st.Commands["AUTH"] != 3 || st.Auths != 2 {
		t.Errorf("upstream saw %d AUTH commands, %d accepted; want 3 and 2", st.Commands["AUTH"], st.Auths)
	}
	if n := u.issuer.Requests(); n != 2 {
		t.Errorf("%d token requests, want 2", n)
	}
}

// An upstream that refuses every token: one retry, not a loop.
func TestOAuth2PersistentRefusalIsNotALoop(t *testing.T) {
	tests := []struct {
		name     string
		reply    *smtp.SMTPError
		wantErr  error
		wantAuth int64
	}{
		{"535 5.7.3", memsmtp.ErrBadToken, pool.ErrTokenNotAccepted, 2},
		{"535 5.7.139", &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 139},
			Message: "Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."}, pool.ErrAuthDisabled, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := startOAuth2Upstream(t, time.Hour, false)
			u.up.Inject(memsmtp.Auth, memsmtp.Repeat(memsmtp.Fault{Reply: tt.reply}, 10)...)
			p := u.pool(t, u.clientCredentials(t, clientSecret, nil), pool.Config{})
			_, err := p.Acquire(context.Background())
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Acquire: %v, want %v", err, tt.wantErr)
			}
			t.Logf("Acquire: %v", err)
			if st := u.up.Stats(); st.Commands["AUTH"] != tt.wantAuth {
				t.Errorf("upstream saw %d AUTH commands, want %d", st.Commands["AUTH"], tt.wantAuth)
			}
			if n := u.issuer.Requests(); n != int(tt.wantAuth) {
				t.Errorf("%d token requests, want %d", n, tt.wantAuth)
			}
		})
	}
}
