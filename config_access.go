package main

// The configuration of who may send: the allowed networks, the cap on
// client connections, client AUTH and the listener's TLS.

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"

	"github.com/smtppool/smtppool/proxy"
)

// removedVars are variables that smtppool no longer reads, and what to set
// instead: a forgotten one must not change who may send without a word.
var removedVars = map[string]string{
	"SMTPPOOL_ALLOW_REMOTE_CLIENTS": "removed; any listen address is allowed now, and SMTPPOOL_ALLOWED_NETWORKS (default loopback only) says which clients may connect: set it to their networks",
}

// readAccess does for the access variables what the environment parser
// cannot: it refuses removed variables and an empty allowlist, and reads
// the client password's file.
func readAccess(cfg *config, vars map[string]string) error {
	for name, why := range removedVars {
		if _, ok := vars[name]; ok {
			return fmt.Errorf("%s: %s", name, why)
		}
	}
	if v := vars["SMTPPOOL_MAX_CLIENT_CONNS"]; strings.TrimSpace(v) != "" && cfg.MaxClientConns == 0 {
		return fmt.Errorf("SMTPPOOL_MAX_CLIENT_CONNS: 0 is not between 1 and 1000000; leave it unset to derive it from the memory smtppool may use")
	}
	if v, ok := vars["SMTPPOOL_ALLOWED_NETWORKS"]; ok && strings.TrimSpace(strings.ReplaceAll(v, ",", "")) == "" {
		return fmt.Errorf("SMTPPOOL_ALLOWED_NETWORKS: is set but lists no network, so no client could connect; leave it unset for loopback only, or list networks such as 10.0.0.0/8")
	}
	return readSecret(&cfg.ClientPassword, cfg.ClientPasswordFile, "SMTPPOOL_CLIENT_PASSWORD")
}

// checkAccess validates the access variables.
func (c *config) checkAccess(add func(name, format string, args ...any)) {
	nets, netsErr := parseNetworks(c.AllowedNetworks)
	if netsErr != nil {
		add("SMTPPOOL_ALLOWED_NETWORKS", "%v", netsErr)
	}
	if c.MaxClientConns < 0 || c.MaxClientConns > 1_000_000 { // 0: unset, derived
		add("SMTPPOOL_MAX_CLIENT_CONNS", "%d is not between 1 and 1000000", c.MaxClientConns)
	}
	switch {
	case c.ClientUsername != "" && c.ClientPassword == "":
		add("SMTPPOOL_CLIENT_PASSWORD", "required when SMTPPOOL_CLIENT_USERNAME is set (or use SMTPPOOL_CLIENT_PASSWORD_FILE)")
	case c.ClientUsername == "" && c.ClientPassword != "":
		add("SMTPPOOL_CLIENT_USERNAME", "required when a client password is set")
	}
	switch {
	case c.ListenTLSCert != "" && c.ListenTLSKey == "":
		add("SMTPPOOL_LISTEN_TLS_KEY", "required with SMTPPOOL_LISTEN_TLS_CERT")
	case c.ListenTLSCert == "" && c.ListenTLSKey != "":
		add("SMTPPOOL_LISTEN_TLS_CERT", "required with SMTPPOOL_LISTEN_TLS_KEY")
	case c.ListenTLSCert != "":
		if _, err := tls.LoadX509KeyPair(c.ListenTLSCert, c.ListenTLSKey); err != nil {
			add("SMTPPOOL_LISTEN_TLS_CERT", "cannot load it with SMTPPOOL_LISTEN_TLS_KEY: %v", err)
		}
	}
	if c.ListenRequireTLS && c.ListenTLSCert == "" {
		add("SMTPPOOL_LISTEN_REQUIRE_TLS", "needs SMTPPOOL_LISTEN_TLS_CERT and SMTPPOOL_LISTEN_TLS_KEY")
	}
	if c.ClientUsername != "" && c.ListenTLSCert == "" && netsErr == nil && !allLoopback(nets) {
		add("SMTPPOOL_CLIENT_USERNAME", "is set and SMTPPOOL_ALLOWED_NETWORKS admits clients beyond loopback, which could never authenticate: smtppool offers them AUTH only over TLS; set SMTPPOOL_LISTEN_TLS_CERT and SMTPPOOL_LISTEN_TLS_KEY")
	}
}

// parseNetworks parses the allowed networks: CIDR prefixes, or single
// addresses.
func parseNetworks(list []string) ([]netip.Prefix, error) {
	var nets []netip.Prefix
	for _, s := range list {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		var p netip.Prefix
		var err error
		if strings.Contains(s, "/") {
			p, err = netip.ParsePrefix(s)
		} else {
			var a netip.Addr
			a, err = netip.ParseAddr(s)
			p = netip.PrefixFrom(a, a.BitLen())
		}
		switch {
		case err != nil:
			return nil, fmt.Errorf("%q is not a network such as 10.0.0.0/8 or fd00::/8, nor an address", s)
		case p.Addr().Is4In6():
			return nil, fmt.Errorf("%q: write IPv4 networks as IPv4, such as 10.0.0.0/8", s)
		}
		nets = append(nets, p.Masked())
	}
	if len(nets) == 0 {
		return nil, fmt.Errorf("lists no network, so no client could connect")
	}
	return nets, nil
}

// formatNetworks writes networks as SMTPPOOL_ALLOWED_NETWORKS takes them.
func formatNetworks(nets []netip.Prefix) []string {
	s := make([]string, len(nets))
	for i, p := range nets {
		s[i] = p.String()
	}
	return s
}

// allLoopback reports whether every network is within loopback.
func allLoopback(nets []netip.Prefix) bool {
	loopback := proxy.DefaultListenConfig().AllowedNetworks
	for _, p := range nets {
		inside := false
		for _, l := range loopback {
			if l.Bits() <= p.Bits() && l.Contains(p.Addr()) {
				inside = true
			}
		}
		if !inside {
			return false
		}
	}
	return true
}

// listenConfig returns the listener's settings.
func (c *config) listenConfig(logger *slog.Logger) proxy.ListenConfig {
	nets, _ := parseNetworks(c.AllowedNetworks) // checked
	return proxy.ListenConfig{AllowedNetworks: nets, MaxClientConns: c.MaxClientConns, Logger: logger}
}

// accessConfig returns what clients must do before they may send. With a
// listener certificate, it loads it; the reloader logs its reloads.
func (c *config) accessConfig(logger *slog.Logger) (proxy.AccessConfig, error) {
	a := proxy.AccessConfig{Username: c.ClientUsername, Password: c.ClientPassword,
		RequireTLS: c.ListenRequireTLS, LogAddresses: c.LogAddresses}
	if c.ListenTLSCert != "" {
		r, err := proxy.NewCertReloader(c.ListenTLSCert, c.ListenTLSKey, logger)
		if err != nil {
			return a, fmt.Errorf("SMTPPOOL_LISTEN_TLS_CERT: %w", err)
		}
		a.TLSConfig = r.TLSConfig()
	}
	return a, nil
}

// accessWarning returns a warning for the start-up log if anyone at all may
// send: every address allowed, and no client authentication.
func (c *config) accessWarning() string {
	nets, _ := parseNetworks(c.AllowedNetworks)
	for _, p := range nets {
		if p.Bits() == 0 && c.ClientUsername == "" {
			return "SMTPPOOL_ALLOWED_NETWORKS admits every address and SMTPPOOL_CLIENT_USERNAME is unset: whoever reaches smtppool can send mail as the upstream account"
		}
	}
	return ""
}

// accessDescription describes the access settings for the start-up log,
// without the password.
func (c config) accessDescription() slog.Value {
	tlsMode := "none"
	switch {
	case c.ListenRequireTLS:
		tlsMode = "required"
	case c.ListenTLSCert != "":
		tlsMode = "starttls"
	}
	return slog.GroupValue(
		slog.String("allowed_networks", strings.Join(c.AllowedNetworks, ",")),
		slog.Int("max_client_conns", c.MaxClientConns),
		slog.Bool("client_auth", c.ClientUsername != ""),
		slog.String("listen_tls", tlsMode),
		slog.Bool("log_addresses", c.LogAddresses),
	)
}
