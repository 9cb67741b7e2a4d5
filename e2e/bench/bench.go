package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// plan sizes the measurements; quick shrinks it for a smoke run.
type plan struct {
	relayPairs, relayMessages, relaySessions, relayBytes, relayMaxConns int

	poolNs     []int
	poolRounds int // messages per session, each taking poolDelay
	poolDelay  int // seconds, smtp-sink -W .:poolDelay

	pfN, pfMessages, pfRounds int

	idleClients int

	inflightK, inflightBytes, inflightDelay int

	latencyPairs int

	// Measurement 8: clients in the burst, upstream sessions, and the
	// memory limit of the second run's cgroup (bytes).
	burstClients, burstN int
	burstLimit           int64

	// Measurement 7: sessions of each relay, messages per burst, rounds,
	// and messages per one-session run at RTT 0 (halved at 5 ms, again at
	// 20 ms, and more, so that each run takes a few seconds).
	netN, netMessages, netRounds, netSingle int
}

// netSingleMessages is the size of a one-session run of measurement 7 at
// rtt.
func (p plan) netSingleMessages(rtt time.Duration) int {
	switch {
	case rtt >= 20*time.Millisecond:
		return max(p.netSingle/8, 10)
	case rtt > 0:
		return max(p.netSingle/2, 10)
	}
	return p.netSingle
}

func fullPlan() plan {
	return plan{
		relayPairs: 5, relayMessages: 5000, relaySessions: 50, relayBytes: 1000, relayMaxConns: 20,
		poolNs: []int{1, 5, 20}, poolRounds: 10, poolDelay: 1,
		pfN: 10, pfMessages: 2000, pfRounds: 5,
		idleClients: 1000,
		inflightK:   200, inflightBytes: 256 << 10, inflightDelay: 3,
		latencyPairs: 500,
		netN:         10, netMessages: 1000, netRounds: 3, netSingle: 400,
		burstClients: 10_000, burstN: 10, burstLimit: 320 << 20,
	}
}

// quickPlan is fullPlan with smaller samples.
func quickPlan() plan {
	p := fullPlan()
	p.relayPairs, p.relayMessages = 3, 1000
	p.poolRounds = 3
	p.pfMessages, p.pfRounds = 500, 1
	p.inflightK, p.inflightDelay = 50, 2
	p.latencyPairs = 100
	p.netMessages, p.netRounds, p.netSingle = 300, 1, 160
	p.burstClients = 2000
	return p
}

// bench is one run: where things are, and what was found.
type bench struct {
	plan plan
	root string // module root
	tmp  string // scratch folder, removed at the end
	bin  string // the smtppool binary built for this run
	// baseline is another smtppool binary, built from baselineRef, that
	// measurements 1 and 7 measure beside bin; empty for none.
	baseline, baselineRef string
	start                 time.Time
	figs                  []figure
	details               []string // method and secondary numbers, for the Markdown report
}

// step is one measurement.
type step struct {
	id    string
	title string
	names []figure // the figures it produces, marked failed when it fails
	run   func(*peers.Group) error
}

func (b *bench) steps() []step {
	return []step{
		{"1", "relay cost, and 4 and 5b from the same run", append(b.relayFigures(), b.relayBaselineFigure()...), b.measureRelay},
		{"2", "pool efficiency against a slow upstream", b.poolFigures(), b.measurePool},
		{"3", "versus a Postfix relay, and 4 from the same run", b.postfixFigures(), b.measurePostfix},
		{"5", "memory: idle clients and messages in flight", b.memoryFigures(), b.measureMemory},
		{"6", "added latency at low load", b.latencyFigures(), b.measureLatency},
		{"7", "round trips: a Postfix upstream behind a delay link", b.networkFigures(), b.measureNetwork},
		{"8", "burst capacity: every client at once into a Postfix upstream", b.burstFigures(), b.measureBurst},
	}
}

// checkOnly fails on a measurement -only names that does not exist.
func (b *bench) checkOnly(only map[string]bool) error {
	for id := range only {
		if !slices.ContainsFunc(b.steps(), func(s step) bool { return s.id == id }) {
			return fmt.Errorf("-only %s: no such measurement (1, 2, 3, 5, 6, 7 or 8; 4 comes with 1 and 3, 5b with 1)", id)
		}
	}
	return nil
}

// setup checks the peers, raises the open-files limit (inherited by
// smtppool) and builds smtppool into the scratch folder.
func (b *bench) setup(ctx context.Context) error {
	peers.AddSbinToPath()
	err := peers.Require(peers.Program{Cmd: "go", Package: "golang-go"}, peers.Program{Cmd: "getconf", Package: "libc-bin"})
	if err != nil {
		return fmt.Errorf("%w\ninstall Postfix with: sh ../shared/peers/postfix-upstream.sh install (or apt-get install postfix)", err)
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("open-files limit: %w", err)
	}
	// The clients' connections are this process's; smtppool, which
	// inherits the limit, holds as many again.
	if need := uint64(max(b.plan.idleClients, b.plan.burstClients) + 512); lim.Cur < need {
		return fmt.Errorf("open-files limit is %d, need at least %d for %d clients at once: raise it (ulimit -n, or ulimit -Hn as root)",
			lim.Cur, need, max(b.plan.idleClients, b.plan.burstClients))
	}
	if b.root, err = peers.ModuleRoot(ctx); err != nil {
		return err
	}
	b.bin = filepath.Join(b.tmp, "smtppool")
	b.logf("building smtppool from %s", b.root)
	if err := peers.BuildProxy(ctx, b.root, b.bin, false); err != nil {
		return err
	}
	if b.baselineRef != "" {
		b.baseline = filepath.Join(b.tmp, "smtppool-baseline")
		b.logf("building the baseline smtppool from %s", b.baselineRef)
		if err := buildRef(ctx, b.root, b.baselineRef, b.tmp, b.baseline); err != nil {
			return err
		}
	}
	b.detail("Machine: %s. smtppool %s. %s.", machineSummary(), gitDescribe(b.root), postfixVersion())
	if b.baseline != "" {
		b.detail("Baseline: smtppool built from %s (commit %s), measured beside this one in measurements 1 and 7.", b.baselineRef, gitRev(b.root, b.baselineRef))
	}
	return nil
}

// measure runs the measurements in only (all if it is empty), each with a
// Group of its own that stops what it started, and reports whether one
// failed. A failed measurement's figures are marked failed.
func (b *bench) measure(ctx context.Context, only map[string]bool) (failed bool) {
	for _, s := range b.steps() {
		if len(only) > 0 && !only[s.id] {
			continue
		}
		b.logf("measurement %s: %s", s.id, s.title)
		before := len(b.figs)
		g := peers.NewGroup(ctx)
		err := s.run(g)
		err = errors.Join(err, g.Close())
		if ctx.Err() != nil {
			return true // interrupted: its failures are not results
		}
		if err != nil {
			failed = true
			b.figs = b.figs[:before]
			for _, f := range s.names {
				f.Value, f.Err = math.NaN(), firstLine(err.Error())
				b.figs = append(b.figs, f)
			}
			b.detail("Measurement %s FAILED: %v", s.id, err)
		}
	}
	return failed
}

// startSink starts an smtp-sink whose reply to each final dot comes delay
// whole seconds late, if delay is positive.
func (b *bench) startSink(g *peers.Group, delay int) (*peers.Sink, error) {
	var args []string
	if delay > 0 {
		args = []string{"-W", fmt.Sprintf(".:%d", delay)}
	}
	return peers.StartSink(g, b.tmp, peers.SinkOptions{Args: args})
}

// startProxy starts smtppool with settings on top of the benchmark's
// defaults: plain text to the upstream, logging at warn (nothing is logged
// per message at that level).
func (b *bench) startProxy(g *peers.Group, upstream string, settings map[string]string) (*peers.Proxy, error) {
	return b.startProxyBin(g, b.bin, upstream, settings)
}

// startProxyBin is startProxy with the smtppool binary bin.
func (b *bench) startProxyBin(g *peers.Group, bin, upstream string, settings map[string]string) (*peers.Proxy, error) {
	env := map[string]string{"SMTPPOOL_UPSTREAM_TLS": "none", "SMTPPOOL_LOG_LEVEL": "warn"}
	maps.Copy(env, settings)
	return peers.StartProxy(g, bin, upstream, env)
}

// proxyShutdownTimeout bounds smtppool's exit after SIGTERM; it has no
// client left by then, only upstream sessions to QUIT.
const proxyShutdownTimeout = 10 * time.Second

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%6.1fs] %s\n", time.Since(b.start).Seconds(), fmt.Sprintf(format, args...))
}

// detail records a line for the report's details and shows it as progress.
func (b *bench) detail(format string, args ...any) {
	line := fmt.Sprintf(format, args...)
	b.details = append(b.details, line)
	b.logf("  %s", line)
}

func (b *bench) add(figs ...figure) { b.figs = append(b.figs, figs...) }

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

// buildRef builds the smtppool of the git commit ref of the repository at
// root into out, from a copy of its tree in a scratch folder under tmp.
func buildRef(ctx context.Context, root, ref, tmp, out string) error {
	src, err := os.MkdirTemp(tmp, "baseline-src-")
	if err != nil {
		return err
	}
	archive := exec.CommandContext(ctx, "git", "-C", root, "archive", "--format=tar", ref)
	extract := exec.CommandContext(ctx, "tar", "-x", "-C", src)
	pipe, err := archive.StdoutPipe()
	if err != nil {
		return err
	}
	extract.Stdin = pipe
	var stderr strings.Builder
	archive.Stderr, extract.Stderr = &stderr, &stderr
	if err := extract.Start(); err != nil {
		return fmt.Errorf("tar: %w", err)
	}
	if err := archive.Run(); err != nil {
		extract.Wait()
		return fmt.Errorf("git archive %s: %w: %s", ref, err, stderr.String())
	}
	if err := extract.Wait(); err != nil {
		return fmt.Errorf("tar: %w: %s", err, stderr.String())
	}
	return peers.BuildProxy(ctx, src, out, false)
}

// gitRev returns the short hash of ref in the repository at root.
func gitRev(root, ref string) string {
	out, err := exec.Command("git", "-C", root, "rev-parse", "--short", ref).Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}
