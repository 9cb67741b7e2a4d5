package admin_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/smtppool/smtppool/admin"
)

func get(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
	body, _ := io.ReadAll(rec.Result().Body)
	return rec.Code, string(body)
}

func TestReadinessFollowsTheLifecycle(t *testing.T) {
	h := admin.NewHandler(prometheus.NewRegistry(), func(context.Context) error { return nil })
	steps := []struct {
		name string
		do   func()
		want int
	}{
		{"before the listener opens", func() {}, 503},
		{"listening", h.SetReady, 200},
		{"shutting down", h.Drain, 503},
	}
	for _, s := range steps {
		s.do()
		if code, body := get(t, h, "/readyz"); code != s.want {
			t.Errorf("%s: /readyz = %d %q, want %d", s.name, code, body, s.want)
		}
	}
}

func TestLivenessChecksTheListenerUntilShutdown(t *testing.T) {
	var liveErr error
	h := admin.NewHandler(prometheus.NewRegistry(), func(context.Context) error { return liveErr })
	if code, _ := get(t, h, "/healthz"); code != 200 {
		t.Errorf("/healthz = %d with a greeting listener, want 200", code)
	}
	liveErr = errors.New("accept loop wedged")
	if code, body := get(t, h, "/healthz"); code != 503 || !strings.Contains(body, "wedged") {
		t.Errorf("/healthz = %d %q with a wedged listener, want 503 and why", code, body)
	}
	h.Drain() // the listener closes on purpose: not a reason to restart
	if code, _ := get(t, h, "/healthz"); code != 200 {
		t.Errorf("/healthz = %d while draining, want 200", code)
	}
}

func TestMetricsAreServed(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "smtppool_test_total", Help: "test"})
	c.Add(3)
	reg.MustRegister(c)
	h := admin.NewHandler(reg, func(context.Context) error { return nil })
	if code, body := get(t, h, "/metrics"); code != 200 || !strings.Contains(body, "smtppool_test_total 3") {
		t.Errorf("/metrics = %d %q", code, body)
	}
}
