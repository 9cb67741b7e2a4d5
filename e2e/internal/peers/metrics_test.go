package peers

import (
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// exposition is a small /metrics in the text format, as smtppool's
// promhttp handler writes it.
const exposition = `# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 11
# HELP smtppool_retries_total Transactions retried, by reason.
# TYPE smtppool_retries_total counter
smtppool_retries_total{reason="conn_limit"} 3
smtppool_retries_total{reason="no_reply"} 2
smtppool_retries_total{reason="reply_421"} 0
# HELP smtppool_upstream_connections Upstream sessions, by state.
# TYPE smtppool_upstream_connections gauge
smtppool_upstream_connections{state="constructing",upstream="a"} 1
smtppool_upstream_connections{state="constructing",upstream="b"} 2
smtppool_upstream_connections{state="idle",upstream="a"} 4
# HELP smtppool_session_seconds Upstream session lifetimes.
# TYPE smtppool_session_seconds histogram
smtppool_session_seconds_bucket{le="1"} 1
smtppool_session_seconds_bucket{le="+Inf"} 2
smtppool_session_seconds_sum 3.5
smtppool_session_seconds_count 2
`

func TestScrapeMetrics(t *testing.T) {
	paths := make(chan string, 10)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		paths <- r.URL.Path
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		w.Write([]byte(exposition))
	}))
	defer srv.Close()
	m, err := ScrapeMetrics(t.Context(), strings.TrimPrefix(srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	if len(paths) != 1 {
		t.Errorf("%d requests; want one", len(paths))
	} else if p := <-paths; p != "/metrics" {
		t.Errorf("requested %q; want /metrics", p)
	}

	for _, c := range []struct {
		name   string
		labels []string
		want   float64
		found  bool
	}{
		{"go_goroutines", nil, 11, true},
		{"smtppool_retries_total", []string{"reason", "conn_limit"}, 3, true},
		{"smtppool_retries_total", []string{"reason", "reply_421"}, 0, true},
		{"smtppool_retries_total", nil, 5, true},
		{"smtppool_retries_total", []string{"reason", "connect"}, 0, false},
		{"smtppool_retries_total", []string{"state", "conn_limit"}, 0, false},
		{"smtppool_upstream_connections", []string{"state", "constructing"}, 3, true},
		{"smtppool_upstream_connections", []string{"state", "constructing", "upstream", "b"}, 2, true},
		{"smtppool_upstream_connections", []string{"upstream", "a"}, 5, true},
		{"smtppool_session_seconds", nil, 0, false}, // a histogram has no one value
		{"smtppool_session_seconds_count", nil, 0, false},
		{"smtppool_missing", nil, 0, false},
	} {
		if v, found := m.Value(c.name, c.labels...); v != c.want || found != c.found {
			t.Errorf("Value(%q, %q) = %v, %v; want %v, %v", c.name, c.labels, v, found, c.want, c.found)
		}
	}

	for _, c := range []struct {
		name, label string
		want        map[string]float64
	}{
		{"smtppool_retries_total", "reason", map[string]float64{"conn_limit": 3, "no_reply": 2, "reply_421": 0}},
		{"smtppool_upstream_connections", "state", map[string]float64{"constructing": 3, "idle": 4}},
		{"smtppool_upstream_connections", "upstream", map[string]float64{"a": 5, "b": 2}},
		{"smtppool_retries_total", "state", map[string]float64{}},
		{"smtppool_missing", "reason", map[string]float64{}},
	} {
		if got := m.ByLabel(c.name, c.label); !maps.Equal(got, c.want) {
			t.Errorf("ByLabel(%q, %q) = %v; want %v", c.name, c.label, got, c.want)
		}
	}
}

func TestScrapeMetricsFails(t *testing.T) {
	for _, c := range []struct {
		what, body string
		status     int
		want       string
	}{
		{"a status other than 200", "", http.StatusServiceUnavailable, "503"},
		{"text that is not the exposition format", "smtppool_retries_total{reason=\"x\" 3\n", http.StatusOK, "scrape smtppool's metrics"},
	} {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(c.status)
			w.Write([]byte(c.body))
		}))
		_, err := ScrapeMetrics(t.Context(), strings.TrimPrefix(srv.URL, "http://"))
		srv.Close()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: ScrapeMetrics returned %v; want an error with %q", c.what, err, c.want)
		}
	}
}

func TestScrapeMetricsKeepsNoConnectionOpen(t *testing.T) {
	closed := make(chan struct{}, 1)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(exposition))
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateClosed {
			closed <- struct{}{}
		}
	}
	srv.Start()
	defer srv.Close()
	if _, err := ScrapeMetrics(t.Context(), strings.TrimPrefix(srv.URL, "http://")); err != nil {
		t.Fatal(err)
	}
	select { // the server sees the connection closed after one scrape
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Error("the scrape's connection is still open 5 s after it")
	}
}

func TestAdminAddrIn(t *testing.T) {
	for _, c := range []struct{ log, want string }{
		{"", ""},
		{`time=2025-01-02T03:04:05.000Z level=INFO msg="smtp listening" addr=127.0.0.1:2525` + "\n", ""},
		{`time=2025-01-02T03:04:05.000Z level=INFO msg="smtp listening" addr=127.0.0.1:2525` + "\n" +
			`time=2025-01-02T03:04:05.001Z level=INFO msg="admin endpoints listening" addr=127.0.0.1:40123` + "\n", "127.0.0.1:40123"},
		{`time=2025-01-02T03:04:05.001Z level=INFO msg="admin endpoints listening" addr="[::1]:40123 x"` + "\n", "[::1]:40123 x"},
		{`{"time":"2025-01-02T03:04:05.001Z","level":"INFO","msg":"admin endpoints listening","addr":"127.0.0.1:40123"}` + "\n", "127.0.0.1:40123"},
	} {
		if got := adminAddrIn(c.log); got != c.want {
			t.Errorf("adminAddrIn(%q) = %q; want %q", c.log, got, c.want)
		}
	}
}
