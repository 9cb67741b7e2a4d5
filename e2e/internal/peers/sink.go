package peers

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// SinkOptions configure an smtp-sink.
type SinkOptions struct {
	// Args are added to smtp-sink's command line: fault injection such as
	// "-f RCPT", or "-W .:2" to delay the reply to the final dot by 2 s
	// (whole seconds only: "-W .:0.5" is refused).
	Args []string
	// Dump writes every message smtp-sink accepts to a file of its own in
	// Sink.DumpDir.
	Dump bool
}

// Sink is a running smtp-sink. Its -c counters go to a file, which
// smtp-sink appends to at every event with one write(2); reading the
// file's last record costs next to nothing on the CPUs a benchmark
// measures.
type Sink struct {
	*Process
	Port    int
	Addr    string
	DumpDir string // where Dump writes the messages
	counter *os.File
}

// StartSink starts smtp-sink on a free loopback port, with counters (-c),
// room for 2,000 sessions at once, and its files in dir (which the nobody
// user must be able to search), and waits until it listens. The owner's
// cleanup stops it.
func StartSink(o Owner, dir string, opts SinkOptions) (*Sink, error) {
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	s := &Sink{Port: port, Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port))}
	args := []string{"-u", "nobody", "-c", "-m", "2000", "-t", "300"}
	if opts.Dump {
		s.DumpDir = filepath.Join(dir, fmt.Sprintf("smtp-sink-%d-dump", port))
		if err := os.Mkdir(s.DumpDir, 0o777); err != nil {
			return nil, fmt.Errorf("smtp-sink dump folder: %w", err)
		}
		if err := os.Chmod(s.DumpDir, 0o777); err != nil { // past the umask, for nobody
			return nil, fmt.Errorf("smtp-sink dump folder: %w", err)
		}
		args = append(args, "-d", s.DumpDir+"/%H%M%S.")
	}
	args = append(append(args, opts.Args...), s.Addr, "4096")
	if s.counter, err = os.CreateTemp(dir, fmt.Sprintf("smtp-sink-%d-*.counters", port)); err != nil {
		return nil, fmt.Errorf("smtp-sink counters file: %w", err)
	}
	// Registered before the process's stop, so that it runs after it.
	o.Cleanup(func() { s.counter.Close() })
	s.Process, err = Start(o, Command{Name: "smtp-sink :" + strconv.Itoa(port), Path: "smtp-sink", Args: args, Stdout: s.counter})
	if err != nil {
		return nil, err
	}
	if err := waitListening(o.Context(), s.Process, port, 10*time.Second); err != nil {
		s.Stop()
		return nil, err
	}
	return s, nil
}

// SinkCounters are smtp-sink's -c counters: sessions ended, QUITs, and
// messages received. It updates them when a session ends, on QUIT and when
// a final dot arrives (before any -W delay of the reply).
type SinkCounters struct{ Sess, Quit, Mesg int }

func (c SinkCounters) String() string {
	return fmt.Sprintf("sess=%d quit=%d mesg=%d", c.Sess, c.Quit, c.Mesg)
}

// Counters returns the last complete "sess=N quit=N mesg=N" record
// smtp-sink wrote; records end with \r.
func (s *Sink) Counters() SinkCounters {
	var c SinkCounters
	fi, err := s.counter.Stat()
	if err != nil || fi.Size() == 0 {
		return c
	}
	buf := make([]byte, min(fi.Size(), 128))
	n, _ := s.counter.ReadAt(buf, fi.Size()-int64(len(buf)))
	return parseCounters(buf[:n])
}

// parseCounters parses the last record that ends in \r.
func parseCounters(buf []byte) SinkCounters {
	var c SinkCounters
	end := bytes.LastIndexByte(buf, '\r')
	if end < 0 {
		return c
	}
	rec := buf[:end]
	if i := bytes.LastIndexAny(rec, "\r\n"); i >= 0 {
		rec = rec[i+1:]
	}
	fmt.Sscanf(string(rec), "sess=%d quit=%d mesg=%d", &c.Sess, &c.Quit, &c.Mesg)
	return c
}

// WaitCounters checks the counters every millisecond until cond holds,
// and returns when it was seen to hold. It fails if smtp-sink exits, ctx
// ends or timeout passes first.
func (s *Sink) WaitCounters(ctx context.Context, timeout time.Duration, cond func(SinkCounters) bool) (time.Time, error) {
	var at time.Time
	err := pollEvery(ctx, time.Millisecond, timeout, s.Name+" counters", func() (bool, string) {
		c := s.Counters()
		at = time.Now()
		return cond(c) || s.Exited(), c.String()
	})
	if s.Exited() {
		return time.Time{}, s.Failure()
	}
	return at, err
}

// Settle waits until the counters have not changed for quiet, or timeout
// has passed, and returns them.
func (s *Sink) Settle(ctx context.Context, quiet, timeout time.Duration) SinkCounters {
	last, since := s.Counters(), time.Now()
	_ = pollEvery(ctx, 20*time.Millisecond, timeout, s.Name+" counters to settle", func() (bool, string) {
		if c := s.Counters(); c != last {
			last, since = c, time.Now()
		}
		return time.Since(since) >= quiet, last.String()
	})
	return last
}

// Dumped indexes the messages dumped to DumpDir by Message-ID.
func (s *Sink) Dumped() (Mailbox, error) {
	box := Mailbox{}
	return box, box.add(s.DumpDir)
}
