// Command smtppool is an SMTP relay sidecar. It accepts SMTP from local
// clients, such as a chat server that opens one connection per notification,
// and relays every transaction over a capped pool of long-lived,
// authenticated sessions to one upstream server. A client hears 250 only
// after the upstream accepted its message.
//
// It is configured with environment variables; run it with -h for the list.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/smtppool/smtppool/admin"
	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/metrics"
	"github.com/smtppool/smtppool/pool"
	"github.com/smtppool/smtppool/proxy"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// Once the first signal has started the shutdown, the default handling
	// returns: a second signal ends the process at once.
	context.AfterFunc(ctx, stop)
	err := run(ctx, os.Args[1:], os.Environ(), os.Stderr)
	switch {
	case errors.Is(err, flag.ErrHelp):
	case err != nil:
		fmt.Fprintln(os.Stderr, "smtppool:", err)
		os.Exit(1)
	}
}

// run starts the proxy and blocks until ctx ends, then shuts down: it stops
// accepting, lets open client connections finish for up to
// SMTPPOOL_SHUTDOWN_TIMEOUT, and closes upstream sessions with QUIT.
func run(ctx context.Context, args, environ []string, stderr io.Writer) error {
	demo, err := parseArgs(args, stderr)
	if err != nil {
		return err
	}
	cfg, err := loadConfig(environ, demo)
	if err != nil {
		return err
	}
	if cfg.Hostname == "" {
		cfg.Hostname = defaultHostname()
	}
	logger := newLogger(cfg, stderr)
	capa, err := systemCapacity(cfg, logger)
	if err != nil {
		return err
	}
	cfg.MaxClientConns, cfg.MaxBufferBytes = capa.clientConns, capa.bufferBytes
	access, err := cfg.accessConfig(logger)
	if err != nil {
		return err
	}

	if demo {
		up, err := startDemoUpstream(logger)
		if err != nil {
			return err
		}
		defer up.Close()
		cfg.UpstreamAddr, cfg.UpstreamTLS = up.Addr, pool.TLSNone
		cfg.UpstreamUsername, cfg.UpstreamPassword = "", ""
	}

	reg := prometheus.NewRegistry()
	events := metrics.NewProxy(reg, cfg.UpstreamAddr)
	pc, err := cfg.poolConfig(logger)
	if err != nil {
		return err
	}
	pc.OnReply = events.UpstreamReply
	p, err := pool.New(pc)
	if err != nil {
		return err
	}

	// relayCtx ends only when the shutdown timeout has passed: until then,
	// transactions in flight keep waiting and retrying.
	relayCtx, stopRelay := context.WithCancel(context.Background())
	defer stopRelay()
	xc := cfg.proxyConfig(logger)
	xc.Observer = events
	xc.Access = access
	srv := proxy.NewServer(relayCtx, p, xc)

	ln, err := proxy.Listen(ctx, cfg.ListenAddr, cfg.listenConfig(logger))
	if err != nil {
		p.Close() // nothing is open yet
		return fmt.Errorf("SMTPPOOL_LISTEN_ADDR: %w", err)
	}
	registerMetrics(reg, p, ln, cfg.UpstreamAddr)
	adm := admin.NewHandler(reg, ln.CheckAccepting)
	stopAdmin, err := serveAdmin(cfg.AdminAddr, adm, logger)
	if err != nil {
		ln.Close()
		p.Close()
		return err
	}
	defer stopAdmin()
	logger.Info("smtppool listening", "addr", ln.Addr().String(), "demo", demo, "version", version, "config", cfg)
	logger.Info("client capacity", "capacity", capa)
	for _, w := range capa.warnings {
		logger.Warn(w)
	}
	if w := cfg.accessWarning(); w != "" {
		logger.Warn(w)
	}
	for _, w := range cfg.waitWarnings() {
		logger.Warn(w)
	}
	if demo {
		logger.Info("demo: send a message with: swaks --server " + ln.Addr().String() + " --to someone@example.com")
	}

	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	adm.SetReady()
	select {
	case err := <-served:
		stopRelay()
		closePool(p, logger)
		return fmt.Errorf("serve %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}

	adm.Drain()
	logger.Info("shutting down: no new connections; open ones may finish", "timeout", cfg.ShutdownTimeout.String())
	shutdownCtx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		// Transactions still running get no 250: their waits and upstream
		// commands are cut short, and their clients disconnected.
		logger.Warn("shutdown timeout passed; ending the remaining transactions and closing client connections")
		stopRelay()
		ln.CloseConnections()
	}
	closePool(p, logger)
	logger.Info("stopped", "pool", p.Stat())
	return nil
}

// registerMetrics registers the pool's, the listener's and the build's
// metrics, and Go's own.
func registerMetrics(reg *prometheus.Registry, p *pool.Pool, ln *proxy.Listener, upstream string) {
	metrics.RegisterPool(reg, p, upstream)
	metrics.RegisterClients(reg, ln.Open)
	metrics.RegisterBuildInfo(reg, version, runtime.Version())
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
}

// serveAdmin serves the admin endpoints on addr in the background, unless
// addr is empty; stop ends them.
func serveAdmin(addr string, h http.Handler, logger *slog.Logger) (stop func(), err error) {
	if addr == "" {
		return func() {}, nil
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("SMTPPOOL_ADMIN_ADDR: %w", err)
	}
	hs := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second, ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelWarn)}
	go hs.Serve(l)
	logger.Info("admin endpoints listening", "addr", l.Addr().String())
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		hs.Shutdown(ctx)
	}, nil
}

// poolCloseTimeout bounds the wait for upstream sessions still in use at
// shutdown, after which smtppool exits without their QUIT.
const poolCloseTimeout = 5 * time.Second

// closePool closes the upstream sessions with QUIT, waiting at most
// poolCloseTimeout for those still relaying.
func closePool(p *pool.Pool, logger *slog.Logger) {
	closed := make(chan struct{})
	go func() {
		p.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(poolCloseTimeout):
		logger.Warn("upstream sessions still busy; exiting without closing them", "waited", poolCloseTimeout.String())
	}
}

// defaultHostname is the host name for the greeting and EHLO when
// SMTPPOOL_HOSTNAME is unset: the system's, if it is a valid domain name.
func defaultHostname() string {
	if h, err := os.Hostname(); err == nil && isDomain(h) {
		return h
	}
	return "localhost"
}

// parseArgs handles -h, -version and the optional "demo" command.
func parseArgs(args []string, stderr io.Writer) (demo bool, err error) {
	fs := flag.NewFlagSet("smtppool", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { printUsage(stderr) }
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return false, err
	}
	if *showVersion {
		return false, printVersion(os.Stdout)
	}
	switch {
	case fs.NArg() == 0:
		return false, nil
	case fs.NArg() == 1 && fs.Arg(0) == "demo":
		return true, nil
	}
	return false, fmt.Errorf("unexpected arguments %q; run smtppool -h for usage", fs.Args())
}

func newLogger(cfg config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	if cfg.LogFormat == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// startDemoUpstream runs the in-process upstream of demo mode, which logs
// each message it receives (envelope, size and Message-ID, never the body).
func startDemoUpstream(logger *slog.Logger) (*memsmtp.Server, error) {
	log := logger.With("component", "demo-upstream")
	up, err := memsmtp.Start(memsmtp.Options{OnMessage: func(m memsmtp.Message) {
		log.Info("demo upstream received a message", "from", m.From, "to", m.To,
			"bytes", len(m.Data), "message_id", m.MessageID())
	}})
	if err != nil {
		return nil, fmt.Errorf("demo upstream: %w", err)
	}
	log.Info("demo upstream listening", "addr", up.Addr)
	return up, nil
}
