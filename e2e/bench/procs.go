package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// owned is every process and directory the benchmark started or made. Its
// cleanups run on return from main, on a failed measurement and on Ctrl-C.
var owned = &registry{}

type registry struct {
	mu      sync.Mutex
	next    int
	funcs   map[int]func()
	closing bool
}

// add registers f to run at cleanup and returns a function that runs it now
// (at most once) and unregisters it.
func (r *registry) add(f func()) (runNow func()) {
	r.mu.Lock()
	if r.closing {
		r.mu.Unlock()
		f()
		return func() {}
	}
	if r.funcs == nil {
		r.funcs = map[int]func(){}
	}
	id := r.next
	r.next++
	var once sync.Once
	g := func() { once.Do(f) }
	r.funcs[id] = g
	r.mu.Unlock()
	return func() {
		r.mu.Lock()
		delete(r.funcs, id)
		r.mu.Unlock()
		g()
	}
}

// stopAll runs every registered cleanup, newest first.
func (r *registry) stopAll() {
	r.mu.Lock()
	ids := make([]int, 0, len(r.funcs))
	for id := range r.funcs {
		ids = append(ids, id)
	}
	funcs := r.funcs
	r.funcs = nil
	r.mu.Unlock()
	sort.Sort(sort.Reverse(sort.IntSlice(ids))) // newest first
	for _, id := range ids {
		funcs[id]()
	}
}

// shutdown runs every cleanup and from then on runs those registered later
// at once: the process is exiting.
func (r *registry) shutdown() {
	r.mu.Lock()
	r.closing = true
	r.mu.Unlock()
	r.stopAll()
}

// proc is a child process the benchmark owns.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited
	err  error         // Wait's result, once done is closed
	tail *tailBuffer   // the end of its stderr (and stdout unless captured)
	stop func()        // stops it (SIGTERM, then SIGKILL) and waits; idempotent
}

// startProc starts a child that the registry stops at cleanup. Its stderr,
// and its stdout unless stdout is given, go to a small in-memory tail for
// error messages. The child gets its own process group, so that Ctrl-C in
// the terminal reaches only the benchmark, which then stops it in order.
func startProc(name string, stdout io.Writer, env []string, path string, args ...string) (*proc, error) {
	cmd := exec.Command(path, args...)
	p := &proc{name: name, cmd: cmd, done: make(chan struct{}), tail: &tailBuffer{max: 16 << 10}}
	cmd.Stderr = p.tail
	cmd.Stdout = p.tail
	if stdout != nil {
		cmd.Stdout = stdout
	}
	if env != nil {
		cmd.Env = env
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	p.stop = owned.add(func() { p.terminate(5 * time.Second) })
	return p, nil
}

// terminate sends SIGTERM, waits up to grace, then SIGKILLs the process and
// its group.
func (p *proc) terminate(grace time.Duration) {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return
	case <-time.After(grace):
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	_ = p.cmd.Process.Kill()
	<-p.done
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// failure describes an unexpected exit, with the end of its output.
func (p *proc) failure() error {
	return fmt.Errorf("%s exited (%v); its last output:\n%s", p.name, p.err, indent(p.tail.String()))
}

func indent(s string) string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return "    (nothing)"
	}
	return "    " + strings.ReplaceAll(s, "\n", "\n    ")
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	buf []byte
	max int
}

func (t *tailBuffer) Write(b []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, b...)
	if len(t.buf) > t.max {
		t.buf = append(t.buf[:0], t.buf[len(t.buf)-t.max:]...)
	}
	return len(b), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.buf)
}

// ports hands out loopback ports that nothing listens on. smtp-sink and
// Postfix bind with SO_REUSEPORT, so a port in use could be shared
// silently: each candidate from the kernel is checked with ss too, and none
// is handed out twice in one run.
var ports = struct {
	mu   sync.Mutex
	used map[int]bool
}{used: map[int]bool{}}

func freePort() (int, error) {
	ports.mu.Lock()
	defer ports.mu.Unlock()
	for range 50 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		if ports.used[port] {
			continue
		}
		busy, err := listening(port)
		if err != nil {
			return 0, err
		}
		if busy {
			continue
		}
		ports.used[port] = true
		return port, nil
	}
	return 0, errors.New("no free loopback port found")
}

// listening reports whether anything listens on TCP port, according to ss.
func listening(port int) (bool, error) {
	out, err := exec.Command("ss", "-Htln", fmt.Sprintf("( sport = :%d )", port)).Output()
	if err != nil {
		return false, fmt.Errorf("ss: %w", err)
	}
	return len(bytes.TrimSpace(out)) > 0, nil
}

// waitListening waits until port is listening, without connecting to it (a
// connection would count as a session at smtp-sink), or p exits.
func waitListening(p *proc, port int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if p != nil && p.exited() {
			return p.failure()
		}
		ok, err := listening(port)
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: port %d not listening after %v", procName(p), port, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func procName(p *proc) string {
	if p == nil {
		return "server"
	}
	return p.name
}

// clkTck is the kernel's clock tick rate for /proc times.
var clkTck = func() float64 {
	out, err := exec.Command("getconf", "CLK_TCK").Output()
	if err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(out))); err == nil && n > 0 {
			return float64(n)
		}
	}
	return 100
}()

// cpuTimes is a process's user and system CPU time, in seconds.
type cpuTimes struct{ user, sys float64 }

func (c cpuTimes) total() float64 { return c.user + c.sys }

func (c cpuTimes) sub(d cpuTimes) cpuTimes { return cpuTimes{c.user - d.user, c.sys - d.sys} }

func (c cpuTimes) add(d cpuTimes) cpuTimes { return cpuTimes{c.user + d.user, c.sys + d.sys} }

// procCPU reads utime and stime from /proc/PID/stat.
func procCPU(pid int) (cpuTimes, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return cpuTimes{}, err
	}
	// The command name, field 2, is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return cpuTimes{}, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return cpuTimes{}, fmt.Errorf("short /proc/%d/stat", pid)
	}
	u, err1 := strconv.ParseFloat(f[11], 64)
	s, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		return cpuTimes{}, fmt.Errorf("bad /proc/%d/stat", pid)
	}
	return cpuTimes{u / clkTck, s / clkTck}, nil
}

// procStatusKB reads a "kB" field, such as VmRSS or VmHWM, from
// /proc/PID/status.
func procStatusKB(pid int, field string) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || name != field {
			continue
		}
		v := strings.Fields(rest)
		if len(v) == 0 {
			break
		}
		return strconv.ParseInt(v[0], 10, 64)
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

// procOpenFilesLimit reads the soft "Max open files" of a process.
func procOpenFilesLimit(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "Max open files") {
			f := strings.Fields(strings.TrimPrefix(line, "Max open files"))
			if len(f) > 0 {
				if f[0] == "unlimited" {
					return 1 << 62, nil
				}
				return strconv.ParseInt(f[0], 10, 64)
			}
		}
	}
	return 0, fmt.Errorf("no open-files limit in /proc/%d/limits", pid)
}
