package memsmtp

import (
	"bytes"
	"strings"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// Replies of XOAUTH2 upstreams to a token they do not accept.
var (
	// ErrBadToken is Exchange Online's reply to a bad or expired token.
	ErrBadToken = &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 3}, Message: "Authentication unsuccessful"}
	// ErrGoogleBadCredentials is Google's final reply after its error challenge.
	ErrGoogleBadCredentials = &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 8},
		Message: "Username and Password not accepted. For more information, go to https://support.google.com/mail/?p=BadCredentials"}
)

// xoauth2MaxLine is the line length the server accepts when it offers
// XOAUTH2: the response line carries a token of a few kilobytes.
const xoauth2MaxLine = 16 << 10

// XOAUTH2 configures the server side of SASL XOAUTH2. Offer it by listing
// "XOAUTH2" in Options.AuthMechanisms, with Options.Username naming the
// mailbox.
type XOAUTH2 struct {
	// Check accepts a token for the mailbox with nil. An *smtp.SMTPError
	// it returns is the reply; any other error refuses the token with
	// ErrBadToken, or ErrGoogleBadCredentials when GoogleChallenge is set.
	Check func(user, token string) error
	// GoogleChallenge makes a refusal go as Google's does: first a 334 with
	// a base64 JSON error challenge, then, after the client's empty
	// response, the final 535.
	GoogleChallenge bool
}

// xoauth2Server is the server side of XOAUTH2, which go-sasl does not have.
type xoauth2Server struct {
	ss      *session
	step    int
	refusal error // the final reply, sent after the error challenge
}

func (x *xoauth2Server) Next(response []byte) ([]byte, bool, error) {
	x.step++
	switch {
	case x.refusal != nil:
		return nil, true, x.refusal
	case x.step == 1 && len(response) == 0: // no initial response: ask for it
		return nil, false, nil
	}
	opts := x.ss.s.opts
	user, token, ok := parseXOAUTH2(response)
	if !ok {
		return nil, true, &smtp.SMTPError{Code: 501, EnhancedCode: smtp.EnhancedCode{5, 5, 2}, Message: "Malformed XOAUTH2 response"}
	}
	if err := x.ss.apply(x.ss.s.nextFault(Auth), ""); err != nil {
		return nil, true, err
	}
	err := opts.XOAUTH2.Check(user, token)
	if err == nil && user != opts.Username {
		err = ErrBadToken
	}
	if err == nil {
		x.ss.authed = true
		x.ss.s.auths.Add(1)
		return nil, true, nil
	}
	reply, ok := err.(*smtp.SMTPError)
	switch {
	case ok:
	case opts.XOAUTH2.GoogleChallenge:
		reply = ErrGoogleBadCredentials
	default:
		reply = ErrBadToken
	}
	if !opts.XOAUTH2.GoogleChallenge {
		return nil, true, reply
	}
	x.refusal = reply
	return []byte(`{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}`), false, nil
}

// parseXOAUTH2 splits "user=U\x01auth=Bearer T\x01\x01".
func parseXOAUTH2(b []byte) (user, token string, ok bool) {
	rest, ok := bytes.CutSuffix(b, []byte("\x01\x01"))
	if !ok {
		return "", "", false
	}
	userPart, authPart, ok := bytes.Cut(rest, []byte("\x01"))
	if !ok {
		return "", "", false
	}
	user, ok1 := strings.CutPrefix(string(userPart), "user=")
	token, ok2 := strings.CutPrefix(string(authPart), "auth=Bearer ")
	return user, token, ok1 && ok2 && token != ""
}

// xoauth2Server returns the server side of XOAUTH2 for ss, or an error if
// the server does not offer it.
func (ss *session) xoauth2Server() (sasl.Server, error) {
	if ss.s.opts.XOAUTH2 == nil {
		return nil, smtp.ErrAuthUnknownMechanism
	}
	return &xoauth2Server{ss: ss}, nil
}
