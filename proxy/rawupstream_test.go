package proxy_test

import (
	"testing"
	"time"

	"github.com/smtppool/smtppool/internal/rawsmtp"
	"github.com/smtppool/smtppool/pool"
	"github.com/smtppool/smtppool/proxy"
)

// startRawUpstream runs a raw-socket upstream (for replies that go-smtp's
// server cannot make) until the test ends.
func startRawUpstream(t *testing.T, opts rawsmtp.Options) *rawsmtp.Server {
	t.Helper()
	u, err := rawsmtp.Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(u.Close)
	return u
}

// newRawEnv runs a proxy in front of u, with no AUTH and no TLS, and the
// short retry pauses of newEnv.
func newRawEnv(t *testing.T, u *rawsmtp.Server, pc pool.Config, cfg proxy.Config) *testEnv {
	t.Helper()
	pc.Addr, pc.TLS = u.Addr(), pool.TLSNone
	if pc.ProbeBackoff == 0 {
		pc.ProbeBackoff, pc.ProbeBackoffMax = time.Millisecond, 5*time.Millisecond
	}
	p, err := pool.New(pc)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.RetryBackoff == 0 {
		cfg.RetryBackoff, cfg.RetryBackoffMax = time.Millisecond, 5*time.Millisecond
	}
	srv, addr := serve(t, p, cfg)
	return &testEnv{pool: p, srv: srv, addr: addr}
}
