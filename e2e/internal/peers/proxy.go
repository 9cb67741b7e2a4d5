package peers

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// ModuleRoot finds the root of the smtppool module that holds the current
// folder.
func ModuleRoot(ctx context.Context) (string, error) {
	gomod, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	root := filepath.Dir(strings.TrimSpace(string(gomod)))
	mod, err := os.ReadFile(filepath.Join(root, "go.mod"))
	if err != nil || !bytes.Contains(mod, []byte("module github.com/smtppool/smtppool\n")) {
		return "", fmt.Errorf("run from inside the smtppool repository (found module root %q)", root)
	}
	return root, nil
}

// BuildProxy builds smtppool, the main package at the module root, into
// out, with the race detector if race is set. It uses the go command on
// PATH, which go test and go run put first.
func BuildProxy(ctx context.Context, root, out string, race bool) error {
	args := []string{"build", "-o", out}
	if race {
		args = append(args, "-race")
	}
	args = append(args, ".")
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, b)
	}
	return nil
}

// Proxy is a running smtppool.
type Proxy struct {
	*Process
	Port int
	Addr string
}

// StartProxy runs the smtppool binary bin against upstream on a free
// loopback port and waits until it listens. env adds SMTPPOOL_ variables to
// those StartProxy sets (the listen address, the upstream, the host name
// and an admin address on a free port) or replaces them; the caller's own SMTPPOOL_ variables are dropped.
// The owner's cleanup stops it.
func StartProxy(o Owner, bin, upstream string, env map[string]string) (*Proxy, error) {
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	vars := map[string]string{
		"SMTPPOOL_LISTEN_ADDR":   addr,
		"SMTPPOOL_UPSTREAM_ADDR": upstream,
		"SMTPPOOL_HOSTNAME":      "smtppool.e2e.test",
		"SMTPPOOL_ADMIN_ADDR":    "127.0.0.1:0", // a test that needs it reads the port from the log
	}
	for k, v := range env {
		vars[k] = v
	}
	var environ []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "SMTPPOOL_") {
			environ = append(environ, kv)
		}
	}
	for k, v := range vars {
		environ = append(environ, k+"="+v)
	}
	p, err := Start(o, Command{Name: "smtppool :" + strconv.Itoa(port), Path: bin, Env: environ})
	if err != nil {
		return nil, err
	}
	if err := waitListening(o.Context(), p, port, 15*time.Second); err != nil {
		p.Stop()
		return nil, err
	}
	return &Proxy{Process: p, Port: port, Addr: addr}, nil
}

// Shutdown stops smtppool as an operator would, with SIGTERM, which makes
// it close its upstream sessions with QUIT, and waits up to timeout for it
// to exit. It fails unless smtppool was running and exited cleanly in time.
func (p *Proxy) Shutdown(timeout time.Duration) error {
	if p.Exited() {
		return fmt.Errorf("before SIGTERM: %w", p.Failure())
	}
	if !p.terminate(timeout) {
		return fmt.Errorf("%s did not exit within %v of SIGTERM; killed it", p.Name, timeout)
	}
	if err := p.Err(); err != nil {
		return fmt.Errorf("%s exited with %v after SIGTERM; its last output:\n%s", p.Name, err, indent(Tail(p.Log(), 30)))
	}
	return nil
}

// Alive fails if smtppool has exited.
func (p *Proxy) Alive() error {
	if p.Exited() {
		return p.Failure()
	}
	return nil
}

// Count returns the number of times s occurs in smtppool's log so far.
func (p *Proxy) Count(s string) int { return strings.Count(p.Log(), s) }
