package peers

import (
	"bytes"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Command says how to start a child process.
type Command struct {
	Name   string   // for messages, e.g. "smtp-sink :25025"
	Path   string   // the program
	Args   []string // its arguments
	Env    []string // its environment; nil: this process's
	Stdout io.Writer
	// Stdout, if set, takes the child's standard output; otherwise it is
	// kept in memory, as its standard error always is.
}

// Process is a running child process, in its own process group, so that a
// Ctrl-C in the terminal reaches only its parent, which stops it in order.
// It also dies with the parent's thread (Pdeathsig).
type Process struct {
	Name   string
	Args   []string
	cmd    *exec.Cmd
	stdout output
	stderr output
	done   chan struct{} // closed when the process has exited
	err    error         // Wait's result, once done is closed
}

// stopGrace is how long Stop lets a process exit after SIGTERM.
const stopGrace = 5 * time.Second

// Start starts c. The owner's cleanup stops it.
func Start(o Owner, c Command) (*Process, error) {
	p := &Process{Name: c.Name, Args: c.Args, done: make(chan struct{})}
	p.cmd = exec.Command(c.Path, c.Args...)
	p.cmd.Env = c.Env
	p.cmd.Stdout, p.cmd.Stderr = &p.stdout, &p.stderr
	if c.Stdout != nil {
		p.cmd.Stdout = c.Stdout
	}
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s (%s): %w", c.Name, c.Path, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	o.Cleanup(p.Stop)
	return p, nil
}

// Pid is the process's id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Exited reports whether the process has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Err waits until the process has exited and returns how it ended (nil for
// exit status 0).
func (p *Process) Err() error {
	<-p.done
	return p.err
}

// Log returns what the process has written to its standard error so far.
func (p *Process) Log() string { return p.stderr.String() }

// Stdout returns what the process has written to its standard output, unless
// Command.Stdout took it.
func (p *Process) Stdout() string { return p.stdout.String() }

// Failure describes the exit of a process that has exited when it should
// not have, with the end of its output.
func (p *Process) Failure() error {
	return fmt.Errorf("%s exited (%v); its last output:\n%s", p.Name, p.Err(),
		indent(Tail(p.Log()+p.Stdout(), 30)))
}

// Stop ends the process, SIGTERM first and SIGKILL to its whole group 5 s
// later, and waits until it has exited. Any goroutine may call it, any
// number of times.
func (p *Process) Stop() { p.terminate(stopGrace) }

// terminate sends SIGTERM, waits up to grace, then SIGKILLs the process
// group and waits. It reports whether the process exited within grace.
func (p *Process) terminate(grace time.Duration) (inGrace bool) {
	if p.Exited() {
		return true
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return true
	case <-time.After(grace):
	}
	_ = syscall.Kill(-p.Pid(), syscall.SIGKILL)
	<-p.done
	return false
}

// output collects a process's output while it runs. It is safe for
// concurrent use.
type output struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *output) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *output) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Tail returns the last n lines of s, after a line that says how many
// came before.
func Tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("[... %d lines before]", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

func indent(s string) string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return "    (nothing)"
	}
	return "    " + strings.ReplaceAll(s, "\n", "\n    ")
}
