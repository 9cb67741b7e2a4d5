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

// config is smtppool's whole configuration, read from the environment. The
// help tags are printed by -h.
type config struct {
	ListenAddr         string `env:"SMTPPOOL_LISTEN_ADDR" envDefault:"127.0.0.1:2525" help:"where clients connect"`
	AllowRemoteClients bool   `env:"SMTPPOOL_ALLOW_REMOTE_CLIENTS" envDefault:"false" help:"allow a listen address other than loopback; whoever reaches it can send mail as the upstream account"`
	Hostname           string `env:"SMTPPOOL_HOSTNAME" help:"name in the greeting and in EHLO to the upstream (default: the host name)"`

	UpstreamAddr         string       `env:"SMTPPOOL_UPSTREAM_ADDR" help:"upstream host:port (required, except in demo mode)"`
	UpstreamTLS          pool.TLSMode `env:"SMTPPOOL_UPSTREAM_TLS" envDefault:"opportunistic" help:"none, opportunistic (STARTTLS when offered), starttls (required) or tls (implicit TLS, port 465)"`
	UpstreamCAFile       string       `env:"SMTPPOOL_UPSTREAM_CA_FILE" help:"PEM file of CA certificates trusted for the upstream instead of the system roots"`
	UpstreamUsername     string       `env:"SMTPPOOL_UPSTREAM_USERNAME" help:"upstream AUTH user name (AUTH PLAIN, or LOGIN)"`
	UpstreamPassword     string       `env:"SMTPPOOL_UPSTREAM_PASSWORD" help:"upstream AUTH password"`
	UpstreamPasswordFile string       `env:"SMTPPOOL_UPSTREAM_PASSWORD_FILE" help:"file holding the upstream AUTH password (one trailing newline is ignored)"`
	AllowInsecureAuth    bool         `env:"SMTPPOOL_UPSTREAM_ALLOW_INSECURE_AUTH" envDefault:"false" help:"allow sending credentials over an unencrypted upstream connection"`

	MaxConns           int32         `env:"SMTPPOOL_MAX_CONNS" envDefault:"5" help:"hard cap on upstream connections, never exceeded"`
	AcquireTimeout     time.Duration `env:"SMTPPOOL_ACQUIRE_TIMEOUT" envDefault:"2m" help:"how long a transaction may wait for a free upstream session"`
	MaxAttempts        int           `env:"SMTPPOOL_MAX_ATTEMPTS" envDefault:"4" help:"tries per transaction for transient upstream failures"`
	RetryBackoff       time.Duration `env:"SMTPPOOL_RETRY_BACKOFF" envDefault:"250ms" help:"least pause before the second try, doubled for each further one, plus up to half again at random"`
	RetryBackoffMax    time.Duration `env:"SMTPPOOL_RETRY_BACKOFF_MAX" envDefault:"4s" help:"longest pause between tries"`
	MaxConnLifetime    time.Duration `env:"SMTPPOOL_MAX_CONN_LIFETIME" envDefault:"10m" help:"renew an upstream session after this long"`
	MaxConnIdleTime    time.Duration `env:"SMTPPOOL_MAX_CONN_IDLE_TIME" envDefault:"1m" help:"close upstream sessions idle longer than this"`
	MaxMessagesPerConn int           `env:"SMTPPOOL_MAX_MESSAGES_PER_CONN" envDefault:"100" help:"renew an upstream session after this many messages"`
	ConnectTimeout     time.Duration `env:"SMTPPOOL_CONNECT_TIMEOUT" envDefault:"30s" help:"limit on dial, greeting, EHLO, STARTTLS and AUTH of a new upstream session"`
	CommandTimeout     time.Duration `env:"SMTPPOOL_COMMAND_TIMEOUT" envDefault:"1m" help:"limit on each upstream reply"`
	DataTimeout        time.Duration `env:"SMTPPOOL_DATA_TIMEOUT" envDefault:"10m" help:"limit on the upstream's reply to the end of a message"`

	MaxMessageBytes int64         `env:"SMTPPOOL_MAX_MESSAGE_BYTES" envDefault:"33554432" help:"larger messages get 552 5.3.4"`
	MaxRecipients   int           `env:"SMTPPOOL_MAX_RECIPIENTS" envDefault:"100" help:"more recipients per message get 452 4.5.3"`
	ClientTimeout   time.Duration `env:"SMTPPOOL_CLIENT_TIMEOUT" envDefault:"5m" help:"disconnect a client silent for this long"`
	ShutdownTimeout time.Duration `env:"SMTPPOOL_SHUTDOWN_TIMEOUT" envDefault:"30s" help:"on SIGTERM, how long open client connections may finish before they are closed"`

	LogLevel  slog.Level `env:"SMTPPOOL_LOG_LEVEL" envDefault:"info" help:"debug, info, warn or error"`
	LogFormat string     `env:"SMTPPOOL_LOG_FORMAT" envDefault:"json" help:"json or text"`
}

// loadConfig reads the configuration from environ (KEY=value strings) and
// checks it. Every error names the variable at fault.
func loadConfig(environ []string, demo bool) (config, error) {
	var cfg config
	if err := env.ParseWithOptions(&cfg, env.Options{Environment: env.ToMap(environ)}); err != nil {
		return cfg, explainEnvError(err)
	}
	if cfg.UpstreamPasswordFile != "" {
		if cfg.UpstreamPassword != "" {
			return cfg, errors.New("SMTPPOOL_UPSTREAM_PASSWORD and SMTPPOOL_UPSTREAM_PASSWORD_FILE are both set; set one")
		}
		b, err := os.ReadFile(cfg.UpstreamPasswordFile)
		if err != nil {
			return cfg, fmt.Errorf("SMTPPOOL_UPSTREAM_PASSWORD_FILE: %w", err)
		}
		cfg.UpstreamPassword = strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r")
	}
	return cfg, cfg.check(demo)
}

// check validates values that parsed but make no sense together or alone.
func (c *config) check(demo bool) error {
	var errs []error
	add := func(name, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", name, fmt.Sprintf(format, args...)))
	}
	if err := checkListenAddr(c.ListenAddr, c.AllowRemoteClients); err != nil {
		add("SMTPPOOL_LISTEN_ADDR", "%v", err)
	}
	switch {
	case demo:
	case c.UpstreamAddr == "":
		add("SMTPPOOL_UPSTREAM_ADDR", "required: the upstream relay's host:port, such as smtp.example.com:587 (or run \"smtppool demo\")")
	default:
		if _, _, err := net.SplitHostPort(c.UpstreamAddr); err != nil {
			add("SMTPPOOL_UPSTREAM_ADDR", "%q is not host:port: %v", c.UpstreamAddr, err)
		}
	}
	if !demo {
		switch {
		case c.UpstreamUsername != "" && c.UpstreamPassword == "":
			add("SMTPPOOL_UPSTREAM_PASSWORD", "required when SMTPPOOL_UPSTREAM_USERNAME is set (or use SMTPPOOL_UPSTREAM_PASSWORD_FILE)")
		case c.UpstreamUsername == "" && c.UpstreamPassword != "":
			add("SMTPPOOL_UPSTREAM_USERNAME", "required when a password is set")
		case c.UpstreamUsername != "" && c.UpstreamTLS == pool.TLSNone && !c.AllowInsecureAuth:
			add("SMTPPOOL_UPSTREAM_TLS", "is none, so credentials would cross the network in clear text; use TLS or set SMTPPOOL_UPSTREAM_ALLOW_INSECURE_AUTH=true")
		}
	}
	positive := []struct {
		name string
		ok   bool
	}{
		{"SMTPPOOL_MAX_CONNS", c.MaxConns >= 1},
		{"SMTPPOOL_ACQUIRE_TIMEOUT", c.AcquireTimeout > 0},
		{"SMTPPOOL_MAX_ATTEMPTS", c.MaxAttempts >= 1},
		{"SMTPPOOL_RETRY_BACKOFF", c.RetryBackoff > 0},
		{"SMTPPOOL_RETRY_BACKOFF_MAX", c.RetryBackoffMax > 0},
		{"SMTPPOOL_MAX_CONN_LIFETIME", c.MaxConnLifetime > 0},
		{"SMTPPOOL_MAX_CONN_IDLE_TIME", c.MaxConnIdleTime > 0},
		{"SMTPPOOL_MAX_MESSAGES_PER_CONN", c.MaxMessagesPerConn >= 1},
		{"SMTPPOOL_CONNECT_TIMEOUT", c.ConnectTimeout > 0},
		{"SMTPPOOL_COMMAND_TIMEOUT", c.CommandTimeout > 0},
		{"SMTPPOOL_DATA_TIMEOUT", c.DataTimeout > 0},
		{"SMTPPOOL_MAX_MESSAGE_BYTES", c.MaxMessageBytes >= 1},
		{"SMTPPOOL_MAX_RECIPIENTS", c.MaxRecipients >= 1},
		{"SMTPPOOL_CLIENT_TIMEOUT", c.ClientTimeout > 0},
		{"SMTPPOOL_SHUTDOWN_TIMEOUT", c.ShutdownTimeout > 0},
	}
	for _, p := range positive {
		if !p.ok {
			add(p.name, "must be greater than zero")
		}
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

// checkListenAddr refuses addresses beyond loopback unless allowed: the
// proxy relays as the upstream account for anyone who can connect.
func checkListenAddr(addr string, allowRemote bool) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port: %v", addr, err)
	}
	if allowRemote {
		return nil
	}
	ip := net.ParseIP(host)
	if host == "localhost" || (ip != nil && ip.IsLoopback()) {
		return nil
	}
	return fmt.Errorf("%q is not a loopback address, and smtppool does not authenticate clients: anyone who reaches it could send mail as the upstream account; set SMTPPOOL_ALLOW_REMOTE_CLIENTS=true if the network is trusted", addr)
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
		MaxConnLifetime:    c.MaxConnLifetime,
		MaxConnIdleTime:    c.MaxConnIdleTime,
		MaxMessagesPerConn: c.MaxMessagesPerConn,
		ConnectTimeout:     c.ConnectTimeout,
		CommandTimeout:     c.CommandTimeout,
		DataTimeout:        c.DataTimeout,
		Logger:             logger,
	}
	if c.UpstreamUsername != "" {
		pc.Auth = pool.PasswordAuth{Username: c.UpstreamUsername, Password: c.UpstreamPassword}
	}
	if c.UpstreamCAFile != "" {
		roots, err := c.rootCAs()
		if err != nil {
			return pc, fmt.Errorf("SMTPPOOL_UPSTREAM_CA_FILE: %w", err)
		}
		pc.TLSConfig = &tls.Config{RootCAs: roots}
	}
	return pc, nil
}

func (c *config) proxyConfig(logger *slog.Logger) proxy.Config {
	return proxy.Config{
		Hostname:        c.Hostname,
		MaxMessageBytes: c.MaxMessageBytes,
		MaxRecipients:   c.MaxRecipients,
		AcquireTimeout:  c.AcquireTimeout,
		MaxAttempts:     c.MaxAttempts,
		RetryBackoff:    c.RetryBackoff,
		RetryBackoffMax: c.RetryBackoffMax,
		ClientTimeout:   c.ClientTimeout,
		Logger:          logger,
	}
}

// LogValue describes the configuration for the start-up log line, without
// the password.
func (c config) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("listen", c.ListenAddr),
		slog.String("upstream", c.UpstreamAddr),
		slog.String("upstream_tls", c.UpstreamTLS.String()),
		slog.Bool("upstream_auth", c.UpstreamUsername != ""),
		slog.Int("max_conns", int(c.MaxConns)),
		slog.Duration("acquire_timeout", c.AcquireTimeout),
		slog.Int("max_attempts", c.MaxAttempts),
		slog.Int("max_messages_per_conn", c.MaxMessagesPerConn),
		slog.Duration("max_conn_lifetime", c.MaxConnLifetime),
		slog.Int64("max_message_bytes", c.MaxMessageBytes),
	)
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
	t := reflect.TypeFor[config]()
	vars := make([]envVar, 0, t.NumField())
	for i := range t.NumField() {
		f := t.Field(i)
		key, _, _ := strings.Cut(f.Tag.Get("env"), ",")
		vars = append(vars, envVar{field: f.Name, key: key, def: f.Tag.Get("envDefault"), help: f.Tag.Get("help")})
	}
	return vars
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
		def := v.def
		if def == "" {
			def = "unset"
		}
		fmt.Fprintf(w, "  %s (default %s)\n      %s\n", v.key, def, v.help)
	}
}
