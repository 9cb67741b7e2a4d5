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
//  7. Round trips: behind a link that delays each direction by RTT/2, in
//     front of a Postfix upstream, one session's messages per second
//     against 1/(2×RTT), and the time to deliver 1,000 messages through
//     smtppool against a Postfix relay, at RTT 0, 5 and 20 ms.
//  8. Burst capacity: 10,000 clients at once, one message each, through
//     smtppool with its defaults (N = 10) into a Postfix upstream: messages
//     delivered, peak RSS, memory per waiting client, time to drain; the
//     same burst while Postfix is stopped, started again once every client
//     waits: delivered, memory and goroutines per waiting client, time
//     from the recovery to the last reply; and the same burst with
//     smtppool in a 320 MiB memory cgroup with the k8s example's settings:
//     delivered, and the peak memory charged.
//
// With -baseline REF it also builds the smtppool of the git ref REF and
// measures it beside this one in measurements 1 and 7.
//
// Run it as root from the repository root:
//
//	go run ./e2e/bench          # full run, about 6 minutes; writes e2e/bench/results.{md,svg}
//	go run ./e2e/bench -quick   # smoke run, about a minute; writes to a temporary folder
//
// It needs Postfix's smtp-sink and smtp-source, Postfix itself, ss and
// getconf. It runs them with the harness the end-to-end tests use
// (e2e/internal/peers): it builds smtppool from the module root, picks free
// loopback ports, and stops every process it started, also on failure and
// Ctrl-C.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	os.Exit(exitCode(err))
}

// cannotRun marks an error that kept the benchmark from measuring anything.
type cannotRun struct{ error }

// exitCode reports err and turns it into the exit status: 0 when every
// measurement ran, whether or not it met its target; 1 when one failed or
// the results could not be written; 2 when nothing could run; 130 when
// interrupted.
func exitCode(err error) int {
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, context.Canceled):
		fmt.Fprintln(os.Stderr, "\nbench: interrupted; every process it started is stopped")
		return 130
	}
	fmt.Fprintln(os.Stderr, "bench:", err)
	if errors.As(err, new(cannotRun)) {
		return 2
	}
	return 1
}

// options are the command line's.
type options struct {
	quick    bool
	baseline string          // git ref of an smtppool to measure beside this one; empty for none
	out      string          // folder for the results; empty for the default
	only     map[string]bool // measurements to run; empty for all
}

func parseFlags(args []string) (options, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	quick := fs.Bool("quick", false, "short smoke run (about a minute); results go to a temporary folder unless -out is given")
	out := fs.String("out", "", "folder for results.md and results.svg (default: e2e/bench of the module for a full run, a temporary folder with -quick or -only)")
	only := fs.String("only", "", "comma-separated measurements to run, e.g. 1,3 (default: all)")
	baseline := fs.String("baseline", "", "git ref of an smtppool to measure beside this one in measurements 1 and 7, e.g. main (default: none)")
	if err := fs.Parse(args); err != nil {
		return options{}, err
	}
	o := options{quick: *quick, out: *out, only: map[string]bool{}, baseline: *baseline}
	for _, m := range strings.Split(*only, ",") {
		if m = strings.TrimSpace(m); m != "" {
			o.only[m] = true
		}
	}
	return o, nil
}

// run is one benchmark run: it measures, prints the table and writes the
// results. When ctx ends it stops every process it started and returns
// ctx's error, without results.
func run(ctx context.Context, args []string) error {
	opts, err := parseFlags(args)
	if err != nil {
		return cannotRun{err}
	}
	b := &bench{plan: fullPlan(), start: time.Now(), baselineRef: opts.baseline}
	if opts.quick {
		b.plan = quickPlan()
	}
	if err := b.checkOnly(opts.only); err != nil {
		return cannotRun{err}
	}
	if b.tmp, err = peers.PublicDir("smtppool-bench-"); err != nil {
		return cannotRun{err}
	}
	defer os.RemoveAll(b.tmp)
	if err := b.setup(ctx); err != nil {
		return cannotRun{err}
	}
	failed := b.measure(ctx, opts.only)
	if err := ctx.Err(); err != nil {
		return err
	}
	// The table follows the numbering; measurements ran in another order.
	slices.SortStableFunc(b.figs, func(x, y figure) int { return strings.Compare(x.ID, y.ID) })
	elapsed := time.Since(b.start).Round(time.Second)
	fmt.Println()
	printTable(os.Stdout, b.figs)
	fmt.Printf("\nrun time %v on %s\n", elapsed, machineSummary())
	if err := b.writeResults(opts, elapsed); err != nil {
		return err
	}
	if failed {
		return errors.New("a measurement failed")
	}
	return nil
}
