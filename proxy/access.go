package proxy

import (
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// AccessConfig says what a client must do before it may send, and what
// the log may say about its mail. The zero value asks nothing: no AUTH, no
// STARTTLS, envelope addresses logged only at debug. Who may connect at all
// is the Listener's business (ListenConfig).
type AccessConfig struct {
	// Username and Password, when Username is set, are the credentials a
	// client must give with AUTH PLAIN or AUTH LOGIN before MAIL; MAIL
	// without them gets 530 5.7.0, a wrong password 535 5.7.8. AUTH is
	// offered over TLS, and in plain text to loopback clients only.
	Username, Password string

	// TLSConfig, when set, offers STARTTLS with it.
	TLSConfig *tls.Config

	// RequireTLS refuses MAIL (530 5.7.0) and AUTH before STARTTLS, to
	// every client, loopback included. It needs TLSConfig.
	RequireTLS bool

	// LogAddresses puts envelope addresses in the info log lines; without
	// it, only a logger at debug gets them, and they are masked in the
	// upstream's replies that info and warning lines quote.
	LogAddresses bool

	failureDelay time.Duration // authFailureDelay, unless set (by tests)
}

// configure sets s up for the access rules.
func (a AccessConfig) configure(s *smtp.Server) {
	s.TLSConfig = a.TLSConfig
	// go-smtp would never offer AUTH without TLS, or always: the session
	// decides per client instead (AuthMechanisms).
	s.AllowInsecureAuth = true
}

// credentialsMatch compares username and password with the configured
// ones in constant time: hashing first hides their lengths too.
func (a AccessConfig) credentialsMatch(username, password string) bool {
	gotUser, gotPass := sha256.Sum256([]byte(username)), sha256.Sum256([]byte(password))
	wantUser, wantPass := sha256.Sum256([]byte(a.Username)), sha256.Sum256([]byte(a.Password))
	userOK := subtle.ConstantTimeCompare(gotUser[:], wantUser[:])
	passOK := subtle.ConstantTimeCompare(gotPass[:], wantPass[:])
	return userOK&passOK == 1
}

// Replies about access.
var (
	replyAuthRequired = &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0},
		Message: "Authentication required"}
	replyTLSRequired = &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0},
		Message: "Must issue a STARTTLS command first"}
	replyAuthNeedsTLS = &smtp.SMTPError{Code: 538, EnhancedCode: smtp.EnhancedCode{5, 7, 11},
		Message: "Encryption required for requested authentication mechanism"}
	replyAuthMalformed = &smtp.SMTPError{Code: 501, EnhancedCode: smtp.EnhancedCode{5, 5, 2},
		Message: "Malformed authentication data"}
)

// authFailureDelay slows down the reply to a wrong password, and
// maxAuthFailures wrong passwords end the connection: guessing takes time.
const (
	authFailureDelay = time.Second
	maxAuthFailures  = 3
)

// accessState is what a session knows of its client's standing.
type accessState struct {
	tls      bool // the connection is encrypted (after STARTTLS)
	loopback bool // the client connects from a loopback address
	authed   bool // the client has authenticated
	failures int  // wrong credentials given on this connection
}

// newAccessState describes the client of c, whose go-smtp session is
// being created: at its first EHLO, and again after STARTTLS.
func newAccessState(c *smtp.Conn) accessState {
	_, encrypted := c.TLSConnectionState()
	ip, ok := remoteIP(c.Conn().RemoteAddr())
	return accessState{tls: encrypted, loopback: ok && ip.IsLoopback()}
}

// mayMail refuses MAIL to a client that has not yet done what it must.
func (s *session) mayMail() error {
	a := s.b.cfg.Access
	switch {
	case a.RequireTLS && !s.access.tls:
		return replyTLSRequired
	case a.Username != "" && !s.access.authed:
		return replyAuthRequired
	}
	return nil
}

// authRefusal says why AUTH is not available to this client now, or nil.
func (s *session) authRefusal() *smtp.SMTPError {
	a := s.b.cfg.Access
	switch {
	case a.Username == "":
		return smtp.ErrAuthUnsupported
	case s.access.tls:
		return nil
	case a.RequireTLS || !s.access.loopback:
		// Credentials never cross a network in clear text.
		return replyAuthNeedsTLS
	}
	return nil
}

// AuthMechanisms implements smtp.AuthSession: PLAIN and LOGIN, when client
// authentication is set and allowed on this connection (over TLS, or in
// plain text from loopback); none otherwise, and EHLO offers no AUTH.
func (s *session) AuthMechanisms() []string {
	if s.authRefusal() != nil {
		return nil
	}
	return []string{sasl.Plain, sasl.Login}
}

// Auth implements smtp.AuthSession.
func (s *session) Auth(mech string) (sasl.Server, error) {
	if err := s.authRefusal(); err != nil {
		return nil, err
	}
	switch mech {
	case sasl.Plain:
		return authReplies{sasl.NewPlainServer(func(identity, username, password string) error {
			if identity != "" && identity != username {
				return s.authenticate(mech, "", "") // acting as another user is not offered
			}
			return s.authenticate(mech, username, password)
		})}, nil
	case sasl.Login:
		return authReplies{&loginServer{check: func(username, password string) error {
			return s.authenticate(mech, username, password)
		}}}, nil
	}
	return nil, smtp.ErrAuthUnknownMechanism
}

// authenticate checks a client's credentials. The password is never
// logged. A wrong one is answered after authFailureDelay; after
// maxAuthFailures of them the connection ends.
func (s *session) authenticate(mech, username, password string) error {
	a := s.b.cfg.Access
	if a.credentialsMatch(username, password) {
		s.access.authed = true
		s.b.log.Debug("client authenticated", "client", s.client, "mechanism", mech)
		return nil
	}
	s.access.failures++
	s.b.log.Warn("client authentication failed", "client", s.client, "mechanism", mech,
		"username_matched", a.credentialsMatch(username, a.Password), "failures", s.access.failures)
	delay := a.failureDelay
	if delay == 0 {
		delay = authFailureDelay
	}
	time.Sleep(delay)
	if s.access.failures >= maxAuthFailures && s.conn != nil {
		s.conn.hangUp()
	}
	return smtp.ErrAuthFailed
}

// authReplies gives a SASL exchange's errors SMTP replies of their own:
// go-smtp would answer any other error with 454 and its text.
type authReplies struct{ sasl.Server }

func (a authReplies) Next(response []byte) ([]byte, bool, error) {
	challenge, done, err := a.Server.Next(response)
	if _, ok := err.(*smtp.SMTPError); err != nil && !ok {
		err = replyAuthMalformed
	}
	return challenge, done, err
}

// loginServer is the server side of the LOGIN mechanism, which go-sasl
// implements only as a client.
type loginServer struct {
	check    func(username, password string) error
	username string
	step     int
}

func (l *loginServer) Next(response []byte) ([]byte, bool, error) {
	l.step++
	switch l.step {
	case 1:
		if len(response) > 0 { // an initial response carries the user name
			l.username = string(response)
			l.step++
			return []byte("Password:"), false, nil
		}
		return []byte("Username:"), false, nil
	case 2:
		l.username = string(response)
		return []byte("Password:"), false, nil
	}
	return nil, true, l.check(l.username, string(response))
}
