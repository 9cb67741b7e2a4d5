package pool_test

import (
	"context"
	"crypto/tls"
	"errors"
	"testing"
	"time"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
)

// TestCredentialsNeverGoInClearTextBecauseOfAnEarlierSession: in
// opportunistic mode with credentials, an upstream seen once without
// STARTTLS is asked again by every new session; when it offers STARTTLS
// again, sessions work.
func TestCredentialsNeverGoInClearTextBecauseOfAnEarlierSession(t *testing.T) {
	serverTLS, roots, err := memsmtp.SelfSigned("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	plain := startUpstream(t, memsmtp.Options{Username: "app", Password: "s3cret"})
	addr := plain.Addr
	p := newPool(t, plain, pool.Config{TLS: pool.TLSOpportunistic, TLSConfig: &tls.Config{RootCAs: roots},
		Auth: pool.PasswordAuth{Username: "app", Password: "s3cret"}, ProbeBackoff: time.Millisecond})
	if _, err := p.Acquire(context.Background()); !errors.Is(err, pool.ErrTLSUnavailable) {
		t.Fatalf("Acquire from an upstream without STARTTLS: %v, want ErrTLSUnavailable", err)
	}
	if n := plain.Stats().Auths; n != 0 {
		t.Fatalf("credentials sent in clear text %d times", n)
	}
	plain.Close()

	secure := startUpstream(t, memsmtp.Options{Addr: addr, TLS: serverTLS, Username: "app", Password: "s3cret"})
	var c *pool.Conn
	memsmtp.WaitFor(t, "a session over STARTTLS", func() bool {
		c, err = p.Acquire(context.Background())
		return err == nil
	})
	defer c.Release()
	if !c.TLS() || secure.Stats().Auths != 1 {
		t.Errorf("session TLS %v with %d AUTH, want TLS and 1", c.TLS(), secure.Stats().Auths)
	}
}

// TestPlainTextKnowledgeExpires: without credentials, an upstream seen
// without STARTTLS is asked again once the knowledge expires.
func TestPlainTextKnowledgeExpires(t *testing.T) {
	defer pool.SetPlainTextMemory(50 * time.Millisecond)()
	serverTLS, roots, err := memsmtp.SelfSigned("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	plain := startUpstream(t, memsmtp.Options{})
	addr := plain.Addr
	p := newPool(t, plain, pool.Config{TLS: pool.TLSOpportunistic, TLSConfig: &tls.Config{RootCAs: roots},
		MaxConnLifetime: time.Nanosecond})
	c := acquire(t, p)
	if c.TLS() {
		t.Fatal("TLS with an upstream that has none")
	}
	c.Release()
	plain.Close()
	startUpstream(t, memsmtp.Options{Addr: addr, TLS: serverTLS})
	memsmtp.WaitFor(t, "a session over STARTTLS once the knowledge expired", func() bool {
		c, err := p.Acquire(context.Background())
		if err != nil {
			return false
		}
		defer c.Release()
		return c.TLS()
	})
}
