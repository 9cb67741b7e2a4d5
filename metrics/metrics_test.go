package metrics_test

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/metrics"
	"github.com/smtppool/smtppool/pool"
)

// gauge reads the value of an unlabelled gauge from reg.
func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == name && len(f.GetMetric()) == 1 {
			return f.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no gauge %s", name)
	return 0
}

// TestQueueThatCannotDrainInTime: one upstream session, a message every
// 100 ms, 40 transactions waiting with an acquire timeout of 1 s: at that
// pace the last of them would wait 4 s. Before any of them times out, the
// pool warns in the log and smtppool_transactions_drain_late reads 1;
// once the queue has drained, the pool says so and the gauge reads 0.
func TestQueueThatCannotDrainInTime(t *testing.T) {
	up, err := memsmtp.Start(memsmtp.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	up.Inject(memsmtp.Data, memsmtp.Repeat(memsmtp.Fault{Delay: 100 * time.Millisecond}, 41)...)
	var log memsmtp.LogBuffer
	const acquireTimeout = time.Second
	p, err := pool.New(pool.Config{Addr: up.Addr, TLS: pool.TLSNone, MaxConns: 1, AcquireTimeout: acquireTimeout,
		Logger: slog.New(slog.NewTextHandler(&log, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	reg := prometheus.NewRegistry()
	metrics.RegisterPool(reg, p, up.Addr)
	if v := gauge(t, reg, "smtppool_transactions_drain_late"); v != 0 {
		t.Errorf("smtppool_transactions_drain_late = %v before any transaction, want 0", v)
	}

	var wg sync.WaitGroup
	start := time.Now()
	timedOut := make(chan time.Duration, 41)
	for i := range 41 {
		wg.Go(func() {
			// The proxy gives up at the acquire timeout; this test lets
			// every transaction wait, to see the queue drain.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			began := time.Now()
			c, err := p.Acquire(ctx)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Release()
			if waited := time.Since(began); waited > acquireTimeout {
				timedOut <- waited
			}
			if err := c.Mail(ctx, "a@example.com", nil); err != nil {
				t.Error(err)
				return
			}
			if err := c.Rcpt(ctx, "b@example.com", nil); err != nil {
				t.Error(err)
				return
			}
			if _, err := c.Data(ctx, strings.NewReader(fmt.Sprintf("Subject: %d\r\n\r\nbody\r\n", i))); err != nil {
				t.Error(err)
			}
		})
	}
	memsmtp.WaitFor(t, "the drain warning", func() bool {
		return strings.Contains(log.String(), "cannot all get one within the acquire timeout")
	})
	warnedAfter := time.Since(start)
	late, drain := gauge(t, reg, "smtppool_transactions_drain_late"), gauge(t, reg, "smtppool_transactions_drain_seconds")
	select {
	case waited := <-timedOut:
		t.Errorf("the warning came %v after the queue formed, after a transaction had waited %v, beyond the acquire timeout", warnedAfter.Round(time.Millisecond), waited.Round(time.Millisecond))
	default:
	}
	if late != 1 || drain <= acquireTimeout.Seconds() || math.IsInf(drain, 1) {
		t.Errorf("during the queue: drain_late %v, drain_seconds %v; want 1, and a finite time above %v", late, drain, acquireTimeout)
	}
	line := log.String()[strings.Index(log.String(), "cannot all get one"):]
	line = line[:strings.Index(line, "\n")]
	for _, attr := range []string{"waiting=", "sessions_per_minute=", "drain_time=", "acquire_timeout=1s", "open_conns=1", "effective_max_conns=1"} {
		if !strings.Contains(line, attr) {
			t.Errorf("the warning lacks %s: %s", attr, line)
		}
	}
	t.Logf("warned %v after the queue formed: %s", warnedAfter.Round(time.Millisecond), line)

	wg.Wait()
	memsmtp.WaitFor(t, "the all-clear", func() bool {
		return strings.Contains(log.String(), "can all get one within the acquire timeout again")
	})
	if late, drain := gauge(t, reg, "smtppool_transactions_drain_late"), gauge(t, reg, "smtppool_transactions_drain_seconds"); late != 0 || drain != 0 {
		t.Errorf("after the queue drained: drain_late %v, drain_seconds %v; want 0, 0", late, drain)
	}
	if n := strings.Count(log.String(), "cannot all get one within the acquire timeout"); n != 1 {
		t.Errorf("%d warnings for one queue of about 4 s, want 1 (at most one a minute)", n)
	}
}
