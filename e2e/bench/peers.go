package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// requiredPeers are the programs the benchmark drives; each is checked
// before anything runs, so that a missing one fails clearly.
var requiredPeers = []struct{ name, hint string }{
	{"go", "the Go toolchain, to build smtppool"},
	{"smtp-sink", "Debian package postfix"},
	{"smtp-source", "Debian package postfix"},
	{"postfix", "Debian package postfix"},
	{"postconf", "Debian package postfix"},
	{"ss", "Debian package iproute2"},
	{"getconf", "Debian package libc-bin"},
}

func checkPeers() error {
	var missing []string
	for _, p := range requiredPeers {
		if _, err := exec.LookPath(p.name); err != nil {
			missing = append(missing, fmt.Sprintf("%s (%s)", p.name, p.hint))
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing peer programs: %s; install Postfix with: sh ../shared/peers/postfix-upstream.sh install (or apt-get install postfix)",
			strings.Join(missing, ", "))
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("run as root: smtp-sink and a private Postfix instance need it")
	}
	return nil
}

// sinkCounts are smtp-sink's -c counters: sessions ended, QUITs, and
// messages received (counted when the final dot arrives, before any -W
// delay of the reply).
type sinkCounts struct{ sess, quit, mesg int64 }

// sink is a running smtp-sink. Its -c counters go to a file, which smtp-sink
// appends to at every event with one write(2); the benchmark polls the
// file's last record rather than reading a pipe, so that following the
// counters costs next to nothing on the CPUs being measured.
type sink struct {
	*proc
	port    int
	addr    string
	counter *os.File
}

// startSink starts smtp-sink on a free loopback port, writing its counters
// into dir. delay, when positive, delays the reply to the final dot by that
// many whole seconds (smtp-sink takes no fractions: "-W .:0.5" is refused as
// a non-positive delay).
func startSink(dir string, delay int) (*sink, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	f, err := os.CreateTemp(dir, fmt.Sprintf("smtp-sink-%d-*.counters", port))
	if err != nil {
		return nil, err
	}
	s := &sink{port: port, addr: fmt.Sprintf("127.0.0.1:%d", port), counter: f}
	args := []string{"-u", "nobody", "-c", "-m", "2000", "-t", "300"}
	if delay > 0 {
		args = append(args, "-W", fmt.Sprintf(".:%d", delay))
	}
	args = append(args, s.addr, "4096")
	// Registered before the process, so that it runs after the process stopped.
	owned.add(func() { f.Close() })
	p, err := startProc(fmt.Sprintf("smtp-sink :%d", port), f, nil, "smtp-sink", args...)
	if err != nil {
		return nil, err
	}
	s.proc = p
	if err := waitListening(p, port, 10*time.Second); err != nil {
		p.stop()
		return nil, err
	}
	return s, nil
}

// snapshot returns the last complete "sess=N quit=N mesg=N" record; records
// end with \r.
func (s *sink) snapshot() sinkCounts {
	var c sinkCounts
	fi, err := s.counter.Stat()
	if err != nil || fi.Size() == 0 {
		return c
	}
	buf := make([]byte, min(fi.Size(), 128))
	n, _ := s.counter.ReadAt(buf, fi.Size()-int64(len(buf)))
	buf = buf[:n]
	end := bytes.LastIndexByte(buf, '\r')
	if end < 0 {
		return c
	}
	rec := buf[:end]
	if i := bytes.LastIndexAny(rec, "\r\n"); i >= 0 {
		rec = rec[i+1:]
	}
	fmt.Sscanf(string(rec), "sess=%d quit=%d mesg=%d", &c.sess, &c.quit, &c.mesg)
	return c
}

// waitFor polls the counters every millisecond until cond holds, and
// returns the time it was seen to hold.
func (s *sink) waitFor(cond func(sinkCounts) bool, timeout time.Duration) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	for {
		c := s.snapshot()
		now := time.Now()
		if cond(c) {
			return now, nil
		}
		if s.exited() {
			return time.Time{}, s.failure()
		}
		if now.After(deadline) {
			return time.Time{}, fmt.Errorf("%s: counters still sess=%d quit=%d mesg=%d after %v", s.name, c.sess, c.quit, c.mesg, timeout)
		}
		time.Sleep(time.Millisecond)
	}
}

// settle waits until the counters have not changed for quiet, and returns
// them.
func (s *sink) settle(quiet, timeout time.Duration) sinkCounts {
	deadline := time.Now().Add(timeout)
	last, since := s.snapshot(), time.Now()
	for time.Since(since) < quiet && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		if c := s.snapshot(); c != last {
			last, since = c, time.Now()
		}
	}
	return last
}

// sourceResult is one run of smtp-source.
type sourceResult struct {
	wall time.Duration
	cpu  cpuTimes // smtp-source's own CPU
}

// sourceArgs are the arguments of one smtp-source run: sessions in
// parallel, messages in all, body bytes; one connection per message (no -d),
// as the chat server does.
func sourceArgs(sessions, messages, bytes int, addr string) []string {
	return []string{"-s", strconv.Itoa(sessions), "-m", strconv.Itoa(messages), "-l", strconv.Itoa(bytes),
		"-M", "bench.example", "-f", "sender@bench.example", "-t", "rcpt@rcpt.example", addr}
}

// runSource runs smtp-source to completion. It stops at the first error and
// exits non-zero, which fails the run.
func runSource(sessions, messages, bytes int, addr string, timeout time.Duration) (sourceResult, error) {
	start := time.Now()
	p, err := startProc("smtp-source", nil, nil, "smtp-source", sourceArgs(sessions, messages, bytes, addr)...)
	if err != nil {
		return sourceResult{}, err
	}
	defer p.stop()
	select {
	case <-p.done:
	case <-time.After(timeout):
		p.stop()
		return sourceResult{}, fmt.Errorf("smtp-source -s %d -m %d to %s: not done after %v; its output:\n%s",
			sessions, messages, addr, timeout, indent(p.tail.String()))
	}
	wall := time.Since(start)
	if p.err != nil {
		return sourceResult{}, fmt.Errorf("smtp-source -s %d -m %d to %s: %v; its output:\n%s",
			sessions, messages, addr, p.err, indent(p.tail.String()))
	}
	st := p.cmd.ProcessState
	return sourceResult{wall: wall, cpu: cpuTimes{st.UserTime().Seconds(), st.SystemTime().Seconds()}}, nil
}

// proxyProc is a running smtppool.
type proxyProc struct {
	*proc
	port int
	addr string
	env  map[string]string
}

// startProxy starts the smtppool binary with SMTPPOOL_* settings on top of
// the benchmark's defaults: plain text to the upstream, logging at warn
// (nothing is logged per message at that level).
func startProxy(bin, upstream string, settings map[string]string) (*proxyProc, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	env := map[string]string{
		"SMTPPOOL_LISTEN_ADDR":   fmt.Sprintf("127.0.0.1:%d", port),
		"SMTPPOOL_UPSTREAM_ADDR": upstream,
		"SMTPPOOL_UPSTREAM_TLS":  "none",
		"SMTPPOOL_LOG_LEVEL":     "warn",
		"SMTPPOOL_HOSTNAME":      "smtppool.bench",
	}
	for k, v := range settings {
		env[k] = v
	}
	environ := []string{}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "SMTPPOOL_") {
			environ = append(environ, kv)
		}
	}
	for k, v := range env {
		environ = append(environ, k+"="+v)
	}
	p, err := startProc(fmt.Sprintf("smtppool :%d (MAX_CONNS=%s)", port, env["SMTPPOOL_MAX_CONNS"]), nil, environ, bin)
	if err != nil {
		return nil, err
	}
	px := &proxyProc{proc: p, port: port, addr: fmt.Sprintf("127.0.0.1:%d", port), env: env}
	if err := waitListening(p, port, 10*time.Second); err != nil {
		p.stop()
		return nil, err
	}
	return px, nil
}

// shutdown stops smtppool with SIGTERM, which closes its upstream sessions
// with QUIT, and checks that it exited cleanly.
func (px *proxyProc) shutdown() error {
	px.stop()
	if px.err != nil {
		return fmt.Errorf("%s did not exit cleanly: %w", px.name, px.failure())
	}
	return nil
}

// alive fails when smtppool has exited.
func (px *proxyProc) alive() error {
	if px.exited() {
		return px.failure()
	}
	return nil
}

func (px *proxyProc) cpu() (cpuTimes, error) { return procCPU(px.pid()) }

// kb reads a /proc/PID/status field of smtppool, in KiB.
func (px *proxyProc) kb(field string) (int64, error) { return procStatusKB(px.pid(), field) }
