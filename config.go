package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"reflect"
	"strings"
	"time"

	"github.com/caarlos0/env/v11"

	"github.com/smtppool/smtppool/pool"
	"github.com/smtppool/smtppool/proxy"
)

// config is smtppool's whole configuration, read from the environment. Its
// defaults come from defaultConfig; the help tags, and the default tags of
// values that are not literal, are printed by -h.
type config struct {
	ListenAddr string `env:"SMTPPOOL_LISTEN_ADDR" help:"where clients connect"`

	// Who may send: see access.go and README.md's Security section.
	AllowedNetworks    []string `env:"SMTPPOOL_ALLOWED_NETWORKS" envSeparator:"," help:"comma-separated networks (CIDR) or addresses of the clients that may connect; others get 554 5.7.1 instead of the greeting"`
	MaxClientConns     int      `env:"SMTPPOOL_MAX_CLIENT_CONNS" default:"derived from memory" help:"most client connections open at once; beyond it, new ones get 421 4.7.0 instead of the greeting. Unset, it is what the memory smtppool may use holds: GOMEMLIMIT if set, else 90% of the container's memory limit (cgroup v2 memory.max, or v1 memory.limit_in_bytes), which smtppool then sets as GOMEMLIMIT (AUTOMEMLIMIT: another ratio, or off), less the message buffer budget (SMTPPOOL_MAX_BUFFER_BYTES) and 16 MiB, at 20 KiB per client; 10000 without a memory limit; never more than the open-files limit allows. The start-up log shows the figures"`
	ClientUsername     string   `env:"SMTPPOOL_CLIENT_USERNAME" help:"if set, clients must authenticate with it and SMTPPOOL_CLIENT_PASSWORD (AUTH PLAIN or LOGIN) before MAIL; AUTH is offered over TLS, and in plain text to loopback clients only"`
	ClientPassword     string   `env:"SMTPPOOL_CLIENT_PASSWORD" help:"the password clients authenticate with"`
	ClientPasswordFile string   `env:"SMTPPOOL_CLIENT_PASSWORD_FILE" help:"file holding the client password (one trailing newline is ignored)"`
	ListenTLSCert      string   `env:"SMTPPOOL_LISTEN_TLS_CERT" help:"PEM certificate file (with its chain); with SMTPPOOL_LISTEN_TLS_KEY, clients may use STARTTLS; both are read again when they change"`
	ListenTLSKey       string   `env:"SMTPPOOL_LISTEN_TLS_KEY" help:"PEM private key file of SMTPPOOL_LISTEN_TLS_CERT"`
	ListenRequireTLS   bool     `env:"SMTPPOOL_LISTEN_REQUIRE_TLS" help:"refuse MAIL and AUTH before STARTTLS, to every client"`
	LogAddresses       bool     `env:"SMTPPOOL_LOG_ADDRESSES" help:"log envelope addresses at info level; otherwise only at debug"`

	Hostname  string `env:"SMTPPOOL_HOSTNAME" default:"the host name" help:"name in the greeting and in EHLO to the upstream"`
	AdminAddr string `env:"SMTPPOOL_ADMIN_ADDR" help:"where the HTTP endpoints /healthz, /readyz and /metrics listen; empty disables them"`

	UpstreamAddr         string       `env:"SMTPPOOL_UPSTREAM_ADDR" default:"required" help:"upstream host:port, or several, comma-separated, tried in order (failover); required, except in demo mode"`
	UpstreamTLS          pool.TLSMode `env:"SMTPPOOL_UPSTREAM_TLS" help:"none, opportunistic (STARTTLS when offered), starttls (required) or tls (implicit TLS, port 465)"`
	UpstreamCAFile       string       `env:"SMTPPOOL_UPSTREAM_CA_FILE" help:"PEM file of CA certificates trusted for the upstream instead of the system roots"`
	UpstreamUsername     string       `env:"SMTPPOOL_UPSTREAM_USERNAME" help:"upstream AUTH user name (AUTH PLAIN, or LOGIN)"`
	UpstreamPassword     string       `env:"SMTPPOOL_UPSTREAM_PASSWORD" help:"upstream AUTH password"`
	UpstreamPasswordFile string       `env:"SMTPPOOL_UPSTREAM_PASSWORD_FILE" help:"file holding the upstream AUTH password (one trailing newline is ignored)"`
	AllowInsecureAuth    bool         `env:"SMTPPOOL_UPSTREAM_ALLOW_INSECURE_AUTH" help:"allow sending credentials over an unencrypted upstream connection"`
	UpstreamAuth         string       `env:"SMTPPOOL_UPSTREAM_AUTH" help:"auto (PLAIN, else LOGIN, when a password is set), plain, login or xoauth2 (OAuth2 for Microsoft 365 or Google)"`

	OAuth2TokenURL         string   `env:"SMTPPOOL_OAUTH2_TOKEN_URL" help:"xoauth2: the token endpoint of the client-credentials grant, for Microsoft https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token"`
	OAuth2ClientID         string   `env:"SMTPPOOL_OAUTH2_CLIENT_ID" help:"xoauth2: the application (client) ID"`
	OAuth2ClientSecret     string   `env:"SMTPPOOL_OAUTH2_CLIENT_SECRET" help:"xoauth2: the client secret's value"`
	OAuth2ClientSecretFile string   `env:"SMTPPOOL_OAUTH2_CLIENT_SECRET_FILE" help:"xoauth2: file holding the client secret (one trailing newline is ignored)"`
	OAuth2Scopes           []string `env:"SMTPPOOL_OAUTH2_SCOPES" envSeparator:"," help:"xoauth2: comma-separated scopes, for Microsoft https://outlook.office365.com/.default, for Google https://mail.google.com/"`
	OAuth2TokenFile        string   `env:"SMTPPOOL_OAUTH2_TOKEN_FILE" help:"xoauth2: instead of the grant, a file holding a token that an external agent keeps fresh; read again when it changes"`

	MaxConns           int32         `env:"SMTPPOOL_MAX_CONNS" help:"hard cap on upstream connections, never exceeded"`
	RateLimit          float64       `env:"SMTPPOOL_RATE_LIMIT" help:"most messages per minute sent upstream, for an upstream that refuses messages beyond a rate; 0 means no limit. Not for Exchange Online: beyond 30 messages a minute per mailbox it delays delivery, it does not refuse, and its limit is its 3 sessions (SMTPPOOL_MAX_CONNS)"`
	RateBurst          int           `env:"SMTPPOOL_RATE_BURST" help:"messages that may go at once under SMTPPOOL_RATE_LIMIT"`
	MinIdleConns       int32         `env:"SMTPPOOL_MIN_IDLE_CONNS" help:"upstream sessions kept open and idle, ready for a burst, past SMTPPOOL_MAX_CONN_IDLE_TIME; they count against SMTPPOOL_MAX_CONNS"`
	AcquireTimeout     time.Duration `env:"SMTPPOOL_ACQUIRE_TIMEOUT" help:"how long a transaction may wait for a free upstream session (at MAIL, for its buffer space and a session together); with SMTPPOOL_RETRY_TIMEOUT, within the 5 minutes RFC 5321 gives a client for the reply to MAIL"`
	RetryTimeout       time.Duration `env:"SMTPPOOL_RETRY_TIMEOUT" help:"how long a command that failed transiently is retried, from its first failure, before the client hears of it"`
	MaxAttempts        int           `env:"SMTPPOOL_MAX_ATTEMPTS" help:"if above 0, also bounds the tries per transaction; 0 leaves only SMTPPOOL_RETRY_TIMEOUT"`
	RetryBackoff       time.Duration `env:"SMTPPOOL_RETRY_BACKOFF" help:"least pause before the second try, doubled for each further one, plus up to half again at random"`
	RetryBackoffMax    time.Duration `env:"SMTPPOOL_RETRY_BACKOFF_MAX" help:"longest pause between tries"`
	TransactionTimeout time.Duration `env:"SMTPPOOL_TRANSACTION_TIMEOUT" help:"longest a client transaction may last once it holds an upstream session, so that a slow or stalled client (NOOPs, a message body sent slowly with DATA or in BDAT chunks) cannot keep the session; then the session is freed, nothing is relayed, and the client gets 451 4.4.2 (in a message, at its end). A command already sent upstream is not cut short: the upstream's reply is bounded by the command and data timeouts"`
	MaxConnLifetime    time.Duration `env:"SMTPPOOL_MAX_CONN_LIFETIME" help:"renew an upstream session after this long"`
	MaxConnIdleTime    time.Duration `env:"SMTPPOOL_MAX_CONN_IDLE_TIME" help:"close upstream sessions idle longer than this (but SMTPPOOL_MIN_IDLE_CONNS): an idle session holds one of the upstream's connections, which other replicas may need"`
	MaxMessagesPerConn int           `env:"SMTPPOOL_MAX_MESSAGES_PER_CONN" help:"renew an upstream session after this many messages"`
	ConnectTimeout     time.Duration `env:"SMTPPOOL_CONNECT_TIMEOUT" help:"limit on dial, greeting, EHLO, STARTTLS and AUTH of a new upstream session"`
	CommandTimeout     time.Duration `env:"SMTPPOOL_COMMAND_TIMEOUT" help:"limit on each upstream reply"`
	DataTimeout        time.Duration `env:"SMTPPOOL_DATA_TIMEOUT" help:"limit on the upstream's reply to the end of a message"`

	MaxMessageBytes int64         `env:"SMTPPOOL_MAX_MESSAGE_BYTES" help:"larger messages get 552 5.3.4"`
	MaxBufferBytes  int64         `env:"SMTPPOOL_MAX_BUFFER_BYTES" default:"derived from memory" help:"memory for messages buffered at once, each counted at SMTPPOOL_MAX_MESSAGE_BYTES from MAIL until it is relayed. Unset, with a memory limit (the memory smtppool may use: see SMTPPOOL_MAX_CLIENT_CONNS), it is half of that limit after 16 MiB (with SMTPPOOL_MAX_CLIENT_CONNS set, what its clients leave of it, at 20 KiB each), in whole messages, at least one and at most 2 x SMTPPOOL_MAX_CONNS x SMTPPOOL_MAX_MESSAGE_BYTES, which is the budget without a memory limit. The start-up log shows the figures"`
	MaxRecipients   int           `env:"SMTPPOOL_MAX_RECIPIENTS" help:"more recipients per message get 452 4.5.3"`
	ClientTimeout   time.Duration `env:"SMTPPOOL_CLIENT_TIMEOUT" help:"disconnect a client silent for this long"`
	ShutdownTimeout time.Duration `env:"SMTPPOOL_SHUTDOWN_TIMEOUT" help:"on SIGTERM, how long open client connections may finish before they are closed; a second signal stops at once"`

	LogLevel  slog.Level `env:"SMTPPOOL_LOG_LEVEL" help:"debug, info, warn or error"`
	LogFormat string     `env:"SMTPPOOL_LOG_FORMAT" help:"json or text"`
}

// defaultConfig is the configuration before the environment is read: the
// pool's and the proxy's own defaults, and smtppool's.
func defaultConfig() config {
	pd, xd := pool.DefaultConfig(), proxy.DefaultConfig()
	ld := proxy.DefaultListenConfig()
	return config{
		ListenAddr:         "127.0.0.1:2525",
		AllowedNetworks:    formatNetworks(ld.AllowedNetworks),
		AdminAddr:          "127.0.0.1:9025",
		UpstreamTLS:        pd.TLS,
		UpstreamAuth:       "auto",
		MaxConns:           pd.MaxConns,
		MinIdleConns:       pd.MinIdleConns,
		RateLimit:          pd.RateLimit,
		RateBurst:          pd.RateBurst,
		AcquireTimeout:     xd.AcquireTimeout,
		RetryTimeout:       xd.RetryTimeout,
		MaxAttempts:        xd.MaxAttempts,
		RetryBackoff:       xd.RetryBackoff,
		RetryBackoffMax:    xd.RetryBackoffMax,
		TransactionTimeout: xd.TransactionTimeout,
		MaxConnLifetime:    pd.MaxConnLifetime,
		MaxConnIdleTime:    pd.MaxConnIdleTime,
		MaxMessagesPerConn: pd.MaxMessagesPerConn,
		ConnectTimeout:     pd.ConnectTimeout,
		CommandTimeout:     pd.CommandTimeout,
		DataTimeout:        pd.DataTimeout,
		MaxMessageBytes:    xd.MaxMessageBytes,
		MaxRecipients:      xd.MaxRecipients,
		ClientTimeout:      xd.ClientTimeout,
		ShutdownTimeout:    20 * time.Second,
		LogLevel:           slog.LevelInfo,
		LogFormat:          "json",
	}
}

// loadConfig reads the configuration from environ (KEY=value strings) over
// the defaults, and checks it. Every error names the variable at fault.
func loadConfig(environ []string, demo bool) (config, error) {
	cfg := defaultConfig()
	vars := env.ToMap(environ)
	if err := env.ParseWithOptions(&cfg, env.Options{Environment: vars}); err != nil {
		return cfg, explainEnvError(err)
	}
	scopes := cfg.OAuth2Scopes[:0]
	for _, sc := range cfg.OAuth2Scopes {
		if sc = strings.TrimSpace(sc); sc != "" {
			scopes = append(scopes, sc)
		}
	}
	cfg.OAuth2Scopes = scopes
	if v, ok := vars["SMTPPOOL_ADMIN_ADDR"]; ok && v == "" {
		cfg.AdminAddr = "" // set and empty: disabled
	}
	if err := readSecret(&cfg.UpstreamPassword, cfg.UpstreamPasswordFile, "SMTPPOOL_UPSTREAM_PASSWORD"); err != nil {
		return cfg, err
	}
	if err := readSecret(&cfg.OAuth2ClientSecret, cfg.OAuth2ClientSecretFile, "SMTPPOOL_OAUTH2_CLIENT_SECRET"); err != nil {
		return cfg, err
	}
	if err := readAccess(&cfg, vars); err != nil {
		return cfg, err
	}
	return cfg, cfg.check(demo)
}

// readSecret sets *secret from file, if a file is named; name is the
// variable of the secret, name+"_FILE" that of the file.
func readSecret(secret *string, file, name string) error {
	if file == "" {
		return nil
	}
	if *secret != "" {
		return fmt.Errorf("%s and %s_FILE are both set; set one", name, name)
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return fmt.Errorf("%s_FILE: %w", name, err)
	}
	*secret = strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r")
	return nil
}

// check validates values that parsed but make no sense together or alone.
func (c *config) check(demo bool) error {
	var errs []error
	add := func(name, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", name, fmt.Sprintf(format, args...)))
	}
	if _, _, err := net.SplitHostPort(c.ListenAddr); err != nil {
		add("SMTPPOOL_LISTEN_ADDR", "%q is not host:port: %v", c.ListenAddr, err)
	}
	c.checkAccess(add)
	switch {
	case demo:
	case c.UpstreamAddr == "":
		add("SMTPPOOL_UPSTREAM_ADDR", "required: the upstream relay's host:port, such as smtp.example.com:587 (or run \"smtppool demo\")")
	default:
		for _, a := range strings.Split(c.UpstreamAddr, ",") {
			if _, _, err := net.SplitHostPort(strings.TrimSpace(a)); err != nil {
				add("SMTPPOOL_UPSTREAM_ADDR", "%q is not host:port: %v", strings.TrimSpace(a), err)
			}
		}
	}
	if !demo {
		c.checkAuth(add)
	}
	outOfBounds := map[string]bool{}
	for _, b := range c.bounds() {
		switch {
		case b.value < b.min:
			add(b.name, "%s is below the least sensible value, %s", b.format(b.value), b.format(b.min))
		case b.value > b.max:
			add(b.name, "%s is above the greatest sensible value, %s", b.format(b.value), b.format(b.max))
		default:
			continue
		}
		outOfBounds[b.name] = true
	}
	// A bad SMTPPOOL_MAX_CONNS has its own error above.
	if c.MinIdleConns < 0 || !outOfBounds["SMTPPOOL_MAX_CONNS"] && c.MinIdleConns > c.MaxConns {
		add("SMTPPOOL_MIN_IDLE_CONNS", "%d is not between 0 and SMTPPOOL_MAX_CONNS, %d", c.MinIdleConns, c.MaxConns)
	}
	if c.RateLimit < 0 {
		add("SMTPPOOL_RATE_LIMIT", "%v is negative; 0 means no limit", c.RateLimit)
	}
	if c.RetryBackoffMax < c.RetryBackoff {
		add("SMTPPOOL_RETRY_BACKOFF_MAX", "%s is less than SMTPPOOL_RETRY_BACKOFF, %s", c.RetryBackoffMax, c.RetryBackoff)
	}
	if c.MaxBufferBytes != 0 && c.MaxBufferBytes < c.MaxMessageBytes {
		add("SMTPPOOL_MAX_BUFFER_BYTES", "%d is less than SMTPPOOL_MAX_MESSAGE_BYTES, %d: no message could be buffered", c.MaxBufferBytes, c.MaxMessageBytes)
	}
	if c.AdminAddr != "" {
		if _, _, err := net.SplitHostPort(c.AdminAddr); err != nil {
			add("SMTPPOOL_ADMIN_ADDR", "%q is not host:port: %v", c.AdminAddr, err)
		}
	}
	if c.Hostname != "" && !isDomain(c.Hostname) {
		add("SMTPPOOL_HOSTNAME", "%q is not a valid domain name", c.Hostname)
	}
	if c.LogFormat != "json" && c.LogFormat != "text" {
		add("SMTPPOOL_LOG_FORMAT", "%q is not json or text", c.LogFormat)
	}
	if c.UpstreamCAFile != "" {
		if _, err := c.rootCAs(); err != nil {
			add("SMTPPOOL_UPSTREAM_CA_FILE", "%v", err)
		}
	}
	return joinErrors(errs)
}

// checkAuth validates the upstream credentials for the chosen mechanism.
func (c *config) checkAuth(add func(name, format string, args ...any)) {
	oauth2Set := c.OAuth2TokenURL != "" || c.OAuth2ClientID != "" || c.OAuth2ClientSecret != "" ||
		len(c.OAuth2Scopes) > 0 || c.OAuth2TokenFile != ""
	switch c.UpstreamAuth {
	case "auto", "plain", "login":
		switch {
		case oauth2Set:
			add("SMTPPOOL_UPSTREAM_AUTH", "is %s, but SMTPPOOL_OAUTH2_ variables are set; set SMTPPOOL_UPSTREAM_AUTH=xoauth2 to use them", c.UpstreamAuth)
		case c.UpstreamUsername != "" && c.UpstreamPassword == "":
			add("SMTPPOOL_UPSTREAM_PASSWORD", "required when SMTPPOOL_UPSTREAM_USERNAME is set (or use SMTPPOOL_UPSTREAM_PASSWORD_FILE)")
		case c.UpstreamUsername == "" && c.UpstreamPassword != "":
			add("SMTPPOOL_UPSTREAM_USERNAME", "required when a password is set")
		case c.UpstreamUsername == "" && c.UpstreamAuth != "auto":
			add("SMTPPOOL_UPSTREAM_USERNAME", "required with SMTPPOOL_UPSTREAM_AUTH=%s", c.UpstreamAuth)
		}
	case "xoauth2":
		switch {
		case c.UpstreamUsername == "":
			add("SMTPPOOL_UPSTREAM_USERNAME", "required with SMTPPOOL_UPSTREAM_AUTH=xoauth2: the mailbox to send as")
		case c.UpstreamPassword != "":
			add("SMTPPOOL_UPSTREAM_PASSWORD", "is set, but SMTPPOOL_UPSTREAM_AUTH=xoauth2 uses a token, not a password")
		case c.OAuth2TokenFile != "" && (c.OAuth2TokenURL != "" || c.OAuth2ClientID != "" || c.OAuth2ClientSecret != ""):
			add("SMTPPOOL_OAUTH2_TOKEN_FILE", "is set with SMTPPOOL_OAUTH2_TOKEN_URL, _CLIENT_ID or _CLIENT_SECRET; set either the file or the grant")
		case c.OAuth2TokenFile != "":
		case c.OAuth2TokenURL == "":
			add("SMTPPOOL_OAUTH2_TOKEN_URL", "required with SMTPPOOL_UPSTREAM_AUTH=xoauth2 (or set SMTPPOOL_OAUTH2_TOKEN_FILE), for Microsoft https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token")
		case c.OAuth2ClientID == "":
			add("SMTPPOOL_OAUTH2_CLIENT_ID", "required with SMTPPOOL_OAUTH2_TOKEN_URL")
		case c.OAuth2ClientSecret == "":
			add("SMTPPOOL_OAUTH2_CLIENT_SECRET", "required with SMTPPOOL_OAUTH2_TOKEN_URL (or use SMTPPOOL_OAUTH2_CLIENT_SECRET_FILE)")
		case len(c.OAuth2Scopes) == 0:
			add("SMTPPOOL_OAUTH2_SCOPES", "required with SMTPPOOL_OAUTH2_TOKEN_URL, for Microsoft https://outlook.office365.com/.default")
		}
	default:
		add("SMTPPOOL_UPSTREAM_AUTH", "%q is not auto, plain, login or xoauth2", c.UpstreamAuth)
	}
	if c.UpstreamUsername != "" && c.UpstreamTLS == pool.TLSNone && !c.AllowInsecureAuth {
		add("SMTPPOOL_UPSTREAM_TLS", "is none, so credentials would cross the network in clear text; use TLS or set SMTPPOOL_UPSTREAM_ALLOW_INSECURE_AUTH=true")
	}
}

// bound is the sensible range of one numeric variable.
type bound struct {
	name            string
	value, min, max int64
	format          func(int64) string
}

// bounds lists the ranges of the numeric variables: below the least value
// smtppool cannot work, above the greatest the value is surely a mistake.
func (c *config) bounds() []bound {
	d := func(name string, v, lo, hi time.Duration) bound {
		return bound{name, int64(v), int64(lo), int64(hi), func(n int64) string { return time.Duration(n).String() }}
	}
	n := func(name string, v, lo, hi int64) bound {
		return bound{name, v, lo, hi, func(n int64) string { return fmt.Sprint(n) }}
	}
	maxBuffer := c.MaxBufferBytes
	if maxBuffer == 0 {
		maxBuffer = 1 // unset: derived
	}
	return []bound{
		n("SMTPPOOL_MAX_CONNS", int64(c.MaxConns), 1, 1000),
		d("SMTPPOOL_ACQUIRE_TIMEOUT", c.AcquireTimeout, time.Millisecond, time.Hour),
		d("SMTPPOOL_RETRY_TIMEOUT", c.RetryTimeout, time.Millisecond, time.Hour),
		n("SMTPPOOL_MAX_ATTEMPTS", int64(c.MaxAttempts), 0, 1000),
		n("SMTPPOOL_RATE_LIMIT", int64(c.RateLimit), 0, 1_000_000),
		n("SMTPPOOL_RATE_BURST", int64(c.RateBurst), 1, 10_000),
		d("SMTPPOOL_RETRY_BACKOFF", c.RetryBackoff, time.Millisecond, time.Hour),
		d("SMTPPOOL_RETRY_BACKOFF_MAX", c.RetryBackoffMax, time.Millisecond, time.Hour),
		d("SMTPPOOL_TRANSACTION_TIMEOUT", c.TransactionTimeout, time.Second, 24*time.Hour),
		d("SMTPPOOL_MAX_CONN_LIFETIME", c.MaxConnLifetime, time.Millisecond, 24*time.Hour),
		d("SMTPPOOL_MAX_CONN_IDLE_TIME", c.MaxConnIdleTime, time.Millisecond, 24*time.Hour),
		n("SMTPPOOL_MAX_MESSAGES_PER_CONN", int64(c.MaxMessagesPerConn), 1, 1_000_000),
		d("SMTPPOOL_CONNECT_TIMEOUT", c.ConnectTimeout, time.Millisecond, time.Hour),
		d("SMTPPOOL_COMMAND_TIMEOUT", c.CommandTimeout, time.Millisecond, time.Hour),
		d("SMTPPOOL_DATA_TIMEOUT", c.DataTimeout, time.Millisecond, time.Hour),
		n("SMTPPOOL_MAX_MESSAGE_BYTES", c.MaxMessageBytes, 1024, 1<<30),
		n("SMTPPOOL_MAX_BUFFER_BYTES", maxBuffer, 1, 64<<30),
		n("SMTPPOOL_MAX_RECIPIENTS", int64(c.MaxRecipients), 1, 10_000),
		d("SMTPPOOL_CLIENT_TIMEOUT", c.ClientTimeout, time.Second, 24*time.Hour),
		d("SMTPPOOL_SHUTDOWN_TIMEOUT", c.ShutdownTimeout, time.Millisecond, time.Hour),
	}
}

// isDomain reports whether name is a syntactically valid domain name, as
// the greeting and EHLO need: dot-separated labels of letters, digits and
// inner hyphens.
func isDomain(name string) bool {
	name = strings.TrimSuffix(name, ".")
	if name == "" || len(name) > 253 {
		return false
	}
	for _, label := range strings.Split(name, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, ch := range label {
			if !(ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' || ch == '-') {
				return false
			}
		}
	}
	return true
}

// joinErrors joins errs on one line, so that start-up fails with one line.
func joinErrors(errs []error) error {
	if len(errs) == 0 {
		return nil
	}
	msgs := make([]string, len(errs))
	for i, err := range errs {
		msgs[i] = err.Error()
	}
	return errors.New(strings.Join(msgs, "; "))
}

func (c *config) rootCAs() (*x509.CertPool, error) {
	pem, err := os.ReadFile(c.UpstreamCAFile)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("no PEM certificate in %s", c.UpstreamCAFile)
	}
	return roots, nil
}

func (c *config) poolConfig(logger *slog.Logger) (pool.Config, error) {
	pc := pool.Config{
		Addr:               c.UpstreamAddr,
		TLS:                c.UpstreamTLS,
		AllowInsecureAuth:  c.AllowInsecureAuth,
		LocalName:          c.Hostname,
		MaxConns:           c.MaxConns,
		MinIdleConns:       c.MinIdleConns,
		RateLimit:          c.RateLimit,
		RateBurst:          c.RateBurst,
		MaxConnLifetime:    c.MaxConnLifetime,
		MaxConnIdleTime:    c.MaxConnIdleTime,
		MaxMessagesPerConn: c.MaxMessagesPerConn,
		AcquireTimeout:     c.AcquireTimeout,
		ConnectTimeout:     c.ConnectTimeout,
		CommandTimeout:     c.CommandTimeout,
		DataTimeout:        c.DataTimeout,
		Logger:             logger,
	}
	auth, err := c.authenticator(logger)
	if err != nil {
		return pc, err
	}
	pc.Auth = auth
	if c.UpstreamCAFile != "" {
		roots, err := c.rootCAs()
		if err != nil {
			return pc, fmt.Errorf("SMTPPOOL_UPSTREAM_CA_FILE: %w", err)
		}
		pc.TLSConfig = &tls.Config{RootCAs: roots}
	}
	return pc, nil
}

// authenticator returns the upstream AUTH the configuration asks for, or
// nil for none.
func (c *config) authenticator(logger *slog.Logger) (pool.Authenticator, error) {
	switch {
	case c.UpstreamUsername == "":
		return nil, nil
	case c.UpstreamAuth != "xoauth2":
		mech := strings.ToUpper(c.UpstreamAuth)
		if mech == "AUTO" {
			mech = ""
		}
		return pool.PasswordAuth{Username: c.UpstreamUsername, Password: c.UpstreamPassword, Mechanism: mech}, nil
	case c.OAuth2TokenFile != "":
		src, err := pool.NewFileTokenSource(c.OAuth2TokenFile)
		if err != nil {
			return nil, fmt.Errorf("SMTPPOOL_OAUTH2_TOKEN_FILE: %w", err)
		}
		return pool.OAuth2Auth{Username: c.UpstreamUsername, Tokens: src}, nil
	}
	src, err := pool.NewClientCredentialsTokenSource(pool.ClientCredentials{
		TokenURL: c.OAuth2TokenURL, ClientID: c.OAuth2ClientID, ClientSecret: c.OAuth2ClientSecret,
		Scopes: c.OAuth2Scopes, Logger: logger})
	if err != nil {
		return nil, fmt.Errorf("SMTPPOOL_OAUTH2_TOKEN_URL: %w", err)
	}
	return pool.OAuth2Auth{Username: c.UpstreamUsername, Tokens: src}, nil
}

func (c *config) proxyConfig(logger *slog.Logger) proxy.Config {
	return proxy.Config{
		Hostname:           c.Hostname,
		MaxMessageBytes:    c.MaxMessageBytes,
		MaxRecipients:      c.MaxRecipients,
		AcquireTimeout:     c.AcquireTimeout,
		MaxBufferBytes:     c.MaxBufferBytes,
		RetryTimeout:       c.RetryTimeout,
		MaxAttempts:        c.MaxAttempts,
		RetryBackoff:       c.RetryBackoff,
		RetryBackoffMax:    c.RetryBackoffMax,
		TransactionTimeout: c.TransactionTimeout,
		ClientTimeout:      c.ClientTimeout,
		Logger:             logger,
	}
}

// LogValue describes the configuration for the start-up log line, without
// the password.
func (c config) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("listen", c.ListenAddr),
		slog.String("admin", c.AdminAddr),
		slog.Attr{Key: "access", Value: c.accessDescription()},
		slog.String("upstream", c.UpstreamAddr),
		slog.String("upstream_tls", c.UpstreamTLS.String()),
		slog.String("upstream_auth", c.authDescription()),
		slog.Int("max_conns", int(c.MaxConns)),
		slog.String("acquire_timeout", c.AcquireTimeout.String()),
		slog.String("retry_timeout", c.RetryTimeout.String()),
		slog.Int("max_attempts", c.MaxAttempts),
		slog.Int("max_messages_per_conn", c.MaxMessagesPerConn),
		slog.String("max_conn_lifetime", c.MaxConnLifetime.String()),
		slog.Int64("max_message_bytes", c.MaxMessageBytes),
		slog.String("shutdown_timeout", c.ShutdownTimeout.String()),
	)
}

// authDescription says how smtppool authenticates upstream, for the log.
func (c config) authDescription() string {
	switch {
	case c.UpstreamUsername == "":
		return "none"
	case c.UpstreamAuth == "xoauth2" && c.OAuth2TokenFile != "":
		return "xoauth2 (token file)"
	case c.UpstreamAuth == "xoauth2":
		return "xoauth2 (client credentials)"
	}
	return c.UpstreamAuth
}

// explainEnvError rewrites env's errors, which name struct fields, to name
// the environment variables instead, all on one line.
func explainEnvError(err error) error {
	var agg env.AggregateError
	if !errors.As(err, &agg) {
		return err
	}
	keys := envKeys()
	errs := make([]error, 0, len(agg.Errors))
	for _, e := range agg.Errors {
		var pe env.ParseError
		if errors.As(e, &pe) {
			e = fmt.Errorf("%s: invalid value: %w", keys[pe.Name], pe.Err)
		}
		errs = append(errs, e)
	}
	return joinErrors(errs)
}

// envVar describes one configuration variable, from the config struct tags.
type envVar struct {
	field, key, def, help string
}

func envVars() []envVar {
	defaults := reflect.ValueOf(defaultConfig())
	t := defaults.Type()
	vars := make([]envVar, 0, t.NumField())
	for i := range t.NumField() {
		f := t.Field(i)
		key, _, _ := strings.Cut(f.Tag.Get("env"), ",")
		def := f.Tag.Get("default")
		if def == "" {
			def = formatDefault(defaults.Field(i))
		}
		vars = append(vars, envVar{field: f.Name, key: key, def: def, help: f.Tag.Get("help")})
	}
	return vars
}

// formatDefault writes a default value as it would be set in the
// environment ("unset" for an empty string).
func formatDefault(v reflect.Value) string {
	switch x := v.Interface().(type) {
	case time.Duration:
		s := x.String()
		if strings.HasSuffix(s, "m0s") {
			s = strings.TrimSuffix(s, "0s")
		}
		if strings.HasSuffix(s, "h0m") {
			s = strings.TrimSuffix(s, "0m")
		}
		return s
	case slog.Level:
		return strings.ToLower(x.String())
	case fmt.Stringer:
		return x.String()
	case string:
		if x == "" {
			return "unset"
		}
		return x
	case []string:
		if len(x) == 0 {
			return "unset"
		}
		return strings.Join(x, ",")
	}
	return fmt.Sprint(v.Interface())
}

func envKeys() map[string]string {
	keys := map[string]string{}
	for _, v := range envVars() {
		keys[v.field] = v.key
	}
	return keys
}

// printUsage writes the -h text: the commands and every variable with its
// default.
func printUsage(w io.Writer) {
	fmt.Fprint(w, `Usage: smtppool [demo]

smtppool relays SMTP from local clients over a capped pool of long-lived,
authenticated upstream sessions. It is configured with environment variables.

  smtppool        relay to SMTPPOOL_UPSTREAM_ADDR
  smtppool demo   relay to an embedded demo upstream that logs what it receives
  smtppool -version  print the version and exit

Environment:
`)
	for _, v := range envVars() {
		fmt.Fprintf(w, "  %s (default %s)\n      %s\n", v.key, v.def, v.help)
	}
}

// mailReplyTimeout is how long RFC 5321 (section 4.5.3.2.2) lets a client
// wait for the reply to MAIL, where smtppool holds a client that waits
// for a session.
const mailReplyTimeout = 5 * time.Minute

// waitWarnings returns warnings for the start-up log about how long
// clients wait: a rate limit that cannot let the clients smtppool holds
// through within the acquire timeout, and waits longer than a client that
// keeps to RFC 5321 waits for the reply to MAIL.
func (c *config) waitWarnings() []string {
	var warnings []string
	if c.RateLimit > 0 {
		through := c.RateLimit*c.AcquireTimeout.Minutes() + float64(c.RateBurst)
		if through < float64(c.MaxClientConns) {
			warnings = append(warnings, fmt.Sprintf("SMTPPOOL_RATE_LIMIT (%v a minute) lets %d messages through in SMTPPOOL_ACQUIRE_TIMEOUT (%v), "+
				"fewer than the %d clients SMTPPOOL_MAX_CLIENT_CONNS lets wait: the rest of a larger burst gets 451 4.4.5 at the acquire timeout. "+
				"Exchange Online needs no rate limit: beyond 30 messages a minute it delays delivery, it does not refuse",
				c.RateLimit, int64(through), c.AcquireTimeout, c.MaxClientConns))
		}
	}
	if c.AcquireTimeout+c.RetryTimeout > mailReplyTimeout {
		warnings = append(warnings, fmt.Sprintf("SMTPPOOL_ACQUIRE_TIMEOUT (%v) and SMTPPOOL_RETRY_TIMEOUT (%v) add up to more than the %v RFC 5321 gives a client for the reply to MAIL: "+
			"a client that keeps to it may give up before smtppool answers (Mattermost waits without a limit)",
			c.AcquireTimeout, c.RetryTimeout, mailReplyTimeout))
	}
	return warnings
}
