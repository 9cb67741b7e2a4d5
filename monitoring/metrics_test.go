package monitoring

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/smtp"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
)

// targetLabels are added by Prometheus at scrape time, not by smtppool, so
// a query may match on them although /metrics does not have them.
var targetLabels = []string{"job", "instance"}

// series is what one scrape shows of one metric name: its label names and,
// for each, the values seen.
type series map[string]map[string]bool

// scrapeRealBinary builds smtppool, runs it against an upstream list whose
// first entry refuses connections and whose second is a small SMTP server
// of this test's, relays one message through it (so that the labelled
// series appear: a delivered transaction, a retry, an entry up and one
// down), and returns the metrics of its /metrics by sample name.
func scrapeRealBinary(t *testing.T) map[string]series {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "smtppool")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Dir = ".." // the root module
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	upstream := startUpstream(t)
	refused := refusedAddr(t)
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(),
		"SMTPPOOL_LISTEN_ADDR=127.0.0.1:0",
		"SMTPPOOL_ADMIN_ADDR=127.0.0.1:0",
		"SMTPPOOL_UPSTREAM_ADDR="+refused+","+upstream,
		"SMTPPOOL_UPSTREAM_TLS=none",
		"SMTPPOOL_HOSTNAME=smtppool.test",
		"SMTPPOOL_RETRY_BACKOFF=10ms",
		"SMTPPOOL_RETRY_BACKOFF_MAX=50ms",
		"SMTPPOOL_LOG_FORMAT=json",
	)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})

	// The listening lines give the addresses of port 0.
	addrs := make(chan [2]string, 1)
	var logMu sync.Mutex
	var log strings.Builder
	go func() {
		var smtpAddr, adminAddr string
		var sent bool // once: the scanner goes on draining the log
		listening := regexp.MustCompile(`"msg":"(smtppool listening|admin endpoints listening)","addr":"([^"]+)"`)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			logMu.Lock()
			log.WriteString(sc.Text() + "\n")
			logMu.Unlock()
			if m := listening.FindStringSubmatch(sc.Text()); m != nil {
				if m[1] == "smtppool listening" {
					smtpAddr = m[2]
				} else {
					adminAddr = m[2]
				}
				if smtpAddr != "" && adminAddr != "" && !sent {
					addrs <- [2]string{smtpAddr, adminAddr}
					sent = true
				}
			}
		}
	}()
	var smtpAddr, adminAddr string
	select {
	case a := <-addrs:
		smtpAddr, adminAddr = a[0], a[1]
	case <-time.After(30 * time.Second):
		logMu.Lock()
		defer logMu.Unlock()
		t.Fatalf("smtppool did not log its listening addresses in 30 s:\n%s", log.String())
	}

	msg := "From: app@example.com\r\nTo: someone@example.com\r\nSubject: metrics\r\nMessage-ID: <metrics@test>\r\n\r\nhello\r\n"
	if err := smtp.SendMail(smtpAddr, nil, "app@example.com", []string{"someone@example.com"}, []byte(msg)); err != nil {
		logMu.Lock()
		defer logMu.Unlock()
		t.Fatalf("sending one message through smtppool: %v\n%s", err, log.String())
	}

	resp, err := http.Get("http://" + adminAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("parsing /metrics: %v", err)
	}
	return samplesByName(families)
}

// samplesByName lists each sample name of the families, with the
// suffixed names of histograms and summaries, and their labels.
func samplesByName(families map[string]*dto.MetricFamily) map[string]series {
	out := map[string]series{}
	add := func(name string, m *dto.Metric, extra ...string) {
		s := out[name]
		if s == nil {
			s = series{}
			out[name] = s
		}
		for _, lp := range m.GetLabel() {
			if s[lp.GetName()] == nil {
				s[lp.GetName()] = map[string]bool{}
			}
			s[lp.GetName()][lp.GetValue()] = true
		}
		for _, l := range extra {
			if s[l] == nil {
				s[l] = map[string]bool{}
			}
		}
	}
	for name, f := range families {
		for _, m := range f.GetMetric() {
			switch f.GetType() {
			case dto.MetricType_HISTOGRAM:
				add(name+"_bucket", m, "le")
				add(name+"_sum", m)
				add(name+"_count", m)
			case dto.MetricType_SUMMARY:
				add(name, m, "quantile")
				add(name+"_sum", m)
				add(name+"_count", m)
			default:
				add(name, m)
			}
		}
	}
	return out
}

// startUpstream serves just enough SMTP to take a message, on a free
// loopback port, until the test ends. It refuses the first MAIL with a
// 451, which smtppool retries on a fresh session.
func startUpstream(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var refused atomic.Bool
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go serveSMTP(c, &refused)
		}
	}()
	return ln.Addr().String()
}

func serveSMTP(c net.Conn, refused *atomic.Bool) {
	defer c.Close()
	r := bufio.NewReader(c)
	reply := func(s string) bool { _, err := io.WriteString(c, s+"\r\n"); return err == nil }
	reply("220 upstream.test ESMTP")
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		verb := strings.ToUpper(strings.TrimSpace(line))
		if i := strings.IndexAny(verb, " :"); i >= 0 {
			verb = verb[:i]
		}
		switch verb {
		case "EHLO", "HELO":
			reply("250 upstream.test")
		case "MAIL":
			if refused.CompareAndSwap(false, true) {
				reply("451 4.3.0 Try again")
				continue
			}
			reply("250 2.0.0 OK")
		case "RCPT", "RSET", "NOOP":
			reply("250 2.0.0 OK")
		case "DATA":
			reply("354 End data with <CR><LF>.<CR><LF>")
			for {
				l, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if l == ".\r\n" {
					break
				}
			}
			reply("250 2.0.0 Ok: queued as METRICS")
		case "QUIT":
			reply("221 2.0.0 Bye")
			return
		default:
			reply("502 5.5.2 Not implemented")
		}
	}
}

// refusedAddr returns a loopback address where nothing listens.
func refusedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// namedExpr is one PromQL expression and where it comes from.
type namedExpr struct{ where, expr string }

// dashboardExprs lists the dashboard's queries: each panel target's expr,
// and each query variable's label_values() selector.
func dashboardExprs(t *testing.T) []namedExpr {
	t.Helper()
	data, err := os.ReadFile(DashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Name  string `json:"name"`
				Type  string `json:"type"`
				Query any    `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(data, &d); err != nil {
		t.Fatal(err)
	}
	var out []namedExpr
	for _, p := range d.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, q := range p.Targets {
			out = append(out, namedExpr{"panel " + p.Title, q.Expr})
		}
	}
	labelValues := regexp.MustCompile(`^label_values\((.+),\s*(\w+)\)$`)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		q, _ := v.Query.(string)
		m := labelValues.FindStringSubmatch(q)
		if m == nil {
			t.Errorf("variable %s: query %q is not label_values(selector, label)", v.Name, q)
			continue
		}
		out = append(out, namedExpr{"variable " + v.Name, m[1]})
	}
	return out
}

// ruleExprs lists the alerting rules' expressions.
func ruleExprs(t *testing.T) []namedExpr {
	t.Helper()
	data, err := os.ReadFile(RulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile
	decodeStrict(t, data, &rf)
	var out []namedExpr
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			out = append(out, namedExpr{"alert " + r.Alert, r.Expr})
		}
	}
	return out
}

// grafanaVars stand in for Grafana's own variables, so that a dashboard
// query parses as PromQL.
var grafanaVars = strings.NewReplacer("$__rate_interval", "5m", "$__interval", "1m", "$__range", "1h")

// checkExpr parses expr and returns what in it the scrape does not have:
// a metric name, a label a matcher or a grouping names, or a value an
// equality matcher wants.
func checkExpr(expr string, scraped map[string]series) []string {
	e, err := parser.NewParser(parser.Options{}).ParseExpr(grafanaVars.Replace(expr))
	if err != nil {
		return []string{fmt.Sprintf("does not parse: %v", err)}
	}
	var problems []string
	labelKnown := func(name, label string) bool {
		_, ok := scraped[name][label]
		return ok || slices.Contains(targetLabels, label)
	}
	parser.Inspect(e, func(node parser.Node, _ []parser.Node) error {
		switch n := node.(type) {
		case *parser.VectorSelector:
			if n.Name == "" {
				problems = append(problems, fmt.Sprintf("selector %s names no metric", n))
				return nil
			}
			s, ok := scraped[n.Name]
			if !ok {
				problems = append(problems, fmt.Sprintf("metric %s is not in /metrics", n.Name))
				return nil
			}
			for _, m := range n.LabelMatchers {
				if m.Name == labels.MetricName || slices.Contains(targetLabels, m.Name) {
					continue
				}
				if _, ok := s[m.Name]; !ok {
					problems = append(problems, fmt.Sprintf("%s has no label %s", n.Name, m.Name))
				} else if m.Type == labels.MatchEqual && m.Value != "" && !s[m.Name][m.Value] {
					problems = append(problems, fmt.Sprintf("%s has no series with %s=%q", n.Name, m.Name, m.Value))
				}
			}
		case *parser.AggregateExpr:
			if n.Without {
				return nil
			}
			var names []string
			parser.Inspect(n.Expr, func(inner parser.Node, _ []parser.Node) error {
				if vs, ok := inner.(*parser.VectorSelector); ok {
					names = append(names, vs.Name)
				}
				return nil
			})
			for _, l := range n.Grouping {
				if !slices.ContainsFunc(names, func(name string) bool { return labelKnown(name, l) }) {
					problems = append(problems, fmt.Sprintf("%s by (%s): no metric in it has the label %s", n.Op, l, l))
				}
			}
		}
		return nil
	})
	return problems
}

// TestDashboardAndRulesNameRealMetrics runs the real binary and checks
// every query of the dashboard and every alerting rule against its
// /metrics: each metric must be there (histograms as _bucket, _sum and
// _count), with each label the query matches or groups by, and each value
// it matches exactly. A metric renamed in the binary fails this test.
func TestDashboardAndRulesNameRealMetrics(t *testing.T) {
	scraped := scrapeRealBinary(t)
	var names []string
	for n := range scraped {
		if strings.HasPrefix(n, "smtppool_") {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	t.Logf("smtppool's metrics: %s", strings.Join(names, " "))

	exprs := append(dashboardExprs(t), ruleExprs(t)...)
	used := map[string]bool{}
	for _, e := range exprs {
		for _, p := range checkExpr(e.expr, scraped) {
			t.Errorf("%s: %s\n\tin %s", e.where, p, e.expr)
		}
		if pe, err := parser.NewParser(parser.Options{}).ParseExpr(grafanaVars.Replace(e.expr)); err == nil {
			parser.Inspect(pe, func(node parser.Node, _ []parser.Node) error {
				if vs, ok := node.(*parser.VectorSelector); ok {
					used[vs.Name] = true
				}
				return nil
			})
		}
	}
	// The list: what an operator looks at first. Each must be on
	// the dashboard.
	for _, want := range []string{
		"smtppool_upstream_connections", "smtppool_upstream_effective_max_connections", "smtppool_transactions_waiting",
		"smtppool_transactions_total", "smtppool_retries_total", "smtppool_acquire_wait_seconds_bucket",
		"smtppool_relay_duration_seconds_bucket", "smtppool_upstream_up",
	} {
		if !used[want] {
			t.Errorf("nothing on the dashboard or in the rules shows %s", want)
		}
	}
}

// TestCheckExprCatchesMistakes makes sure the check above can fail: a
// misspelt metric, a histogram without its suffix, a label the metric does
// not have, a value no series has, a grouping by a missing label.
func TestCheckExprCatchesMistakes(t *testing.T) {
	scraped := map[string]series{
		"smtppool_transactions_total":          {"result": {"delivered": true, "failed": true}, "upstream": {"a:25": true}},
		"smtppool_acquire_wait_seconds_bucket": {"le": {}},
	}
	for _, expr := range []string{
		`smtppool_transaction_total`,
		`rate(smtppool_acquire_wait_seconds[5m])`,
		`smtppool_transactions_total{reason="x"}`,
		`smtppool_transactions_total{result="fail"}`,
		`sum by (reason) (smtppool_transactions_total)`,
		`{__name__=~"smtppool_.*"}`,
		`sum(rate(smtppool_transactions_total[5m]`,
	} {
		if p := checkExpr(expr, scraped); len(p) == 0 {
			t.Errorf("%s: no problem found", expr)
		}
	}
	for _, expr := range []string{
		`sum by (result, job) (rate(smtppool_transactions_total{result="failed", instance=~"$instance"}[$__rate_interval]))`,
		`histogram_quantile(0.99, sum by (le) (rate(smtppool_acquire_wait_seconds_bucket[5m])))`,
	} {
		if p := checkExpr(expr, scraped); len(p) != 0 {
			t.Errorf("%s: %v, want no problem", expr, p)
		}
	}
}
