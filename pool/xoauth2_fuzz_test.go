package pool

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/emersion/go-smtp"
)

// FuzzXOAUTH2 checks the XOAUTH2 encoding for any mailbox, token and error
// challenge: the client either refuses the pair before anything is sent,
// or sends exactly user=<mailbox>^Aauth=Bearer <token>^A^A after the 334,
// in which no field can be smuggled; it answers any second challenge with
// an empty line; and the error it reports never holds the token.
func FuzzXOAUTH2(f *testing.F) {
	f.Add("mattermost@corp.example", "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.payload.sig", []byte(`{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}`))
	f.Add("a@b", "tok==", []byte("not json"))
	f.Add("a\x01auth=Bearer evil@b", "t", []byte{})
	f.Add("a@b", "tok\x01\x01", []byte(`{"status":"400"}`))
	f.Add("", "t", []byte(nil))
	f.Fuzz(func(t *testing.T, user, token string, challenge []byte) {
		a := OAuth2Auth{Username: user, Tokens: &staticTokens{tokens: []string{token}}}
		sc, err := a.SASLClient(context.Background(), []string{"PLAIN", "XOAUTH2"})
		if err != nil {
			return // refused before anything was sent
		}
		mech, ir, err := sc.Start()
		if mech != "XOAUTH2" || ir != nil || err != nil {
			t.Fatalf("Start = %q, %q, %v; want XOAUTH2 and no initial response", mech, ir, err)
		}
		resp, err := sc.Next(nil)
		if err != nil {
			t.Fatal(err)
		}
		fields := strings.Split(string(resp), "\x01")
		if len(fields) != 4 || fields[0] != "user="+user || fields[1] != "auth=Bearer "+token || fields[2] != "" || fields[3] != "" {
			t.Fatalf("payload %q does not carry exactly the mailbox %q and the token %q", resp, user, token)
		}
		if resp, err := sc.Next(challenge); err != nil || resp == nil || len(resp) != 0 {
			t.Fatalf("answer to the error challenge: %q, %v; want an empty line", resp, err)
		}
		refused := a.AuthRefused(sc, &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 3}, Message: "Authentication unsuccessful"})
		if !errors.Is(refused, ErrTokenNotAccepted) {
			t.Errorf("AuthRefused(535 5.7.3) = %v, want ErrTokenNotAccepted", refused)
		}
		if len(token) >= 8 && !strings.Contains(user, token) && strings.Contains(refused.Error(), token) {
			t.Errorf("the error shows the token: %v", refused)
		}
	})
}
