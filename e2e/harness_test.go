//go:build e2e

package e2e

// The harness: free ports, waiting for conditions, and the processes a
// scenario starts (the proxy, smtp-sink, a Postfix instance, a sampler of
// upstream connections). Every process is stopped in t.Cleanup, also when
// the test fails, and a failing test prints the tail of its output.

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/mail"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// ---- waiting ----

// waitFor polls cond until it reports true, and fails the test when timeout
// passes first. cond's status (a figure, such as "258/260 delivered") goes
// into the failure message.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (ok bool, status string)) {
	t.Helper()
	if err := poll(timeout, what, cond); err != nil {
		t.Fatal(err)
	}
}

// poll is waitFor for goroutines other than the test's: it returns the
// failure.
func poll(timeout time.Duration, what string, cond func() (ok bool, status string)) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, status := cond()
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %v waiting for %s; last status: %s", timeout, what, status)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ---- ports ----

var (
	portMu    sync.Mutex
	usedPorts = map[int]bool{}
)

// freePort returns a loopback TCP port that nothing listens on and that no
// earlier call returned. It prefers ports below the kernel's ephemeral range,
// so that the many outgoing connections of a burst cannot take it.
func freePort(t *testing.T) int {
	t.Helper()
	portMu.Lock()
	defer portMu.Unlock()
	lo, hi := 20000, ephemeralLow()
	for range 200 {
		port := 0
		if hi-lo >= 1000 {
			port = lo + rand.IntN(hi-lo)
		}
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue
		}
		port = ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		// smtp-sink and Postfix bind with SO_REUSEPORT: make sure that no
		// such listener shares the port.
		if usedPorts[port] || listening(port) {
			continue
		}
		usedPorts[port] = true
		return port
	}
	t.Fatal("found no free loopback port")
	return 0
}

// ephemeralLow is the lowest port the kernel gives outgoing connections.
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) < 1 {
		return 0
	}
	n, _ := strconv.Atoi(f[0])
	return n
}

// listening reports whether ss shows a TCP listener on port.
func listening(port int) bool {
	out, err := exec.Command("ss", "-Htln", fmt.Sprintf("( sport = :%d )", port)).Output()
	return err == nil && strings.TrimSpace(string(out)) != ""
}

// establishedTo counts the TCP connections open to port right now.
func establishedTo(port int) (int, error) {
	out, err := exec.Command("ss", "-Htn", "state", "established", fmt.Sprintf("( dport = :%d )", port)).Output()
	if err != nil {
		return 0, fmt.Errorf("ss: %w", err)
	}
	return len(nonEmptyLines(string(out))), nil
}

func nonEmptyLines(s string) []string {
	var lines []string
	for _, l := range strings.Split(s, "\n") {
		if strings.TrimSpace(l) != "" {
			lines = append(lines, l)
		}
	}
	return lines
}

// connSampler counts the connections open to an upstream port, over and
// over, until Stop; the maximum proves a cap.
type connSampler struct {
	port     int
	stop     chan struct{}
	done     chan struct{}
	once     sync.Once
	max, n   int
	firstErr error
}

// sampleConns starts sampling the connections established to port.
func sampleConns(t *testing.T, port int) *connSampler {
	s := &connSampler{port: port, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		for {
			n, err := establishedTo(port)
			if err != nil && s.firstErr == nil {
				s.firstErr = err
			}
			s.n++
			s.max = max(s.max, n)
			select {
			case <-s.stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(func() { s.Stop() })
	return s
}

// Stop ends the sampling and returns the largest count and the number of
// samples taken.
func (s *connSampler) Stop() (maxConns, samples int, err error) {
	s.once.Do(func() { close(s.stop) })
	<-s.done
	return s.max, s.n, s.firstErr
}

// ---- processes ----

// syncBuffer collects a process's output while it runs.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("[... %d lines before]", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

// process is a child process in its own process group, killed with the
// whole group when the test ends.
type process struct {
	name   string
	cmd    *exec.Cmd
	stdout syncBuffer
	stderr syncBuffer
	done   chan struct{} // closed when the process has exited
	err    error         // Wait's result, once done is closed
}

func startProcess(t *testing.T, name string, env []string, bin string, args ...string) *process {
	t.Helper()
	p := &process{name: name, done: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Env = env
	p.cmd.Stdout = &p.stdout
	p.cmd.Stderr = &p.stderr
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s (%s): %v", name, bin, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("%s output (tail):\n%s\n%s", name, tail(p.stderr.String(), 60), tail(p.stdout.String(), 20))
		}
	})
	return p
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill ends the process group at once.
func (p *process) kill() {
	if !p.exited() {
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	}
	<-p.done
}

// ---- the proxy ----

type proxyProc struct {
	*process
	Addr string
}

// startProxy runs the smtppool binary against upstreamAddr, with debug logs
// in text and the variables in env added, and waits until it accepts
// connections.
func startProxy(t *testing.T, upstreamAddr string, env map[string]string) *proxyProc {
	t.Helper()
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t)))
	vars := map[string]string{
		"SMTPPOOL_LISTEN_ADDR":   addr,
		"SMTPPOOL_UPSTREAM_ADDR": upstreamAddr,
		"SMTPPOOL_HOSTNAME":      "smtppool.e2e.test",
		"SMTPPOOL_LOG_LEVEL":     "debug",
		"SMTPPOOL_LOG_FORMAT":    "text",
	}
	for k, v := range env {
		vars[k] = v
	}
	var environ, shown []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "SMTPPOOL_") {
			environ = append(environ, kv)
		}
	}
	for k, v := range vars {
		environ = append(environ, k+"="+v)
	}
	for k, v := range env {
		shown = append(shown, k+"="+v)
	}
	slices.Sort(shown)
	p := &proxyProc{Addr: addr}
	t.Cleanup(func() { // runs after startProcess's cleanup has ended the proxy
		if raceEnabled && p.process != nil && strings.Contains(p.stderr.String(), "WARNING: DATA RACE") {
			t.Errorf("the race detector reported a data race in smtppool:\n%s", tail(p.stderr.String(), 60))
		}
	})
	p.process = startProcess(t, "smtppool", environ, proxyBin)
	waitFor(t, 15*time.Second, "smtppool to listen on "+addr, func() (bool, string) {
		if p.exited() {
			t.Fatalf("smtppool exited at start-up (%v):\n%s", p.err, tail(p.stderr.String(), 30))
		}
		if !strings.Contains(p.stderr.String(), "smtppool listening") {
			return false, "no \"smtppool listening\" line yet"
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return false, err.Error()
		}
		c.Close()
		return true, ""
	})
	if len(shown) == 0 {
		shown = []string{"(defaults)"}
	}
	t.Logf("smtppool listening on %s, upstream %s, %s", addr, upstreamAddr, strings.Join(shown, " "))
	return p
}

// Stop shuts the proxy down as an operator would, with SIGTERM, and waits
// until it has exited: it closes its upstream sessions with QUIT.
func (p *proxyProc) Stop(t *testing.T) {
	t.Helper()
	if p.exited() {
		t.Fatalf("smtppool had already exited (%v)", p.err)
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(45 * time.Second):
		t.Fatalf("smtppool did not exit within 45s of SIGTERM")
	}
	if p.err != nil {
		t.Errorf("smtppool exited with %v after SIGTERM", p.err)
	}
}

// Log returns what the proxy has logged so far.
func (p *proxyProc) Log() string { return p.stderr.String() }

// Count returns the number of log lines that contain s.
func (p *proxyProc) Count(s string) int { return strings.Count(p.Log(), s) }

// ---- smtp-sink ----

type sinkProc struct {
	*process
	Port    int
	Addr    string
	DumpDir string // where -d writes one file per message, if asked for
}

// startSink runs smtp-sink with -c (counters) and args on a free port and
// waits until it listens. With dump, it also writes every message it
// accepts to a file in DumpDir.
func startSink(t *testing.T, dump bool, args ...string) *sinkProc {
	t.Helper()
	s := &sinkProc{Port: freePort(t)}
	s.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(s.Port))
	all := []string{"-u", "nobody", "-c"}
	if dump {
		s.DumpDir = publicDir(t, "sink-dump")
		if err := os.Chmod(s.DumpDir, 0o777); err != nil {
			t.Fatal(err)
		}
		all = append(all, "-d", s.DumpDir+"/%H%M%S.")
	}
	all = append(all, args...)
	all = append(all, s.Addr, "256")
	s.process = startProcess(t, "smtp-sink", os.Environ(), "smtp-sink", all...)
	waitFor(t, 10*time.Second, "smtp-sink to listen on "+s.Addr, func() (bool, string) {
		if s.exited() {
			t.Fatalf("smtp-sink exited at start-up (%v): %s", s.err, s.stderr.String())
		}
		return listening(s.Port), "not listening"
	})
	t.Logf("smtp-sink %s", strings.Join(all, " "))
	return s
}

// sinkCounters are smtp-sink's -c counters: sessions ended, QUITs, messages.
type sinkCounters struct{ Sess, Quit, Mesg int }

func (c sinkCounters) String() string {
	return fmt.Sprintf("sess=%d quit=%d mesg=%d", c.Sess, c.Quit, c.Mesg)
}

// Counters parses the last counter line smtp-sink printed. It updates them
// when a session ends, on QUIT and at each final dot.
func (s *sinkProc) Counters() sinkCounters {
	recs := strings.FieldsFunc(s.stdout.String(), func(r rune) bool { return r == '\r' || r == '\n' })
	for i := len(recs) - 1; i >= 0; i-- { // the last whole record
		var c sinkCounters
		if n, _ := fmt.Sscanf(strings.TrimSpace(recs[i]), "sess=%d quit=%d mesg=%d", &c.Sess, &c.Quit, &c.Mesg); n == 3 {
			return c
		}
	}
	return sinkCounters{}
}

// Dumped indexes the messages dumped to DumpDir by Message-ID.
func (s *sinkProc) Dumped(t *testing.T) map[string][]storedMessage {
	t.Helper()
	return indexByMessageID(t, s.DumpDir)
}

// ---- a Postfix upstream ----

type postfixOptions struct {
	Limit           int    // per-client concurrent connections (PF_LIMIT), default 20
	TLSCert, TLSKey string // PEM files: offer STARTTLS with them
}

type postfixProc struct {
	Dir  string // PF_DIR
	Port int
	Addr string
	etc  string
	env  []string
}

// startPostfix sets up and starts a Postfix instance of its own, in a fresh
// PF_DIR on a free port, with the shared recipe, and waits until it
// listens. It is stopped when the test ends.
func startPostfix(t *testing.T, opts postfixOptions) *postfixProc {
	t.Helper()
	if opts.Limit == 0 {
		opts.Limit = 20
	}
	p := &postfixProc{Dir: publicDir(t, "postfix"), Port: freePort(t)}
	p.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(p.Port))
	p.etc = filepath.Join(p.Dir, "etc")
	p.env = append(os.Environ(), "PF_DIR="+p.Dir, "PF_PORT="+strconv.Itoa(p.Port),
		"PF_LIMIT="+strconv.Itoa(opts.Limit), "PF_DOMAIN=test.example")
	if out, err := p.script("setup"); err != nil {
		t.Fatalf("postfix-upstream.sh setup: %v\n%s", err, out)
	}
	t.Cleanup(func() { p.shutdown(t) })
	if opts.TLSCert != "" {
		// smtpd needs the tlsmgr service, which the recipe's master.cf
		// lacks, for TLS entropy; without it STARTTLS gets 454 4.7.0.
		for _, args := range [][]string{
			{"-e", "smtpd_tls_cert_file=" + opts.TLSCert, "smtpd_tls_key_file=" + opts.TLSKey,
				"smtpd_tls_security_level=may", "smtpd_tls_loglevel=1"},
			{"-M", "tlsmgr/unix=tlsmgr unix - - n 1000? 1 tlsmgr"},
		} {
			if out, err := exec.Command("postconf", append([]string{"-c", p.etc}, args...)...).CombinedOutput(); err != nil {
				t.Fatalf("postconf %v: %v\n%s", args, err, out)
			}
		}
	}
	p.Start(t)
	t.Logf("postfix upstream on %s, PF_DIR %s, per-client limit %d, STARTTLS %v", p.Addr, p.Dir, opts.Limit, opts.TLSCert != "")
	return p
}

func (p *postfixProc) script(verb string) (string, error) {
	cmd := exec.Command(upstreamScript, verb)
	cmd.Env = p.env
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// Running reports whether the instance's master process runs.
func (p *postfixProc) Running() bool {
	return exec.Command("postfix", "-c", p.etc, "status").Run() == nil
}

// Start starts the instance with the recipe's start verb and waits until it
// listens.
func (p *postfixProc) Start(t *testing.T) {
	t.Helper()
	if err := p.start(); err != nil {
		t.Fatal(err)
	}
}

func (p *postfixProc) start() error {
	// After an unclean stop, postsuper warns about the queue files that
	// killed processes left, writing as the postfix user straight to the log
	// file, which postlogd created as root: without this the start fails
	// with "fatal: open logfile ...: Permission denied".
	if err := chownToPostfix(filepath.Join(p.Dir, "postfix.log")); err != nil {
		return err
	}
	if out, err := p.script("start"); err != nil {
		return fmt.Errorf("postfix-upstream.sh start: %v\n%s\nlog:\n%s", err, out, tail(p.Log(), 20))
	}
	return poll(20*time.Second, "postfix to listen on "+p.Addr, func() (bool, string) {
		return listening(p.Port), "not listening"
	})
}

func chownToPostfix(path string) error {
	u, err := user.Lookup("postfix")
	if err != nil {
		return err
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if err := os.Chown(path, uid, gid); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// Stop stops the instance with "postfix stop" and waits until its status
// says stopped and nothing listens on its port.
func (p *postfixProc) Stop(t *testing.T) {
	t.Helper()
	if err := p.stop(); err != nil {
		t.Fatal(err)
	}
}

func (p *postfixProc) stop() error {
	if out, err := exec.Command("postfix", "-c", p.etc, "stop").CombinedOutput(); err != nil {
		return fmt.Errorf("postfix stop: %v\n%s", err, out)
	}
	return poll(20*time.Second, "postfix to stop", func() (bool, string) {
		if p.Running() {
			return false, "postfix status: running"
		}
		return !listening(p.Port), "still listening"
	})
}

// shutdown stops the instance whatever state the test left it in, and
// prints its log's tail if the test failed. (publicDir's cleanup, which runs
// after, removes the folder.)
func (p *postfixProc) shutdown(t *testing.T) {
	if p.Running() {
		_ = exec.Command("postfix", "-c", p.etc, "stop").Run()
		deadline := time.Now().Add(15 * time.Second)
		for p.Running() && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		if p.Running() {
			t.Errorf("postfix in %s did not stop; aborting it", p.Dir)
			_ = exec.Command("postfix", "-c", p.etc, "abort").Run()
		}
	}
	if t.Failed() {
		t.Logf("postfix log (tail):\n%s", tail(p.Log(), 40))
	}
}

// Flush asks Postfix to deliver its queue now rather than at its next run.
func (p *postfixProc) Flush() {
	_ = exec.Command("postqueue", "-c", p.etc, "-f").Run()
}

// QueueLen is the number of messages in Postfix's queue, not yet delivered.
func (p *postfixProc) QueueLen() int {
	out, err := exec.Command("postqueue", "-c", p.etc, "-j").Output()
	if err != nil {
		return -1
	}
	return len(nonEmptyLines(string(out)))
}

// Mailbox indexes the delivered messages by Message-ID.
func (p *postfixProc) Mailbox(t *testing.T) map[string][]storedMessage {
	t.Helper()
	box := indexByMessageID(t, filepath.Join(p.Dir, "mail", "sink", "new"))
	for id, msgs := range indexByMessageID(t, filepath.Join(p.Dir, "mail", "sink", "cur")) {
		box[id] = append(box[id], msgs...)
	}
	return box
}

// Log returns Postfix's log file.
func (p *postfixProc) Log() string {
	b, _ := os.ReadFile(filepath.Join(p.Dir, "postfix.log"))
	return string(b)
}

// LogSize is the log's length now: pass it to LogSince to read what was
// logged after.
func (p *postfixProc) LogSize() int { return len(p.Log()) }

// LogSince returns what Postfix logged after the log had length offset.
func (p *postfixProc) LogSince(offset int) string {
	l := p.Log()
	if offset > len(l) {
		return ""
	}
	return l[offset:]
}

// ---- files ----

// publicDir makes a folder under /tmp that the postfix and nobody users can
// search (t.TempDir makes 0700 folders), removed after a passing test and
// kept for inspection after a failing one.
func publicDir(t *testing.T, what string) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "smtppool-e2e-"+what+"-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kept %s for inspection", dir)
			return
		}
		os.RemoveAll(dir)
	})
	return dir
}

// storedMessage is one delivered copy of a message.
type storedMessage struct {
	Path   string
	Header mail.Header
}

// indexByMessageID reads every message file in dir (one message per file, as
// in a maildir or smtp-sink's -d dumps) and groups them by Message-ID.
func indexByMessageID(t *testing.T, dir string) map[string][]storedMessage {
	t.Helper()
	index := map[string][]storedMessage{}
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return index
	}
	if err != nil {
		t.Fatalf("read %s: %v", dir, err)
	}
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		path := filepath.Join(dir, e.Name())
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		m, err := mail.ReadMessage(f)
		f.Close()
		if err != nil {
			t.Fatalf("parse %s: %v", path, err)
		}
		id := strings.TrimSpace(m.Header.Get("Message-Id"))
		index[id] = append(index[id], storedMessage{Path: path, Header: m.Header})
	}
	return index
}

// ---- checks ----

// waitDelivered waits until Postfix has delivered every message of want and
// its queue is empty, flushing the queue now and then, and returns the
// mailbox indexed by Message-ID.
func waitDelivered(t *testing.T, pf *postfixProc, want []testMessage, timeout time.Duration) map[string][]storedMessage {
	t.Helper()
	var box map[string][]storedMessage
	lastFlush := time.Now()
	waitFor(t, timeout, fmt.Sprintf("%d messages in the upstream's mailbox", len(want)), func() (bool, string) {
		box = pf.Mailbox(t)
		got := 0
		for _, m := range want {
			if len(box[m.ID]) > 0 {
				got++
			}
		}
		queued := pf.QueueLen()
		if got == len(want) && queued == 0 {
			return true, ""
		}
		if time.Since(lastFlush) > 2*time.Second {
			pf.Flush()
			lastFlush = time.Now()
		}
		return false, fmt.Sprintf("%d/%d delivered, %d in Postfix's queue", got, len(want), queued)
	})
	return box
}

// copies counts, for each message of msgs, its copies in box, and returns
// how many have exactly one, none, and more than one.
func copies(box map[string][]storedMessage, msgs []testMessage) (once, missing, duplicated int) {
	for _, m := range msgs {
		switch len(box[m.ID]) {
		case 0:
			missing++
		case 1:
			once++
		default:
			duplicated++
		}
	}
	return once, missing, duplicated
}
