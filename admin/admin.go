// Package admin serves smtppool's HTTP endpoints for operators: liveness,
// readiness and Prometheus metrics. None of them touches the upstream.
package admin

import (
	"context"
	"fmt"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// liveTimeout bounds the liveness check.
const liveTimeout = 2 * time.Second

// Handler serves /healthz, /readyz and /metrics.
type Handler struct {
	mux      *http.ServeMux
	live     func(context.Context) error
	ready    atomic.Bool
	draining atomic.Bool
}

// NewHandler returns a handler whose /healthz runs live (which should prove
// that the SMTP listener still accepts and greets) and whose /metrics
// serves g. It is not ready until SetReady.
func NewHandler(g prometheus.Gatherer, live func(context.Context) error) *Handler {
	h := &Handler{mux: http.NewServeMux(), live: live}
	h.mux.HandleFunc("GET /healthz", h.healthz)
	h.mux.HandleFunc("GET /readyz", h.readyz)
	h.mux.Handle("GET /metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
	return h
}

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) { h.mux.ServeHTTP(w, r) }

// SetReady marks smtppool ready to accept client connections: its SMTP
// listener is open.
func (h *Handler) SetReady() { h.ready.Store(true) }

// Drain marks the start of a shutdown: /readyz answers 503 from now on,
// and /healthz stops checking the listener, which is closing.
func (h *Handler) Drain() {
	h.draining.Store(true)
	h.ready.Store(false)
}

// healthz answers 200 while the process serves: the SMTP listener accepts
// and greets, or a shutdown is draining.
func (h *Handler) healthz(w http.ResponseWriter, r *http.Request) {
	if h.draining.Load() {
		fmt.Fprintln(w, "ok: shutting down")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), liveTimeout)
	defer cancel()
	if err := h.live(ctx); err != nil {
		http.Error(w, "not live: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	fmt.Fprintln(w, "ok")
}

// readyz answers 200 while smtppool accepts client connections, whatever
// the upstream's state: an upstream outage must not take the chat server's
// pod out of service.
func (h *Handler) readyz(w http.ResponseWriter, _ *http.Request) {
	if !h.ready.Load() {
		http.Error(w, "not ready", http.StatusServiceUnavailable)
		return
	}
	fmt.Fprintln(w, "ready")
}
