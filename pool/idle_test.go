package pool_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
)

// TestIdleSessionsLeaveOnTime: once a burst is over, its sessions close
// MaxConnIdleTime after each was last used, whatever the period of the
// background check: an upstream shared with other replicas gets its
// connections back within the idle time, not at the next check.
func TestIdleSessionsLeaveOnTime(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	const idle = 200 * time.Millisecond
	p := newPool(t, up, pool.Config{MaxConns: 3, MaxConnIdleTime: idle, HealthCheckPeriod: time.Hour})
	conns := []*pool.Conn{acquire(t, p), acquire(t, p), acquire(t, p)}
	for i, c := range conns {
		if err := send(c, i); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range conns {
		c.Release()
	}
	released := time.Now()
	memsmtp.WaitFor(t, "the upstream connections to close", func() bool { return up.Stats().Open == 0 })
	took := time.Since(released)
	st := p.Stat()
	if took < idle || took > idle+2*time.Second || st.ClosedIdle != 3 {
		t.Errorf("3 idle sessions closed %v after the burst (%d for idling), want all 3 after the idle time of %v", took.Round(time.Millisecond), st.ClosedIdle, idle)
	}
	if n := up.Stats().Commands["QUIT"]; n != 3 {
		t.Errorf("upstream saw %d QUIT, want 3", n)
	}
}

// TestBurstKeepsItsSessions: sessions in use one transaction after another
// are never idle for long, so a burst longer than the idle time pays the
// set-up (connection, EHLO, AUTH) once per session, not per message.
func TestBurstKeepsItsSessions(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{Username: "u", Password: "p"})
	const idle = 100 * time.Millisecond
	p := newPool(t, up, pool.Config{MaxConns: 2, MaxConnIdleTime: idle, HealthCheckPeriod: 10 * time.Millisecond, MaxMessagesPerConn: 1 << 30,
		Auth: pool.PasswordAuth{Username: "u", Password: "p"}, AllowInsecureAuth: true})
	var wg sync.WaitGroup
	start := time.Now()
	for w := range 2 {
		wg.Go(func() {
			for i := 0; time.Since(start) < 5*idle; i++ {
				c := acquire(t, p)
				if err := send(c, w*100000+i); err != nil {
					t.Error(err)
				}
				c.Release()
			}
		})
	}
	wg.Wait()
	st, us := p.Stat(), up.Stats()
	if us.Conns > 2 || us.Auths > 2 || st.ClosedIdle != 0 {
		t.Errorf("%d messages over %v: %d upstream connections, %d AUTHs, %d sessions closed for idling; want at most 2 sessions, set up once each",
			us.Messages, time.Since(start).Round(time.Millisecond), us.Conns, us.Auths, st.ClosedIdle)
	}
}

// TestMinIdleConnsOutlastTheIdleTime: the MinIdleConns sessions used last
// stay open past the idle time, ready for the next burst; the others go.
func TestMinIdleConnsOutlastTheIdleTime(t *testing.T) {
	up := startUpstream(t, memsmtp.Options{})
	const idle = 50 * time.Millisecond
	p := newPool(t, up, pool.Config{MaxConns: 3, MinIdleConns: 1, MaxConnIdleTime: idle, HealthCheckPeriod: 10 * time.Millisecond})
	conns := []*pool.Conn{acquire(t, p), acquire(t, p), acquire(t, p)}
	last := conns[2].ID()
	for _, c := range conns {
		c.Release()
	}
	memsmtp.WaitFor(t, "two of three idle sessions to close", func() bool { return p.Stat().ClosedIdle == 2 })
	time.Sleep(4 * idle) // a window in which the one kept must not close
	st := p.Stat()
	if st.ClosedIdle != 2 || st.TotalConns != 1 || st.ConnsOpened != 3 {
		t.Errorf("after %v idle: %d closed for idling, %d open, %d opened in all; want 2, 1, 3", 5*idle, st.ClosedIdle, st.TotalConns, st.ConnsOpened)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := p.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Release()
	if c.ID() != last {
		t.Errorf("the session kept is %d, want %d, the one used last", c.ID(), last)
	}
}
