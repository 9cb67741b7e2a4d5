// Command bench measures smtppool on loopback against real SMTP peers and
// prints a table of figures, each beside its target. Every figure is a ratio
// or a difference measured side by side in one run, because shared machines
// are noisy.
//
//  1. Relay cost: smtp-source (50 parallel sessions, one connection per
//     message, as a chat server sends) straight into smtp-sink, then through
//     smtppool into the same smtp-sink, alternated; the median of the
//     per-pair throughput ratios, and smtppool's own CPU time per 1,000
//     messages.
//  2. Pool efficiency against an upstream that takes 1 s per message
//     (smtp-sink -W .:1): messages per second achieved with N sessions,
//     divided by the limit N/1 s, for N = 1, 5 and 20.
//  3. Versus the MTA alternative: time until the last of 2,000 messages
//     reaches smtp-sink through a Postfix relay with concurrency N and
//     connection caching, and through smtppool with N sessions.
//  4. Upstream sessions opened per 1,000 relayed messages.
//  5. Memory: peak RSS with 1,000 idle clients, peak RSS in the relay-cost
//     run, and the memory per message in flight beyond the message itself.
//  6. Added latency at low load: per-pair difference of the time to the
//     final reply, through smtppool minus direct.
//
// Run it as root from the repository root:
//
//	go run ./e2e/bench          # full run, about 1.5 minutes; writes e2e/bench/results.{md,svg}
//	go run ./e2e/bench -quick   # smoke run, about 25 s; writes to a temporary folder
//
// It needs Postfix's smtp-sink and smtp-source, Postfix itself, ss and
// getconf. It builds smtppool from the module root, picks free loopback
// ports, and stops every process it started, also on failure and Ctrl-C.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"math"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
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
}

var fullPlan = plan{
	relayPairs: 5, relayMessages: 5000, relaySessions: 50, relayBytes: 1000, relayMaxConns: 20,
	poolNs: []int{1, 5, 20}, poolRounds: 10, poolDelay: 1,
	pfN: 10, pfMessages: 2000, pfRounds: 5,
	idleClients: 1000,
	inflightK:   200, inflightBytes: 256 << 10, inflightDelay: 3,
	latencyPairs: 500,
}

var quickPlan = plan{
	relayPairs: 3, relayMessages: 1000, relaySessions: 50, relayBytes: 1000, relayMaxConns: 20,
	poolNs: []int{1, 5, 20}, poolRounds: 3, poolDelay: 1,
	pfN: 10, pfMessages: 500, pfRounds: 1,
	idleClients: 1000,
	inflightK:   50, inflightBytes: 256 << 10, inflightDelay: 2,
	latencyPairs: 100,
}

// bench is one run: where things are, and what was found.
type bench struct {
	plan    plan
	root    string // module root
	tmp     string // scratch folder, removed at the end
	bin     string // the smtppool binary built for this run
	start   time.Time
	figs    []figure
	details []string // method and secondary numbers, for the Markdown report
}

func main() {
	os.Exit(mainErr())
}

func mainErr() int {
	quick := flag.Bool("quick", false, "short smoke run (under a minute); results go to a temporary folder unless -out is given")
	out := flag.String("out", "", "folder for results.md and results.svg (default: e2e/bench of the module for a full run, a temporary folder with -quick or -only)")
	only := flag.String("only", "", "comma-separated measurements to run, e.g. 1,3 (default: all)")
	flag.Parse()

	b := &bench{plan: fullPlan, start: time.Now()}
	if *quick {
		b.plan = quickPlan
	}

	// Ctrl-C and SIGTERM stop every process the benchmark started.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sigs
		interrupted.Store(true)
		fmt.Fprintf(os.Stderr, "\nbench: %v: stopping every process it started\n", s)
		finish()
		os.Exit(130)
	}()
	defer finish()

	want := map[string]bool{}
	for _, m := range strings.Split(*only, ",") {
		if m = strings.TrimSpace(m); m != "" {
			want[m] = true
		}
	}
	type step struct {
		id    string
		title string
		names []figure // the figures it produces, marked failed when it fails
		run   func() error
	}
	steps := []step{
		{"1", "relay cost, and 4 and 5b from the same run", b.relayFigures(), b.measureRelay},
		{"2", "pool efficiency against a slow upstream", b.poolFigures(), b.measurePool},
		{"3", "versus a Postfix relay, and 4 from the same run", b.postfixFigures(), b.measurePostfix},
		{"5", "memory: idle clients and messages in flight", b.memoryFigures(), b.measureMemory},
		{"6", "added latency at low load", b.latencyFigures(), b.measureLatency},
	}
	for id := range want {
		if !slices.ContainsFunc(steps, func(s step) bool { return s.id == id }) {
			fmt.Fprintf(os.Stderr, "bench: -only %s: no such measurement (1, 2, 3, 5 or 6; 4 comes with 1 and 3, 5b with 1)\n", id)
			return 2
		}
	}
	if err := b.setup(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 2
	}

	failed := false
	for _, s := range steps {
		if len(want) > 0 && !want[s.id] {
			continue
		}
		b.logf("measurement %s: %s", s.id, s.title)
		before := len(b.figs)
		err := s.run()
		owned.stopAll() // anything a failed step left running
		if interrupted.Load() {
			select {} // the signal handler is stopping everything and exits
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
	owned.stopAll()

	// The table follows the numbering; measurements ran in another order.
	slices.SortStableFunc(b.figs, func(x, y figure) int { return strings.Compare(x.ID, y.ID) })
	elapsed := time.Since(b.start).Round(time.Second)
	fmt.Println()
	printTable(os.Stdout, b.figs)
	fmt.Printf("\nrun time %v on %s\n", elapsed, machineSummary())

	// Only a full run writes into the repository by default.
	partial := *quick || len(want) > 0
	dir := *out
	if dir == "" && partial {
		var err error
		if dir, err = os.MkdirTemp("", "smtppool-bench-quick-"); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			return 1
		}
	} else if dir == "" {
		dir = filepath.Join(b.root, "e2e", "bench")
	}
	if err := b.writeResults(dir, elapsed, *quick, *only); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	fmt.Printf("wrote %s and %s\n", filepath.Join(dir, "results.md"), filepath.Join(dir, "results.svg"))
	if failed {
		return 1
	}
	return 0
}

// setup checks the peers, raises the open-files limit (inherited by
// smtppool), makes the scratch folder and builds smtppool.
func (b *bench) setup() error {
	if err := checkPeers(); err != nil {
		return err
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return err
	}
	if need := uint64(b.plan.idleClients + 512); lim.Cur < need {
		return fmt.Errorf("open-files limit is %d, need at least %d for %d idle clients: raise it (ulimit -n)", lim.Cur, need, b.plan.idleClients)
	}

	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return fmt.Errorf("go env GOMOD: %w", err)
	}
	b.root = filepath.Dir(strings.TrimSpace(string(gomod)))
	if mod, err := os.ReadFile(filepath.Join(b.root, "go.mod")); err != nil || !bytes.Contains(mod, []byte("module github.com/smtppool/smtppool\n")) {
		return fmt.Errorf("run from inside the smtppool repository (found module root %q)", b.root)
	}

	b.tmp, err = os.MkdirTemp("", "smtppool-bench-")
	if err != nil {
		return err
	}
	// Postfix needs every folder above its own to be searchable.
	if err := os.Chmod(b.tmp, 0o755); err != nil {
		return err
	}
	scratchDir = b.tmp

	b.bin = filepath.Join(b.tmp, "smtppool")
	b.logf("building smtppool from %s", b.root)
	build := exec.Command("go", "build", "-o", b.bin, ".")
	build.Dir = b.root
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v\n%s", err, out)
	}
	b.detail("Machine: %s. smtppool %s. %s.", machineSummary(), gitDescribe(b.root), postfixVersion())
	return nil
}

// scratchDir is removed on exit, after every process has stopped.
var scratchDir string

var finishMu sync.Mutex

// interrupted is set on Ctrl-C, so that the failures it causes are not
// reported as results.
var interrupted atomic.Bool

// finish stops every process the benchmark started and removes its scratch
// folder.
func finish() {
	finishMu.Lock()
	defer finishMu.Unlock()
	owned.shutdown()
	if scratchDir != "" {
		os.RemoveAll(scratchDir)
	}
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%6.1fs] %s\n", time.Since(b.start).Seconds(), fmt.Sprintf(format, args...))
}

// detail records a line for the report's details and shows it as progress.
func (b *bench) detail(format string, args ...any) {
	line := fmt.Sprintf(format, args...)
	b.details = append(b.details, line)
	b.logf("  %s", line)
}

func (b *bench) add(f figure) { b.figs = append(b.figs, f) }

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// percentile is the nearest-rank percentile, p in (0, 100].
func percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	k := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[max(0, min(k, len(s)-1))]
}

func machineSummary() string {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return fmt.Sprintf("%d cores (%s), Linux %s, %s", runtime.NumCPU(), model, strings.TrimSpace(string(kernel)), runtime.Version())
}

func gitDescribe(root string) string {
	out, err := exec.Command("git", "-C", root, "describe", "--always", "--dirty").Output()
	if err != nil {
		return "(not a git checkout)"
	}
	return "commit " + strings.TrimSpace(string(out))
}

func postfixVersion() string {
	out, err := exec.Command("postconf", "-d", "-h", "mail_version").Output()
	if err != nil {
		return "Postfix (version unknown)"
	}
	return "Postfix " + strings.TrimSpace(string(out))
}

func numCPU() int { return runtime.NumCPU() }

// numbered matches a detail line that starts with its measurement's number.
var numbered = regexp.MustCompile(`^(\d+[a-c]?)\. (.*)$`)

// writeResults writes results.md and results.svg into dir.
func (b *bench) writeResults(dir string, elapsed time.Duration, quick bool, only string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	var md bytes.Buffer
	kind := "full run"
	if quick {
		kind = "quick smoke run (-quick): small samples, not for publishing"
	}
	if only != "" {
		kind += ", only measurements " + only
	}
	fmt.Fprintf(&md, "<!-- written by go run ./e2e/bench; do not edit -->\n")
	fmt.Fprintf(&md, "Results of `go run ./e2e/bench` (%s), %s, run time %v.\n\n", kind, b.start.UTC().Format("2006-01-02 15:04 MST"), elapsed)
	markdownTable(&md, b.figs)
	fmt.Fprintf(&md, "\n![Each figure against its target](results.svg)\n")
	fmt.Fprintf(&md, "\nEvery ratio and difference was measured side by side in this one run, on loopback, with real peers (Postfix's smtp-sink and smtp-source, and Postfix itself).\n\n")
	fmt.Fprintf(&md, "#### How each figure was measured\n\n")
	for _, d := range b.details {
		switch m := numbered.FindStringSubmatch(d); {
		case strings.HasPrefix(d, "   "):
			fmt.Fprintf(&md, "  - %s\n", strings.TrimSpace(d))
		case m != nil:
			fmt.Fprintf(&md, "- **%s.** %s\n", m[1], m[2])
		default:
			fmt.Fprintf(&md, "- %s\n", d)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "results.md"), md.Bytes(), 0o644); err != nil {
		return err
	}
	var svg bytes.Buffer
	writeSVG(&svg, "smtppool benchmark: each figure against its target",
		fmt.Sprintf("go run ./e2e/bench, %s, %s", b.start.UTC().Format("2006-01-02"), machineSummary()), b.figs)
	return os.WriteFile(filepath.Join(dir, "results.svg"), svg.Bytes(), 0o644)
}
