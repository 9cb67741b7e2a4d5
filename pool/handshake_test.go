package pool

import (
	"context"
	"encoding/base64"
	"errors"
	"testing"

	"github.com/emersion/go-smtp"
)

// TestXOAUTH2ThroughThePoolsClient: the pool's own client speaks XOAUTH2
// as go-smtp's did (no initial response, the payload after the 334, an
// empty line after Google's challenge), except that it sends no "*" after
// the server's final refusal: the exchange is over by then. The session is
// then closed with QUIT.
func TestXOAUTH2ThroughThePoolsClient(t *testing.T) {
	const user = "mbox@corp.example"
	payload := base64.StdEncoding.EncodeToString([]byte("user=" + user + "\x01auth=Bearer tok1\x01\x01"))
	challenge := base64.StdEncoding.EncodeToString([]byte(`{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}`))
	tests := []struct {
		name    string
		replies []string
		want    []string
		wantErr error
	}{
		{name: "accepted", replies: []string{"334 ", "235 2.7.0 Authentication successful"},
			want: []string{"AUTH XOAUTH2", payload, "QUIT"}},
		{name: "Exchange: expired token", replies: []string{"334 ", "535 5.7.3 Authentication unsuccessful"},
			want: []string{"AUTH XOAUTH2", payload, "QUIT"}, wantErr: ErrTokenNotAccepted},
		{name: "Google: challenge, empty line, final reply", replies: []string{"334 ", "334 " + challenge, "535 5.7.8 Username and Password not accepted"},
			want: []string{"AUTH XOAUTH2", payload, "", "QUIT"}, wantErr: ErrTokenNotAccepted},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr, lines := scriptedServer(t, tt.replies...)
			p, err := New(Config{Addr: addr, TLS: TLSNone, AllowInsecureAuth: true,
				Auth: OAuth2Auth{Username: user, Tokens: &staticTokens{tokens: []string{"tok1", "tok2"}}}})
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			s, err := p.handshake(context.Background(), p.upstreams[0])
			if err == nil {
				s.close()
			}
			var smtpErr *smtp.SMTPError
			switch {
			case tt.wantErr == nil && err != nil:
				t.Fatalf("handshake: %v", err)
			case tt.wantErr != nil && (!errors.Is(err, tt.wantErr) || !errors.As(err, &smtpErr) || smtpErr.Code != 535):
				t.Fatalf("handshake: %v, want %v wrapping the 535", err, tt.wantErr)
			}
			if got := <-lines; !equalLines(got, tt.want) {
				t.Errorf("server read %q, want %q", abbreviate(got), abbreviate(tt.want))
			}
		})
	}
}
