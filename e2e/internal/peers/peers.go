// Package peers is the harness that the end-to-end tests (package e2e) and
// the benchmark (e2e/bench) share: it builds and runs smtppool and the real
// SMTP software around it on loopback, and speaks SMTP as the chat server
// does.
//
//   - peers.go: owners of what is started, waiting, folders, required programs.
//   - ports.go: free loopback ports, listeners and open connections (ss).
//   - procs.go: child processes, always stopped when their owner is done.
//   - proxy.go: building and running the smtppool binary.
//   - sink.go, source.go: Postfix's smtp-sink and smtp-source.
//   - postfix.go, relay.go: private Postfix instances, as the upstream or
//     as a relay in front of smtp-sink.
//   - mailbox.go: delivered messages, indexed by Message-ID.
//   - cgroup.go: memory cgroups, to run smtppool as in a container.
//   - client.go: test messages and a client that behaves like the chat server.
//
// Nothing here fails a test by itself: every helper returns its error, and
// whatever it starts is stopped by its Owner, a *testing.T in the tests and
// a Group in the benchmark. The peers need root, Debian's postfix package
// (postfix, postconf, postqueue, smtp-sink, smtp-source) and ss; Require
// checks them.
package peers

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

// Owner is what every helper that starts something needs from its caller:
// a context that ends when the caller gives up, a place for the cleanups
// that stop what was started, and a way to report a cleanup that failed.
// *testing.T and *Group satisfy it.
type Owner interface {
	Context() context.Context
	Cleanup(func())
	Errorf(format string, args ...any)
}

// Group is an Owner for programs that are not tests, such as the
// benchmark. Close runs its cleanups, newest first, as a test's end does.
type Group struct {
	ctx      context.Context
	stop     func() bool   // unregisters the close on ctx's end
	closed   chan struct{} // closed once Close has run every cleanup
	mu       sync.Mutex
	cleanups []func()
	closing  bool
	errs     []error
}

// NewGroup returns a Group that closes itself as soon as ctx ends, so that
// an interrupted program stops what it started at once, and whatever it is
// waiting for fails.
func NewGroup(ctx context.Context) *Group {
	g := &Group{ctx: ctx, closed: make(chan struct{})}
	g.stop = context.AfterFunc(ctx, func() { g.Close() })
	return g
}

// Context returns the Group's context.
func (g *Group) Context() context.Context { return g.ctx }

// Cleanup registers f to run at Close. Once Close has begun, f runs at once.
func (g *Group) Cleanup(f func()) {
	g.mu.Lock()
	if g.closing {
		g.mu.Unlock()
		f()
		return
	}
	g.cleanups = append(g.cleanups, f)
	g.mu.Unlock()
}

// Errorf records a failure that a cleanup reports; Close returns them.
func (g *Group) Errorf(format string, args ...any) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.errs = append(g.errs, fmt.Errorf(format, args...))
}

// Close runs every cleanup, newest first, and returns the failures they
// reported. A second call, from any goroutine, waits until the first is done.
func (g *Group) Close() error {
	g.mu.Lock()
	if g.closing {
		g.mu.Unlock()
		<-g.closed
	} else {
		g.closing = true
		cleanups := g.cleanups
		g.cleanups = nil
		g.mu.Unlock()
		g.stop()
		for _, f := range slices.Backward(cleanups) {
			f()
		}
		close(g.closed)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return errors.Join(g.errs...)
}

// pollInterval is how often Poll checks its condition.
const pollInterval = 50 * time.Millisecond

// Poll checks cond every 50 ms until it reports true, and fails when
// timeout passes first or ctx ends. cond's status (a figure, such as
// "258/260 delivered") goes into the failure.
func Poll(ctx context.Context, timeout time.Duration, what string, cond func() (ok bool, status string)) error {
	return pollEvery(ctx, pollInterval, timeout, what, cond)
}

// PollEvery is Poll, checking cond every interval.
func PollEvery(ctx context.Context, every, timeout time.Duration, what string, cond func() (ok bool, status string)) error {
	return pollEvery(ctx, every, timeout, what, cond)
}

func pollEvery(ctx context.Context, every, timeout time.Duration, what string, cond func() (bool, string)) error {
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		ok, status := cond()
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %v waiting for %s; last status: %s", timeout, what, status)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("gave up waiting for %s (%w); last status: %s", what, context.Cause(ctx), status)
		case <-tick.C:
		}
	}
}

// PublicDir makes a fresh folder under /tmp, named after pattern as
// os.MkdirTemp does, that the postfix and nobody users can search (MkdirTemp
// makes 0700 folders). Removing it is the caller's: the tests keep it when
// they fail.
func PublicDir(pattern string) (string, error) {
	dir, err := os.MkdirTemp("/tmp", pattern)
	if err != nil {
		return "", fmt.Errorf("make a folder for the peers: %w", err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		os.Remove(dir)
		return "", fmt.Errorf("make %s searchable: %w", dir, err)
	}
	return dir, nil
}

// Program is a command a run needs, with the Debian package that has it.
type Program struct{ Cmd, Package string }

// programs are the commands this package runs.
func programs() []Program {
	return []Program{
		{"postfix", "postfix"}, {"postconf", "postfix"}, {"postqueue", "postfix"},
		{"smtp-sink", "postfix"}, {"smtp-source", "postfix"}, {"ss", "iproute2"},
	}
}

// Require fails, naming everything missing at once, unless this process
// runs as root (Postfix and smtp-sink -u nobody need it) and every program
// this package runs, and every one of more, is on PATH.
func Require(more ...Program) error {
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root privileges (Postfix and smtp-sink -u nobody need them)")
	}
	for _, p := range append(programs(), more...) {
		if _, err := exec.LookPath(p.Cmd); err != nil {
			missing = append(missing, fmt.Sprintf("%s (Debian package %s)", p.Cmd, p.Package))
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing peers:\n  - %s", strings.Join(missing, "\n  - "))
	}
	return nil
}

// AddSbinToPath appends /usr/sbin and /sbin to PATH where it lacks them:
// Postfix's commands live there, and a CI user's PATH may not have them.
func AddSbinToPath() {
	path := os.Getenv("PATH")
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		if !slices.Contains(filepath.SplitList(path), dir) {
			path += string(os.PathListSeparator) + dir
		}
	}
	os.Setenv("PATH", path)
}

// UpstreamScript finds the shared Postfix recipe, peers/postfix-upstream.sh
// in the folder $SMTPPOOL_SHARED_DIR or else in ../shared beside the module
// root.
func UpstreamScript(moduleRoot string) (string, error) {
	shared := os.Getenv("SMTPPOOL_SHARED_DIR")
	if shared == "" {
		shared = filepath.Join(moduleRoot, "..", "shared")
	}
	script, err := filepath.Abs(filepath.Join(shared, "peers", "postfix-upstream.sh"))
	if err == nil {
		_, err = os.Stat(script)
	}
	if err != nil {
		return "", fmt.Errorf("the upstream recipe %s (set SMTPPOOL_SHARED_DIR to the shared/ folder): %w", script, err)
	}
	return script, nil
}
