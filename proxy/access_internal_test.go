package proxy

import (
	"net"
	"net/netip"
	"slices"
	"testing"
)

// TestAuthOfferedOnlyWhereCredentialsStayPrivate: AUTH is offered over
// TLS, and in plain text only to loopback clients, unless TLS is required;
// never without client credentials.
func TestAuthOfferedOnlyWhereCredentialsStayPrivate(t *testing.T) {
	for _, tt := range []struct {
		username, requireTLS, tls, loopback bool
		offered                             bool
	}{
		{username: false, tls: true, loopback: true, offered: false},
		{username: true, tls: false, loopback: true, offered: true},
		{username: true, tls: false, loopback: false, offered: false},
		{username: true, tls: true, loopback: false, offered: true},
		{username: true, requireTLS: true, tls: false, loopback: true, offered: false},
		{username: true, requireTLS: true, tls: true, loopback: true, offered: true},
	} {
		a := AccessConfig{RequireTLS: tt.requireTLS}
		if tt.username {
			a.Username, a.Password = "u", "p"
		}
		s := &session{b: &backend{cfg: Config{Access: a}}, access: accessState{tls: tt.tls, loopback: tt.loopback}}
		mechs := s.AuthMechanisms()
		if offered := slices.Equal(mechs, []string{"PLAIN", "LOGIN"}); offered != tt.offered || (!offered && mechs != nil) {
			t.Errorf("%+v: mechanisms %v", tt, mechs)
		}
		if _, err := s.Auth("PLAIN"); (err == nil) != tt.offered {
			t.Errorf("%+v: Auth(PLAIN) error %v", tt, err)
		}
	}
}

// TestCredentialsMatch: both must match, whatever their lengths.
func TestCredentialsMatch(t *testing.T) {
	a := AccessConfig{Username: "mattermost", Password: "pw"}
	for _, c := range [][2]string{{"mattermost", "pw"}, {"mattermost", "pw2"}, {"mattermos", "pw"}, {"", ""}, {"pw", "mattermost"}} {
		if got, want := a.credentialsMatch(c[0], c[1]), c == [2]string{"mattermost", "pw"}; got != want {
			t.Errorf("credentialsMatch(%q, %q) = %v", c[0], c[1], got)
		}
	}
}

// TestAllowedNetworksMatchIPv4MappedClients: on a dual-stack listener an
// IPv4 client's address arrives IPv4-mapped; it must match IPv4 networks.
func TestAllowedNetworksMatchIPv4MappedClients(t *testing.T) {
	l := &Listener{cfg: ListenConfig{AllowedNetworks: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")}}.withDefaults()}
	for addr, want := range map[string]bool{
		"10.1.2.3": true, "::ffff:10.1.2.3": true, "11.0.0.1": false, "::ffff:127.0.0.1": false,
		"fd00::1": true, "::1": false, "127.0.0.1": false,
	} {
		if got := l.allowed(&net.TCPAddr{IP: net.ParseIP(addr), Port: 2525}); got != want {
			t.Errorf("allowed(%s) = %v, want %v", addr, got, want)
		}
	}
	if l.allowed(&net.UnixAddr{Name: "/tmp/s", Net: "unix"}) {
		t.Error("a non-TCP client is allowed")
	}
	if d := (ListenConfig{}).withDefaults(); !d.AllowedNetworks[0].Contains(netip.MustParseAddr("127.0.0.1")) || d.MaxClientConns != 10_000 {
		t.Errorf("defaults %+v", d)
	}
}
