// Command soak runs the real smtppool binary through a long stream of mail
// while its upstream connections are cut at random, and checks that it
// keeps its delivery promise and gives back the memory and goroutines it
// used.
//
// The set-up, all on loopback:
//
//	Go clients ──► smtppool ──► fault proxy ──► smtp-sink -d (one file per message)
//
// Its parts:
//
//   - Clients: -clients goroutines send -messages messages between them,
//     each over a new connection that it closes with QUIT, as a chat
//     server does, each message with a unique Message-ID.
//   - smtppool: built from the module root, with SMTPPOOL_MAX_CONNS
//     -max-conns and SMTPPOOL_MAX_MESSAGES_PER_CONN -per-conn (10 by
//     default rather than 100, so that the run has ten times the upstream
//     sessions, and ten times the faults), and its admin endpoint on a free
//     port (its address is read from the log line "admin endpoints
//     listening").
//   - Fault proxy: relays smtppool's upstream sessions to smtp-sink, and
//     cuts -drop of them (1 % by default), each at a random byte offset in
//     a random direction (smtppool's commands and message, or the sink's
//     replies), with a FIN or a RST. A cut can fall anywhere: in the
//     greeting, in a command, in a reply, in the message, between the final
//     dot and its reply (the ambiguous case).
//   - smtp-sink: dumps every message it accepts to a file of its own, and
//     only whole messages.
//
// At the end it reads every dump and checks:
//
//   - no acknowledged message is lost: every Message-ID a client was told
//     250 for is in the dumps;
//   - no message a client was told 5xx for is in the dumps;
//   - duplicates (a Message-ID dumped more than once) are no more than
//     smtppool's retries after a reply lost after the final dot
//     (smtppool_retries_total{reason="no_reply"}), the one documented
//     ambiguous case;
//   - smtppool's resident memory and goroutines (process_resident_memory_bytes
//     and go_goroutines from /metrics) come back near what they were before
//     the load: at most -rss-slack and -goroutine-slack above, waiting up to
//     -settle for them. Go keeps freed heap for a while, so RSS stays near
//     its working level after the load; that it does not grow with the
//     number of messages is checked too: at most 1.25 × its level once warm,
//     after a twentieth of the messages.
//
// It prints a summary: messages, the replies clients got (250, 4xx, 5xx,
// none), cut sessions and where they were cut, duplicates, smtppool's
// retries, throughput, and RSS and goroutines before, at peak and after.
// The exit status is 0 when every check passed, 1 when one failed or the
// time limit stopped the load early, 2 when the soak could not run, 130
// when interrupted.
//
// Run it as root from the repository root (Postfix's smtp-sink needs
// root for -u nobody), on a machine with the postfix package installed:
//
//	go run ./e2e/soak                   # 100,000 messages, at most 10 minutes
//	go run ./e2e/soak -messages 5000    # a short run, well under a minute
//
// It is not part of CI. The whole run, build and checks included, is
// bounded by -timeout (10 minutes): the load stops early if it would not
// leave time for the checks, and the run then fails. Every process it
// starts is stopped at the end, also on failure and on Ctrl-C; -keep keeps
// the scratch folder with the dumps.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	code := exitCode(ctx, err) // before stop, which ends ctx
	stop()
	os.Exit(code)
}

// cannotRun marks an error that kept the soak from running at all.
type cannotRun struct{ error }

func exitCode(ctx context.Context, err error) int {
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case ctx.Err() != nil:
		fmt.Fprintln(os.Stderr, "\nsoak: interrupted; every process it started is stopped")
		return 130
	}
	fmt.Fprintln(os.Stderr, "soak:", err)
	if errors.As(err, new(cannotRun)) {
		return 2
	}
	return 1
}

// options are the command line's.
type options struct {
	messages, clients, maxConns, perConn, size int
	drop                                       float64
	timeout, settle                            time.Duration
	rssSlack                                   float64 // bytes
	goroutineSlack                             int
	seed                                       uint64
	keep                                       bool
}

func parseFlags(args []string) (options, error) {
	fs := flag.NewFlagSet("soak", flag.ContinueOnError)
	o := options{}
	fs.IntVar(&o.messages, "messages", 100_000, "messages to send")
	fs.IntVar(&o.clients, "clients", 100, "concurrent clients, each sending one message per connection")
	fs.IntVar(&o.maxConns, "max-conns", 10, "SMTPPOOL_MAX_CONNS")
	fs.IntVar(&o.perConn, "per-conn", 10, "SMTPPOOL_MAX_MESSAGES_PER_CONN: messages per upstream session")
	fs.IntVar(&o.size, "size", 1024, "message size in bytes, at least")
	fs.Float64Var(&o.drop, "drop", 0.01, "share of upstream sessions the fault proxy cuts")
	fs.DurationVar(&o.timeout, "timeout", 10*time.Minute, "bound on the whole run, build and checks included")
	fs.DurationVar(&o.settle, "settle", 45*time.Second, "how long to wait after the load for RSS and goroutines to come back")
	rssSlack := fs.Float64("rss-slack", 16, "MiB that RSS may stay above its level before the load")
	fs.IntVar(&o.goroutineSlack, "goroutine-slack", 5, "goroutines that may stay above their number before the load")
	fs.Uint64Var(&o.seed, "seed", 0, "seed of the fault proxy's choices (0: from the clock)")
	fs.BoolVar(&o.keep, "keep", false, "keep the scratch folder, with smtp-sink's dumps")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.messages <= 0 || o.clients <= 0 || o.maxConns <= 0 || o.perConn <= 0 || o.drop < 0 || o.drop > 1 {
		return o, errors.New("-messages, -clients, -max-conns and -per-conn must be positive, -drop within [0, 1]")
	}
	o.rssSlack = *rssSlack * (1 << 20)
	if o.seed == 0 {
		o.seed = uint64(time.Now().UnixNano())
	}
	return o, nil
}

// clientTimeout bounds one client's conversation: smtppool's retry window
// (2 minutes) and some.
const clientTimeout = 3 * time.Minute

// checkReserve is the time the run keeps, after the load, for the settle
// wait, the shutdown and reading the dumps.
const checkReserve = 90 * time.Second

// soak is one run.
type soak struct {
	opts  options
	start time.Time
	tmp   string
	g     *peers.Group
	sink  *peers.Sink
	fp    *faultProxy
	proxy *peers.Proxy
	admin string // smtppool's admin address

	msgs    []peers.Message
	results []peers.Result // by message; Start is zero for one not sent
	sent    atomic.Int64
	loadDur time.Duration
	stopped bool  // the time limit stopped the load early
	last    usage // the last sample

	// before is smtppool's use idle before the load, warm after a twentieth
	// of the messages, peak the most sampled, after idle after the load.
	before, warm, peak, after usage
	final                     peers.Metrics
}

func run(ctx context.Context, args []string) (err error) {
	opts, err := parseFlags(args)
	if err != nil {
		return cannotRun{err}
	}
	s := &soak{opts: opts, start: time.Now()}
	ctx, cancel := context.WithTimeout(ctx, opts.timeout)
	defer cancel()
	peers.AddSbinToPath()
	if err := peers.Require(peers.Program{Cmd: "go", Package: "golang-go"}); err != nil {
		return cannotRun{err}
	}
	if s.tmp, err = peers.PublicDir("smtppool-soak-"); err != nil {
		return cannotRun{err}
	}
	defer func() {
		if opts.keep || err != nil {
			fmt.Fprintln(os.Stderr, "soak: kept", s.tmp)
			return
		}
		os.RemoveAll(s.tmp)
	}()
	s.g = peers.NewGroup(ctx)
	defer s.g.Close()
	if err := s.setup(ctx); err != nil {
		return cannotRun{err}
	}
	if err := s.load(ctx); err != nil {
		return err
	}
	return s.check(ctx)
}

// setup builds smtppool and starts smtp-sink, the fault proxy and smtppool,
// and measures smtppool's resources before the load.
func (s *soak) setup(ctx context.Context) error {
	o := s.opts
	root, err := peers.ModuleRoot(ctx)
	if err != nil {
		return err
	}
	logf("building smtppool")
	bin := filepath.Join(s.tmp, "smtppool")
	if err := peers.BuildProxy(ctx, root, bin, false); err != nil {
		return err
	}
	if s.sink, err = peers.StartSink(s.g, s.tmp, peers.SinkOptions{Dump: true}); err != nil {
		return err
	}
	// The random offsets span about what a whole session carries each
	// way: per message, the message and ~100 bytes of commands one way,
	// ~150 bytes of replies the other; plus the greeting and EHLO.
	span := [2]int64{
		toSink:   int64(o.perConn)*int64(o.size+200) + 40,
		toClient: int64(o.perConn)*150 + 200,
	}
	if s.fp, err = startFaultProxy(s.sink.Addr, o.drop, span, o.seed); err != nil {
		return err
	}
	s.g.Cleanup(s.fp.Close)
	s.proxy, err = peers.StartProxy(s.g, bin, s.fp.Addr(), map[string]string{
		"SMTPPOOL_MAX_CONNS":             strconv.Itoa(o.maxConns),
		"SMTPPOOL_MAX_MESSAGES_PER_CONN": strconv.Itoa(o.perConn),
		"SMTPPOOL_UPSTREAM_TLS":          "none",
		"SMTPPOOL_LOG_FORMAT":            "json",
		"SMTPPOOL_LOG_LEVEL":             "info",
	})
	if err != nil {
		return err
	}
	if s.admin, err = peers.AdminAddr(ctx, s.proxy); err != nil {
		return err
	}
	m, err := peers.ScrapeMetrics(ctx, s.admin)
	if err != nil {
		return err
	}
	s.before = usageOf(m)
	logf("smtppool %s ← clients; upstream %s (fault proxy) → smtp-sink %s; admin %s; before the load: %v; fault seed %d",
		s.proxy.Addr, s.fp.Addr(), s.sink.Addr, s.admin, s.before, o.seed)
	return nil
}

// load sends every message, -clients at a time, each over a new
// connection, and samples smtppool's resident memory meanwhile.
func (s *soak) load(ctx context.Context) error {
	o := s.opts
	s.msgs = peers.NewMessages("soak", o.messages)
	s.results = make([]peers.Result, o.messages)
	deadline, _ := ctx.Deadline()
	loadCtx, cancel := context.WithDeadline(ctx, deadline.Add(-checkReserve))
	defer cancel()

	start := time.Now()
	var next atomic.Int64
	var wg sync.WaitGroup
	for range o.clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for loadCtx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= len(s.msgs) {
					return
				}
				s.results[i] = peers.SendMail(s.proxy.Addr, s.msgs[i].Padded(o.size), peers.SendOptions{Timeout: clientTimeout})
				s.sent.Add(1)
			}
		}()
	}
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	warmTick := time.NewTicker(100 * time.Millisecond)
	defer warmTick.Stop()
	for running := true; running; {
		select {
		case <-done:
			running = false
		case <-warmTick.C:
			if s.warm.rss == 0 && s.sent.Load() >= int64(o.messages/20) {
				s.sample(ctx)
				s.warm = s.last
			}
		case <-tick.C:
			n := s.sent.Load()
			logf("%d/%d messages sent (%.0f/s); %d upstream sessions, %d cut; %v", n, o.messages,
				float64(n)/time.Since(start).Seconds(), s.fp.sessions.Load(), s.fp.cut.Load(), s.sample(ctx))
		}
	}
	s.loadDur = time.Since(start)
	if err := ctx.Err(); err != nil {
		return err
	}
	s.stopped = loadCtx.Err() != nil
	if hwm, err := procStatusKB(s.proxy.Pid(), "VmHWM"); err == nil {
		s.peak.rss = max(s.peak.rss, float64(hwm)*1024)
	}
	logf("load done: %d messages in %v", s.sent.Load(), s.loadDur.Round(time.Millisecond))
	return nil
}

// sample reads smtppool's resources, keeping the peak, for the progress
// line.
func (s *soak) sample(ctx context.Context) string {
	m, err := peers.ScrapeMetrics(ctx, s.admin)
	if err != nil {
		return err.Error()
	}
	u := usageOf(m)
	s.last = u
	s.peak.rss = max(s.peak.rss, u.rss)
	s.peak.goroutines = max(s.peak.goroutines, u.goroutines)
	return "smtppool " + u.String()
}

// check waits for smtppool's resources to come back, stops smtppool, reads
// the sink's dumps, prints the summary and returns the checks that failed.
func (s *soak) check(ctx context.Context) error {
	o := s.opts
	s.sink.Settle(ctx, 2*time.Second, 30*time.Second)
	var settled bool
	settleErr := peers.Poll(ctx, o.settle, "smtppool's RSS and goroutines to come back", func() (bool, string) {
		m, err := peers.ScrapeMetrics(ctx, s.admin)
		if err != nil {
			return false, err.Error()
		}
		s.final, s.after = m, usageOf(m)
		settled = s.after.rss <= s.before.rss+o.rssSlack && s.after.goroutines <= s.before.goroutines+float64(o.goroutineSlack) &&
			(s.warm.rss == 0 || s.after.rss <= s.warm.rss*1.25)
		return settled, s.after.String()
	})
	if ctx.Err() != nil {
		return ctx.Err()
	}
	unreachable := s.proxy.Count(`"msg":"upstream unreachable`)
	ambiguousLogged := s.proxy.Count(`"ambiguous":true`)
	if err := s.proxy.Shutdown(20 * time.Second); err != nil {
		return err
	}
	s.fp.Close()
	counters := s.sink.Settle(ctx, time.Second, 10*time.Second)
	box, err := s.sink.Dumped()
	if err != nil {
		return err
	}

	var failures []string
	fail := func(format string, args ...any) { failures = append(failures, fmt.Sprintf(format, args...)) }
	replies := map[string]int{}
	var lost, refusedDelivered, unackedDelivered, dupMsgs, dupCopies, copies int
	ours := map[string]bool{}
	for i, r := range s.results {
		m := s.msgs[i]
		ours[m.ID] = true
		n := len(box[m.ID])
		copies += n
		if n > 1 {
			dupMsgs++
			dupCopies += n - 1
		}
		switch {
		case r.Start.IsZero():
			replies["not sent"]++
		case r.Accepted():
			replies["250"]++
			if n == 0 {
				lost++
				if lost <= 10 {
					fail("acknowledged but lost: %s (%d %s)", m.ID, r.Code, r.Reply)
				}
			}
		case r.Err != nil:
			replies["no reply"]++
		case r.Code >= 500:
			replies["5xx"]++
			if n > 0 {
				refusedDelivered++
				fail("told %d at %s but delivered: %s", r.Code, r.Stage, m.ID)
			}
		default:
			replies["4xx"]++
		}
		if !r.Accepted() && n > 0 {
			unackedDelivered++
		}
	}
	foreign := 0
	for id, c := range box {
		if !ours[id] {
			foreign += len(c)
		}
	}
	retries := s.final.ByLabel("smtppool_retries_total", "reason")
	ambiguous := int(retries["no_reply"])
	switch {
	case lost > 0:
		fail("%d acknowledged messages lost", lost)
	case dupCopies > ambiguous:
		fail("%d duplicate copies, but only %d retries after a lost reply to the final dot", dupCopies, ambiguous)
	case foreign > 0:
		fail("the sink has %d messages the clients did not send", foreign)
	}
	if !settled {
		fail("smtppool's resources did not come back near their level before the load (%v, plus %.0f MiB and %d goroutines of slack), or RSS stayed above 1.25 × its level once warm (%.1f MiB): %v",
			s.before, o.rssSlack/(1<<20), o.goroutineSlack, s.warm.rss/(1<<20), settleErr)
	}
	if s.stopped {
		fail("the time limit stopped the load after %d of %d messages", s.sent.Load(), o.messages)
	}

	p := func(format string, args ...any) { fmt.Printf(format+"\n", args...) }
	p("")
	p("soak: %d messages from %d clients (one connection each) through smtppool (MAX_CONNS=%d, %d messages per session) into smtp-sink; %.1f %% of upstream sessions cut",
		o.messages, o.clients, o.maxConns, o.perConn, 100*o.drop)
	p("  clients told        250: %d   4xx: %d   5xx: %d   no reply: %d   not sent: %d",
		replies["250"], replies["4xx"], replies["5xx"], replies["no reply"], replies["not sent"])
	p("  sink kept           %d copies (counters: %v); acknowledged and lost: %d; duplicated: %d messages, %d extra copies; delivered without a 250: %d; 5xx but delivered: %d",
		copies, counters, lost, dupMsgs, dupCopies, unackedDelivered, refusedDelivered)
	p("  upstream sessions   %d through the fault proxy; %d cut (%d planned, the rest ended first)", s.fp.sessions.Load(), s.fp.cut.Load(), s.fp.planned.Load())
	p("  cut where           %s", s.fp.Phases())
	p("  smtppool retries    %s (no_reply = lost reply after the final dot, the ambiguous case)", formatCounts(retries))
	p("  smtppool sessions   closed by reason: %s", formatCounts(s.final.ByLabel("smtppool_upstream_connections_closed_total", "reason")))
	p("  smtppool log        %d \"upstream unreachable\" warnings; %d lines marked \"ambiguous\":true (info level and above)", unreachable, ambiguousLogged)
	p("  throughput          %.0f messages/s acknowledged (%d in %v)", float64(replies["250"])/s.loadDur.Seconds(), replies["250"], s.loadDur.Round(time.Millisecond))
	p("  smtppool RSS        %.1f MiB before, %.1f MiB warm (after %d messages), %.1f MiB peak, %.1f MiB after",
		s.before.rss/(1<<20), s.warm.rss/(1<<20), o.messages/20, s.peak.rss/(1<<20), s.after.rss/(1<<20))
	p("  goroutines          %.0f before, %.0f peak (sampled), %.0f after", s.before.goroutines, s.peak.goroutines, s.after.goroutines)
	p("  run time            %v", time.Since(s.start).Round(time.Second))
	if len(failures) > 0 {
		p("  FAILED:")
		for _, f := range failures {
			p("    - %s", f)
		}
		return fmt.Errorf("%d checks failed", len(failures))
	}
	p("  PASSED: no acknowledged message lost, no refused one delivered, duplicates only where a reply was lost, resources back near their level before the load")
	return nil
}

// formatCounts prints counts by name, largest first.
func formatCounts(m map[string]float64) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return m[keys[i]] > m[keys[j]] || m[keys[i]] == m[keys[j]] && keys[i] < keys[j] })
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s %.0f", k, m[k])
	}
	if b.Len() == 0 {
		return "none"
	}
	return b.String()
}

// procStatusKB reads a "kB" field, such as VmHWM, from /proc/PID/status.
func procStatusKB(pid int, field string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		name, rest, ok := strings.Cut(line, ":")
		if ok && name == field {
			if f := strings.Fields(rest); len(f) > 0 {
				return strconv.ParseInt(f[0], 10, 64)
			}
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

// logf prints progress to stderr.
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "soak %s: %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}
