package pool_test

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
)

// dialCounter counts dials and the most in progress at once.
type dialCounter struct {
	dials, inFlight, maxInFlight atomic.Int64
}

func (d *dialCounter) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d.dials.Add(1)
	n := d.inFlight.Add(1)
	defer d.inFlight.Add(-1)
	for m := d.maxInFlight.Load(); n > m && !d.maxInFlight.CompareAndSwap(m, n); m = d.maxInFlight.Load() {
	}
	time.Sleep(5 * time.Millisecond) // a dial takes a moment, so dials can overlap
	return (&net.Dialer{}).DialContext(ctx, network, addr)
}

// TestOneProbeAtATimeWhileTheUpstreamIsDown: many transactions waiting
// through an outage dial one at a time, with backoff, instead of each
// hammering the upstream; the first probe after it returns succeeds.
func TestOneProbeAtATimeWhileTheUpstreamIsDown(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	addr := up.Addr
	up.Close()
	var dc dialCounter
	p, err := pool.New(pool.Config{Addr: addr, TLS: pool.TLSNone, MaxConns: 10, Dial: dc.dial,
		ProbeBackoff: 50 * time.Millisecond, ProbeBackoffMax: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	// 50 waiters retry for a second, as transactions in their retry window do.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for range 50 {
		wg.Go(func() {
			for ctx.Err() == nil {
				if c, err := p.Acquire(ctx); err == nil {
					c.Release()
				}
				time.Sleep(time.Millisecond)
			}
		})
	}
	wg.Wait()
	// At most MaxConns dials before the first failure is known, then one
	// probe per backoff: 50, 100, 200, 200, ... ms, each plus up to half.
	if n := dc.dials.Load(); n > 10+12 {
		t.Errorf("%d dials in a one-second outage, want one probe at a time with backoff", n)
	}
	if st := p.Stat(); st.UpstreamUp {
		t.Error("Stat.UpstreamUp during the outage")
	}

	// A probe that a waiter started just before it gave up may still be
	// under way: let it end, so that it cannot reach the restarted
	// upstream beside the probe this test waits for.
	memsmtp.WaitFor(t, "the outage's last probe to end", func() bool { return p.Stat().ConstructingConns == 0 })
	up2 := startUpstream(t, memsmtp.Options{Addr: addr})
	memsmtp.WaitFor(t, "a probe to reach the restarted upstream", func() bool {
		c, err := p.Acquire(context.Background())
		if err != nil {
			return false
		}
		c.Release()
		return true
	})
	if !p.Stat().UpstreamUp || up2.Stats().Conns != 1 {
		t.Errorf("after the outage: upstream up %v, %d connections; want up, 1", p.Stat().UpstreamUp, up2.Stats().Conns)
	}
}

// TestReachableClosesWhenTheUpstreamComesBack: the channel Reachable
// returns stays open while the upstream is down, is closed by the first
// session set up after it came back, and the next one stays open while
// sessions are set up as usual.
func TestReachableClosesWhenTheUpstreamComesBack(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	addr := up.Addr
	up.Close()
	p, err := pool.New(pool.Config{Addr: addr, TLS: pool.TLSNone, ProbeBackoff: time.Nanosecond, ProbeBackoffMax: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	back := p.Reachable()
	for range 2 {
		if _, err := p.Acquire(context.Background()); err == nil {
			t.Fatal("Acquire with the upstream down succeeded")
		}
	}
	select {
	case <-back:
		t.Fatal("Reachable closed while the upstream was down")
	default:
	}

	startUpstream(t, memsmtp.Options{Addr: addr})
	first, err := p.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer first.Release()
	select {
	case <-back:
	default:
		t.Fatal("Reachable still open after a session was set up on the upstream that came back")
	}
	again := p.Reachable()
	second, err := p.Acquire(context.Background()) // a second session, set up as usual
	if err != nil {
		t.Fatal(err)
	}
	defer second.Release()
	select {
	case <-again:
		t.Fatal("Reachable closed by a session set up while the upstream was up")
	default:
	}
}
