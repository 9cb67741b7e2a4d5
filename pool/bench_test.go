package pool_test

import (
	"context"
	"testing"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
)

// BenchmarkAcquireRelease measures borrowing and returning a warm session,
// the pool's share of every transaction.
func BenchmarkAcquireRelease(b *testing.B) {
	up, err := memsmtp.Start(memsmtp.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer up.Close()
	p, err := pool.New(pool.Config{Addr: up.Addr, TLS: pool.TLSNone, MaxConns: 4})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	ctx := context.Background()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			c, err := p.Acquire(ctx)
			if err != nil {
				b.Error(err)
				return
			}
			c.Release()
		}
	})
}
