package pool_test

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
)

// limitedUpstream is a dialler in front of an upstream that, like Postfix
// with a per-client connection limit shared with other replicas, greets a
// connection past its room with "421 4.7.0 ... too many connections" and
// closes it. It counts what the pool did.
type limitedUpstream struct {
	room    atomic.Int64 // connections it accepts at once
	open    atomic.Int64 // accepted connections open now
	dials   atomic.Int64
	refused atomic.Int64
	// refusing counts refused connections that the pool has not closed
	// yet; maxRefusing is the most at once.
	refusing, maxRefusing atomic.Int64
}

func (l *limitedUpstream) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	l.dials.Add(1)
	if l.open.Add(1) > l.room.Load() {
		l.open.Add(-1)
		l.refused.Add(1)
		n := l.refusing.Add(1)
		for m := l.maxRefusing.Load(); n > m && !l.maxRefusing.CompareAndSwap(m, n); m = l.maxRefusing.Load() {
		}
		client, server := net.Pipe()
		go func() {
			time.Sleep(5 * time.Millisecond) // a greeting takes a moment, so refused set-ups can overlap
			server.Write([]byte("421 4.7.0 upstream.test Error: too many connections from 127.0.0.1\r\n"))
			server.Close()
		}()
		return &hookedConn{Conn: client, closed: func() { l.refusing.Add(-1) }}, nil
	}
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		l.open.Add(-1)
		return nil, err
	}
	return &hookedConn{Conn: c, closed: func() { l.open.Add(-1) }}, nil
}

// hookedConn calls closed once, when it is first closed.
type hookedConn struct {
	net.Conn
	once   sync.Once
	closed func()
}

func (c *hookedConn) Close() error {
	c.once.Do(c.closed)
	return c.Conn.Close()
}

// TestConnLimitAtSetUpBacksOffAsAWhole: an upstream that has no room for
// the pool (other replicas hold all its places) refuses its sessions at
// the banner. The pool backs off as a whole: after the first refusal, one
// dial at a time, spaced by the probe backoff, while 40 transactions wait
// for a session without dialling and without failing. Once the upstream
// has room for 3, the next probe succeeds, the waiting transactions
// proceed, and the pool takes the room one session at a time: the cap
// grows to 3 at the cost of one more refusal, and stays there.
func TestConnLimitAtSetUpBacksOffAsAWhole(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	var l limitedUpstream
	const backoff, backoffMax = 20 * time.Millisecond, 80 * time.Millisecond
	p := newPool(t, up, pool.Config{MaxConns: 5, Dial: l.dial, ProbeBackoff: backoff, ProbeBackoffMax: backoffMax})

	errs := make(chan error, 41)
	var wg sync.WaitGroup
	transaction := func(id int) {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			c, err := p.Acquire(ctx)
			if err != nil {
				errs <- err
				return
			}
			defer c.Release()
			errs <- send(c, id)
		})
	}
	transaction(0)
	memsmtp.WaitFor(t, "the first refusal to lower the cap to 1", func() bool {
		return l.refused.Load() == 1 && p.Stat().EffectiveMaxConns == 1
	})
	firstRefusal := time.Now()
	l.maxRefusing.Store(l.refusing.Load())
	for i := range 40 {
		transaction(i + 1)
	}
	// Five probes after the first refusal, each after the backoff:
	// 20, 40, 80, 80, 80 ms at least (plus up to half again at random).
	memsmtp.WaitFor(t, "five probes after the first refusal", func() bool { return l.refused.Load() >= 6 })
	elapsed := time.Since(firstRefusal)
	if dials, least := l.dials.Load(), backoff+2*backoff+3*backoffMax; dials > 6 || elapsed < least {
		t.Errorf("%d dials in %v after the first refusal, with 41 transactions waiting; want one probe per backoff (6 dials in at least %v)",
			dials, elapsed.Round(time.Millisecond), least)
	}
	if n := l.maxRefusing.Load(); n > 1 {
		t.Errorf("%d refused set-ups in flight at once after the first refusal, want one probe at a time", n)
	}
	select {
	case err := <-errs:
		t.Fatalf("a transaction ended while the upstream was full: %v; want it to wait", err)
	default:
	}

	// The other replicas are done: room for 3.
	refusedBefore := l.refused.Load()
	l.room.Store(3)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("transaction: %v", err)
		}
	}
	st := p.Stat()
	refusedAfter := l.refused.Load() - refusedBefore
	t.Logf("after the upstream had room: %d refusals, effective cap %d, %d sessions opened, %d messages", refusedAfter, st.EffectiveMaxConns, st.ConnsOpened, up.Stats().Messages)
	if up.Stats().Messages != 41 {
		t.Errorf("%d messages delivered, want 41", up.Stats().Messages)
	}
	if refusedAfter > 2 {
		t.Errorf("%d refusals once the upstream had room for 3, want the one that found its limit (and at most one probe before it had room)", refusedAfter)
	}
	if st.EffectiveMaxConns != 3 || st.ConnsOpened != 3 {
		t.Errorf("effective cap %d, %d sessions opened; want the pool to have grown to the upstream's room of 3", st.EffectiveMaxConns, st.ConnsOpened)
	}
}

// TestWaitForAProbeEndsWithTheAcquire: a transaction waiting for the next
// probe of a full upstream stops waiting when its context ends, and leaves
// no set-up behind that would dial for nobody.
func TestWaitForAProbeEndsWithTheAcquire(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	var l limitedUpstream
	p := newPool(t, up, pool.Config{MaxConns: 2, Dial: l.dial, ProbeBackoff: time.Minute, ProbeBackoffMax: time.Minute})
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := p.Acquire(ctx)
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 5*time.Second {
		t.Fatalf("Acquire from a full upstream: %v after %v, want its deadline after 200ms", err, time.Since(start).Round(time.Millisecond))
	}
	memsmtp.WaitFor(t, "no set-up left waiting", func() bool { return p.Stat().ConstructingConns == 0 })
	if d := l.dials.Load(); d > 2 {
		t.Errorf("%d dials, want the first refused ones only", d)
	}
}

// TestEveryAcquireGivenUpIsCounted: CanceledAcquireCount (the metric
// acquires_canceled_total) counts every Acquire that its context ended,
// wherever it waited: for the next probe of a full upstream, or for a
// place under the cap that the refusals lowered to 1, where the others
// wait meanwhile.
func TestEveryAcquireGivenUpIsCounted(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	var l limitedUpstream
	p := newPool(t, up, pool.Config{MaxConns: 3, Dial: l.dial, ProbeBackoff: time.Minute, ProbeBackoffMax: time.Minute})
	const n = 3
	errs := make(chan error, n)
	for range n {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			_, err := p.Acquire(ctx)
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Acquire from a full upstream: %v, want its deadline", err)
		}
	}
	if st := p.Stat(); st.CanceledAcquireCount != n {
		t.Errorf("%d acquires counted as given up (cap %d, %d refused dials), want %d", st.CanceledAcquireCount, st.EffectiveMaxConns, l.refused.Load(), n)
	}
}
