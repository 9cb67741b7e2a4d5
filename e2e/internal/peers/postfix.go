package peers

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Postfix is a private Postfix instance in a folder of its own (Dir, with
// its configuration in Dir/etc and its log in Dir/postfix.log), listening
// on one loopback port. It uses no system configuration and no DNS.
type Postfix struct {
	Dir   string
	Port  int
	Addr  string
	Limit int // concurrent connections it accepts from one client
	etc   string
	// stopMu makes stops from several goroutines wait for each other.
	stopMu sync.Mutex
}

// MailDomain is the domain whose every recipient a Postfix upstream
// delivers (PF_DOMAIN).
const MailDomain = "test.example"

// PostfixOptions configure a Postfix upstream.
type PostfixOptions struct {
	Limit           int    // per-client concurrent connections (PF_LIMIT), default 20
	TLSCert, TLSKey string // PEM files, readable by Postfix: offer STARTTLS with them
	// Postconf holds further main.cf settings, "name = value" each, set
	// with postconf -e after the recipe's.
	Postconf []string
}

// StartUpstream sets up a Postfix upstream in dir, on a free port, with
// script (the shared recipe postfix-upstream.sh, see UpstreamScript), and
// starts it. Past opts.Limit concurrent connections from one client it
// answers the greeting with 421, as Exchange does; every recipient at
// MailDomain lands in its Mailbox. The owner's cleanup stops it.
func StartUpstream(o Owner, dir, script string, opts PostfixOptions) (*Postfix, error) {
	if opts.Limit == 0 {
		opts.Limit = 20
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	p := newPostfix(dir, port)
	p.Limit = opts.Limit
	cmd := exec.CommandContext(o.Context(), script, "setup")
	cmd.Env = append(os.Environ(), "PF_DIR="+p.Dir, "PF_PORT="+strconv.Itoa(p.Port),
		"PF_LIMIT="+strconv.Itoa(opts.Limit), "PF_DOMAIN="+MailDomain)
	if opts.TLSCert != "" {
		cmd.Env = append(cmd.Env, "PF_TLS_CERT="+opts.TLSCert, "PF_TLS_KEY="+opts.TLSKey)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("%s setup: %w\n%s", script, err, out)
	}
	if len(opts.Postconf) > 0 {
		args := append([]string{"-c", p.etc, "-e"}, opts.Postconf...)
		if out, err := exec.CommandContext(o.Context(), "postconf", args...).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("postconf %q: %w\n%s", opts.Postconf, err, out)
		}
	}
	return p, p.startOwned(o)
}

func newPostfix(dir string, port int) *Postfix {
	return &Postfix{Dir: dir, Port: port, Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), etc: filepath.Join(dir, "etc")}
}

// startOwned registers the stop before the start, so that a start that
// half worked is stopped too.
func (p *Postfix) startOwned(o Owner) error {
	o.Cleanup(func() {
		if err := p.shutdown(); err != nil {
			o.Errorf("%v", err)
		}
	})
	return p.Start(o.Context())
}

// Start starts the instance and waits until it listens.
func (p *Postfix) Start(ctx context.Context) error {
	// After an unclean stop, postsuper warns about the queue files that
	// killed processes left, writing as the postfix user straight to the log
	// file, which postlogd created as root: without this the start fails
	// with "fatal: open logfile ...: Permission denied".
	if err := chownToPostfix(filepath.Join(p.Dir, "postfix.log")); err != nil {
		return err
	}
	if out, err := p.postfix(ctx, "start"); err != nil {
		return fmt.Errorf("postfix start: %w\n%s\nlog:\n%s", err, out, Tail(p.Log(), 20))
	}
	return Poll(ctx, 20*time.Second, "postfix to listen on "+p.Addr, func() (bool, string) {
		ok, err := listening(p.Port)
		return ok, fmt.Sprintf("not listening (%v)", err)
	})
}

func chownToPostfix(path string) error {
	u, err := user.Lookup("postfix")
	if err != nil {
		return fmt.Errorf("the postfix user: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if err := os.Chown(path, uid, gid); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("give the log to postfix: %w", err)
	}
	return nil
}

func (p *Postfix) postfix(ctx context.Context, verb string) (string, error) {
	out, err := exec.CommandContext(ctx, "postfix", "-c", p.etc, verb).CombinedOutput()
	return string(out), err
}

// running reports whether the instance's master process runs.
func (p *Postfix) running() bool {
	_, err := p.postfix(context.Background(), "status")
	return err == nil
}

// Stop stops the instance with "postfix stop" and waits until its status
// says stopped and nothing listens on its port.
func (p *Postfix) Stop(ctx context.Context) error {
	p.stopMu.Lock()
	defer p.stopMu.Unlock()
	if out, err := p.postfix(ctx, "stop"); err != nil {
		return fmt.Errorf("postfix stop: %w\n%s", err, out)
	}
	return Poll(ctx, 20*time.Second, "postfix to stop", func() (bool, string) {
		if p.running() {
			return false, "postfix status: running"
		}
		ok, err := listening(p.Port)
		return !ok && err == nil, fmt.Sprintf("still listening (%v)", err)
	})
}

// shutdown stops the instance whatever state it is in, at cleanup: with
// "postfix abort" if "postfix stop" does not do it.
func (p *Postfix) shutdown() error {
	if !p.running() {
		return nil
	}
	if err := p.Stop(context.Background()); err == nil {
		return nil
	}
	_, _ = p.postfix(context.Background(), "abort")
	if p.running() {
		return fmt.Errorf("postfix in %s did not stop, not even with postfix abort", p.Dir)
	}
	return fmt.Errorf("postfix in %s did not stop; aborted it", p.Dir)
}

// flush asks Postfix to deliver its queue now rather than at its next run.
func (p *Postfix) flush() {
	_ = exec.Command("postqueue", "-c", p.etc, "-f").Run()
}

// queueLen is the number of messages in the queue, not yet delivered: the
// files in its queue folders.
func (p *Postfix) queueLen() int {
	n := 0
	for _, q := range []string{"maildrop", "incoming", "active", "deferred", "hold"} {
		_ = filepath.WalkDir(filepath.Join(p.Dir, "spool", q), func(_ string, d os.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				n++
			}
			return nil
		})
	}
	return n
}

// finishedQueueLen is queueLen without the files in the incoming queue
// that cleanup has not finished writing, such as those a process killed by
// a stop leaves behind: cleanup creates a queue file with mode 0600 and
// sets its owner-execute bit once the message is complete.
func (p *Postfix) finishedQueueLen() int {
	n := 0
	for _, q := range []string{"maildrop", "incoming", "active", "deferred", "hold"} {
		_ = filepath.WalkDir(filepath.Join(p.Dir, "spool", q), func(_ string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return nil
			}
			if q == "incoming" {
				if fi, err := d.Info(); err != nil || fi.Mode().Perm()&0o100 == 0 {
					return nil
				}
			}
			n++
			return nil
		})
	}
	return n
}

// WaitQueueEmpty waits until the queue is empty.
func (p *Postfix) WaitQueueEmpty(ctx context.Context, timeout time.Duration) error {
	return Poll(ctx, timeout, "postfix's queue to empty", func() (bool, string) {
		n := p.queueLen()
		return n == 0, fmt.Sprintf("%d messages queued", n)
	})
}

// Log returns the instance's log file.
func (p *Postfix) Log() string {
	b, _ := os.ReadFile(filepath.Join(p.Dir, "postfix.log"))
	return string(b)
}

// LogSize is the log's length now: pass it to LogSince to read what was
// logged after.
func (p *Postfix) LogSize() int { return len(p.Log()) }

// LogSince returns what the instance logged after the log had length
// offset.
func (p *Postfix) LogSince(offset int) string {
	l := p.Log()
	if offset > len(l) {
		return ""
	}
	return l[offset:]
}

// LogCount counts the occurrences of s in the log.
func (p *Postfix) LogCount(s string) int { return strings.Count(p.Log(), s) }

// LogCounter counts the lines of an instance's log that hold a string,
// from its making on, reading only what was added since its last count.
type LogCounter struct {
	path, s string
	off     int64
	n       int
	rest    []byte // a line not yet ended
}

// CountFromNow returns a counter of the log lines holding s logged from
// now on.
func (p *Postfix) CountFromNow(s string) *LogCounter {
	c := &LogCounter{path: filepath.Join(p.Dir, "postfix.log"), s: s}
	if fi, err := os.Stat(c.path); err == nil {
		c.off = fi.Size()
	}
	return c
}

// Count returns the number of lines holding the string so far.
func (c *LogCounter) Count() int {
	f, err := os.Open(c.path)
	if err != nil {
		return c.n
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	for {
		n, err := f.ReadAt(buf, c.off)
		c.off += int64(n)
		data := append(c.rest, buf[:n]...)
		end := strings.LastIndexByte(string(data), '\n')
		if end >= 0 {
			c.n += strings.Count(string(data[:end]), c.s)
			c.rest = append([]byte(nil), data[end+1:]...)
		} else {
			c.rest = data
		}
		if err != nil || n == 0 {
			return c.n
		}
	}
}
