// Package metrics exports smtppool's state and events as Prometheus
// metrics. Names follow the pool's vocabulary (a conn is one upstream
// session) and Prometheus conventions: base units, _total counters, no
// unbounded labels. The upstream label is the configured host:port.
package metrics

import (
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/smtppool/smtppool/pool"
)

const namespace = "smtppool"

// Proxy receives the proxy's and the pool's events; it implements
// proxy.Observer, and UpstreamReply fits pool.Config.OnReply.
type Proxy struct {
	acquireWait     prometheus.Histogram
	acquireTimeouts prometheus.Counter
	retries         *prometheus.CounterVec
	transactions    *prometheus.CounterVec
	relayDuration   prometheus.Histogram
	messageSize     prometheus.Histogram
	replies         *prometheus.CounterVec
}

// NewProxy registers the event metrics with reg.
func NewProxy(reg prometheus.Registerer, upstream string) *Proxy {
	up := prometheus.Labels{"upstream": upstream}
	m := &Proxy{
		acquireWait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Name: "acquire_wait_seconds",
			Help:    "Time transactions waited for an upstream session they then got (at MAIL, with the wait for buffer space before it).",
			Buckets: []float64{.0005, .001, .005, .01, .05, .1, .5, 1, 5, 15, 30, 60, 120},
		}),
		acquireTimeouts: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "acquire_timeouts_total",
			Help: "Transactions that gave up waiting for buffer space or an upstream session after SMTPPOOL_ACQUIRE_TIMEOUT.",
		}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "retries_total", ConstLabels: up,
			Help: "Transient upstream failures retried, by kind.",
		}, []string{"reason"}),
		transactions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "transactions_total",
			Help: "Client transactions by result (delivered, rejected: a 5xx passed on, failed: a 4xx the client got, abandoned) and by the upstream entry that served them last (none if no session was had).",
		}, []string{"result", "upstream"}),
		relayDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Name: "relay_duration_seconds",
			Help:    "Time from a transaction's MAIL to its end, waits and retries included.",
			Buckets: []float64{.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300},
		}),
		messageSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Name: "message_size_bytes",
			Help:    "Size of the messages read from clients.",
			Buckets: prometheus.ExponentialBuckets(1024, 4, 10), // 1 KiB to 256 MiB
		}),
		replies: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "upstream_replies_total", ConstLabels: up,
			Help: "Upstream replies by stage (set_up, mail, rcpt, data, end_of_data) and code class.",
		}, []string{"stage", "class"}),
	}
	reg.MustRegister(m.acquireWait, m.acquireTimeouts, m.retries, m.transactions, m.relayDuration, m.messageSize, m.replies)
	for _, r := range []string{"delivered", "rejected", "failed", "abandoned"} {
		for _, u := range strings.Split(upstream, ",") {
			m.transactions.WithLabelValues(r, strings.TrimSpace(u)) // present from the start, at 0
		}
	}
	return m
}

// AcquireWaited implements proxy.Observer.
func (m *Proxy) AcquireWaited(d time.Duration) { m.acquireWait.Observe(d.Seconds()) }

// AcquireTimedOut implements proxy.Observer.
func (m *Proxy) AcquireTimedOut() { m.acquireTimeouts.Inc() }

// Retried implements proxy.Observer.
func (m *Proxy) Retried(reason string) { m.retries.WithLabelValues(reason).Inc() }

// TransactionEnded implements proxy.Observer.
func (m *Proxy) TransactionEnded(result, upstream string, d time.Duration, size int) {
	if upstream == "" {
		upstream = "none"
	}
	m.transactions.WithLabelValues(result, upstream).Inc()
	m.relayDuration.Observe(d.Seconds())
	if size > 0 {
		m.messageSize.Observe(float64(size))
	}
}

// stages maps the pool's stage names to label values.
var stages = map[string]string{"set-up": "set_up", "MAIL": "mail", "RCPT": "rcpt", "DATA": "data", "end of DATA": "end_of_data"}

// UpstreamReply counts an upstream reply; it fits pool.Config.OnReply.
func (m *Proxy) UpstreamReply(stage string, code int) {
	label, ok := stages[stage]
	if !ok || code < 100 || code > 599 {
		return
	}
	m.replies.WithLabelValues(label, strconv.Itoa(code/100)+"xx").Inc()
}

// poolCollector reports a pool's Stat at each scrape, as pgxpool's
// collectors and Go's sql.DBStats collector do.
type poolCollector struct {
	stat  func() pool.Stat
	descs struct {
		conns, maxConns, effective, up, waiting, drainSeconds, drainLate, opened, closed, failures, auths, messages, acquires, waited, canceled *prometheus.Desc
	}
}

// RegisterPool registers a collector of p's Stat with reg.
func RegisterPool(reg prometheus.Registerer, p *pool.Pool, upstream string) {
	c := &poolCollector{stat: p.Stat}
	up := prometheus.Labels{"upstream": upstream}
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, "", name), help, labels, up)
	}
	c.descs.conns = d("upstream_connections", "Upstream connections now, by state: idle, acquired (lent to a transaction), constructing (being dialled and set up).", "state")
	c.descs.maxConns = d("upstream_max_connections", "The cap on upstream connections, SMTPPOOL_MAX_CONNS.")
	c.descs.effective = d("upstream_effective_max_connections", "The cap on upstream connections in force: lowered to the connections open when the upstream refuses one over its limit, raised by one after each quiet minute, up to SMTPPOOL_MAX_CONNS.")
	c.descs.up = prometheus.NewDesc(prometheus.BuildFQName(namespace, "", "upstream_up"),
		"1 when the last set-up or health check of a connection to this upstream entry succeeded; 0 before the first and after a failure.",
		[]string{"upstream"}, nil)
	c.descs.waiting = d("transactions_waiting", "Transactions waiting now for buffer space, the rate limit or an upstream connection: the backpressure queue.")
	c.descs.drainSeconds = d("transactions_drain_seconds", "How long the transactions waiting now would take to get an upstream connection at the pace connections were handed out over the last minute (or since the queue formed): 0 with none waiting, +Inf when none was handed out.")
	c.descs.drainLate = d("transactions_drain_late", "1 while the transactions waiting cannot all get an upstream connection within SMTPPOOL_ACQUIRE_TIMEOUT at the pace of the last minute: the last of them will time out.")
	c.descs.opened = d("upstream_connections_opened_total", "Upstream connections set up (dialled, greeted, upgraded, authenticated).")
	c.descs.closed = d("upstream_connections_closed_total", "Upstream connections closed, by reason.", "reason")
	c.descs.failures = d("upstream_connect_failures_total", "Upstream connections that failed to be set up.")
	c.descs.auths = d("upstream_auths_total", "Successful AUTH exchanges with the upstream.")
	c.descs.messages = d("upstream_messages_total", "Messages that reached the end of DATA upstream, whatever the verdict.")
	c.descs.acquires = d("acquires_total", "Upstream connections lent to transactions.")
	c.descs.waited = d("acquires_waited_total", "Acquisitions that found no idle upstream connection and had to wait.")
	c.descs.canceled = d("acquires_canceled_total", "Acquisitions given up: the acquire timeout, a client that left, a shutdown.")
	reg.MustRegister(c)
}

// Describe implements prometheus.Collector.
func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.descs.conns, c.descs.maxConns, c.descs.effective, c.descs.up, c.descs.waiting, c.descs.drainSeconds, c.descs.drainLate, c.descs.opened,
		c.descs.closed, c.descs.failures, c.descs.auths, c.descs.messages, c.descs.acquires, c.descs.waited, c.descs.canceled} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.stat()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v int64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge(c.descs.conns, float64(s.IdleConns), "idle")
	gauge(c.descs.conns, float64(s.AcquiredConns), "acquired")
	gauge(c.descs.conns, float64(s.ConstructingConns), "constructing")
	gauge(c.descs.maxConns, float64(s.MaxConns))
	gauge(c.descs.effective, float64(s.EffectiveMaxConns))
	for _, u := range s.Upstreams {
		up := 0.0
		if u.Up {
			up = 1
		}
		gauge(c.descs.up, up, u.Addr)
	}
	gauge(c.descs.waiting, float64(s.PendingAcquires))
	drain := s.DrainTime.Seconds()
	if s.DrainTime == math.MaxInt64 {
		drain = math.Inf(1)
	}
	gauge(c.descs.drainSeconds, drain)
	late := 0.0
	if s.DrainLate {
		late = 1
	}
	gauge(c.descs.drainLate, late)
	counter(c.descs.opened, s.ConnsOpened)
	for reason, n := range map[string]int64{"broken": s.ClosedBroken, "lifetime": s.ClosedLifetime, "idle": s.ClosedIdle,
		"messages": s.ClosedMessages, "discarded": s.ClosedDiscarded, "shutdown": s.ClosedShutdown,
		"cap": s.ClosedCap, "errors": s.ClosedErrors, "junk": s.ClosedJunk} {
		counter(c.descs.closed, n, reason)
	}
	counter(c.descs.failures, s.ConnectFailures)
	counter(c.descs.auths, s.Auths)
	counter(c.descs.messages, s.Messages)
	counter(c.descs.acquires, s.AcquireCount)
	counter(c.descs.waited, s.EmptyAcquireCount)
	counter(c.descs.canceled, s.CanceledAcquireCount)
}

// RegisterClients registers the gauge of open client connections, read
// from open at each scrape.
func RegisterClients(reg prometheus.Registerer, open func() int) {
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: namespace, Name: "client_connections",
		Help: "Client connections open now.",
	}, func() float64 { return float64(open()) }))
}

// RegisterBuildInfo registers smtppool_build_info, always 1, labelled with
// the version and the Go version.
func RegisterBuildInfo(reg prometheus.Registerer, version, goVersion string) {
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: namespace, Name: "build_info",
		Help:        "smtppool's version and the Go version that built it; always 1.",
		ConstLabels: prometheus.Labels{"version": version, "goversion": goVersion},
	})
	g.Set(1)
	reg.MustRegister(g)
}
