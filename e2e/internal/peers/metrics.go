package peers

// smtppool's admin endpoint: its address, from its log, and its /metrics.

import (
	"context"
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// adminAddrRE finds the address in smtppool's log line "admin endpoints
// listening", in its JSON format (group 1) or its text format (group 2,
// quoted only if slog had to).
var adminAddrRE = regexp.MustCompile(`"msg":"admin endpoints listening","addr":"([^"]+)"` +
	`|msg="admin endpoints listening" addr=("(?:[^"\\]|\\.)*"|\S+)`)

// adminAddrIn returns the admin address that log shows, or "" if it shows
// none yet.
func adminAddrIn(log string) string {
	m := adminAddrRE.FindStringSubmatch(log)
	switch {
	case m == nil:
		return ""
	case m[1] != "":
		return m[1]
	}
	if s, err := strconv.Unquote(m[2]); err == nil {
		return s
	}
	return m[2]
}

// AdminAddr waits until smtppool has logged where its admin endpoints
// listen (StartProxy sets SMTPPOOL_ADMIN_ADDR to 127.0.0.1:0), in either
// log format, and returns that address. It fails at once if smtppool
// exits first.
func AdminAddr(ctx context.Context, p *Proxy) (string, error) {
	var addr string
	err := Poll(ctx, 15*time.Second, "smtppool's admin address in its log", func() (bool, string) {
		if addr = adminAddrIn(p.Log()); addr != "" {
			return true, ""
		}
		return p.Exited(), "not logged yet"
	})
	if addr == "" && p.Exited() {
		return "", p.Failure()
	}
	return addr, err
}

// metricsClient scrapes without keeping a connection open between
// scrapes, so that scraping adds no goroutine to smtppool (the soak counts
// them).
var metricsClient = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// Metrics is one scrape of /metrics: its metric families by name.
type Metrics map[string]*dto.MetricFamily

// ScrapeMetrics reads /metrics at adminAddr, in the Prometheus text format.
func ScrapeMetrics(ctx context.Context, adminAddr string) (Metrics, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+adminAddr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "text/plain;version=0.0.4")
	resp, err := metricsClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape smtppool's metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape smtppool's metrics: GET /metrics: %s", resp.Status)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("scrape smtppool's metrics: %w", err)
	}
	return Metrics(families), nil
}

// Value sums the series of the counter or gauge name whose labels include
// labels, given as name, value pairs (none: every series of name), and
// reports whether there was one.
func (m Metrics) Value(name string, labels ...string) (float64, bool) {
	if len(labels)%2 != 0 {
		panic(fmt.Sprintf("peers: Metrics.Value(%q) wants label name, value pairs; got %q", name, labels))
	}
	sum, found := 0.0, false
	for _, s := range m[name].GetMetric() {
		v, ok := value(s)
		if !ok {
			continue
		}
		matches := true
		for i := 0; i < len(labels) && matches; i += 2 {
			l, has := labelOf(s, labels[i])
			matches = has && l == labels[i+1]
		}
		if matches {
			sum, found = sum+v, true
		}
	}
	return sum, found
}

// ByLabel sums the series of the counter or gauge name by the value of
// their label, leaving out those without it.
func (m Metrics) ByLabel(name, label string) map[string]float64 {
	out := map[string]float64{}
	for _, s := range m[name].GetMetric() {
		v, ok := value(s)
		l, has := labelOf(s, label)
		if ok && has {
			out[l] += v
		}
	}
	return out
}

// value is the value of a counter, gauge or untyped series.
func value(s *dto.Metric) (float64, bool) {
	switch {
	case s.Counter != nil:
		return s.Counter.GetValue(), true
	case s.Gauge != nil:
		return s.Gauge.GetValue(), true
	case s.Untyped != nil:
		return s.Untyped.GetValue(), true
	}
	return 0, false
}

// labelOf returns the value of the label name of s, and whether s has it.
func labelOf(s *dto.Metric, name string) (string, bool) {
	for _, l := range s.GetLabel() {
		if l.GetName() == name {
			return l.GetValue(), true
		}
	}
	return "", false
}
