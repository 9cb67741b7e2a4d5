package peers

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
)

// handedOut is every port FreePort has returned in this process: a port is
// free from its check until its server binds it, so it must not be handed
// out twice. Ports are one resource for the whole process, hence one set.
var handedOut = struct {
	sync.Mutex
	ports map[int]bool
}{ports: map[int]bool{}}

// FreePort returns a loopback TCP port that nothing listens on and that no
// earlier call returned. It picks ports below the kernel's range for
// outgoing connections (/proc/sys/net/ipv4/ip_local_port_range), so that
// the many client connections of a burst cannot take it. smtp-sink and
// Postfix bind with SO_REUSEPORT, so a port in use could be shared
// silently: each candidate is checked with ss too.
func FreePort() (int, error) {
	handedOut.Lock()
	defer handedOut.Unlock()
	lo, hi := 20000, ephemeralLow()
	for range 200 {
		port := 0 // the kernel's choice, when the range below is too narrow
		if hi-lo >= 1000 {
			port = lo + rand.IntN(hi-lo)
		}
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue
		}
		port = ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		if handedOut.ports[port] {
			continue
		}
		if busy, err := listening(port); err != nil {
			return 0, err
		} else if busy {
			continue
		}
		handedOut.ports[port] = true
		return port, nil
	}
	return 0, errors.New("found no free loopback port in 200 tries")
}

// ephemeralLow is the lowest port the kernel gives outgoing connections, 0
// if unknown.
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
func listening(port int) (bool, error) {
	out, err := ss("-Htln", fmt.Sprintf("( sport = :%d )", port))
	return strings.TrimSpace(out) != "", err
}

// listeningPID reports whether process pid listens on port. It tells a
// server that has bound its port from another that shares it.
func listeningPID(port, pid int) (bool, error) {
	out, err := ss("-Htlnp", fmt.Sprintf("( sport = :%d )", port))
	return strings.Contains(out, fmt.Sprintf("pid=%d,", pid)), err
}

// EstablishedTo counts the TCP connections open to port right now, as one
// dump of the kernel's sockets sees them (see establishedSockets): a count
// taken while connections open and close may be off by those, either way.
func EstablishedTo(port int) (int, error) {
	socks, err := establishedSockets(port)
	return len(socks), err
}

// establishedSockets lists the TCP connections established to port, each
// by its socket cookie (ss's "sk:"), which no other socket has while the
// machine runs. One dump is not a snapshot: the kernel walks its table of
// connections bucket by bucket while others open and close them, so a dump
// may list a connection that closed while it ran beside one that opened
// after, though the two were never open together. (Measured in bursts of
// 5,000 clients with SMTPPOOL_MAX_CONNS=10 and a session renewed every 3
// messages, on a loaded machine: 4 of about 2,200 dumps in two runs listed
// 11 to 13 of smtppool's connections; in the run with 3 of them, strace
// showed that smtppool never had more than 10 from the start of a connect
// to the end of its close.)
func establishedSockets(port int) (map[string]bool, error) {
	out, err := ss("-Htne", "state", "established", fmt.Sprintf("( dport = :%d )", port))
	if err != nil {
		return nil, err
	}
	return parseSockets(out)
}

// parseSockets reads the sockets of ss -Htne output, one a line, by their
// cookies.
func parseSockets(out string) (map[string]bool, error) {
	socks := map[string]bool{}
	for _, line := range nonEmptyLines(out) {
		id := ""
		for _, f := range strings.Fields(line) {
			if strings.HasPrefix(f, "sk:") {
				id = f
			}
		}
		if id == "" {
			return nil, fmt.Errorf("ss printed a socket without its cookie (sk:): %q", line)
		}
		socks[id] = true
	}
	return socks, nil
}

// together counts the sockets listed in both of two dumps taken one after
// the other. Each of them was established at some moment of the first dump
// and at some moment of the second, and a connection that has left the
// established state never returns to it: so each was established from the
// end of the first dump to the start of the second, and they were all open
// together at that moment. A cap that this count exceeds was exceeded.
func together(first, second map[string]bool) int {
	n := 0
	for id := range first {
		if second[id] {
			n++
		}
	}
	return n
}

func ss(args ...string) (string, error) {
	out, err := exec.Command("ss", args...).Output()
	if err != nil {
		return "", fmt.Errorf("ss %s: %w", strings.Join(args, " "), err)
	}
	return string(out), nil
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

// waitListening waits until p listens on port, without connecting to it (a
// connection would count as a session at smtp-sink); it fails at once if p
// exits.
func waitListening(ctx context.Context, p *Process, port int, timeout time.Duration) error {
	var ssErr error
	err := pollEvery(ctx, 20*time.Millisecond, timeout, fmt.Sprintf("%s to listen on port %d", p.Name, port), func() (bool, string) {
		if p.Exited() {
			return true, ""
		}
		var ok bool
		ok, ssErr = listeningPID(port, p.Pid())
		return ok || ssErr != nil, "not listening"
	})
	switch {
	case p.Exited():
		return fmt.Errorf("at start-up: %w", p.Failure())
	case ssErr != nil:
		return ssErr
	}
	return err
}

// ConnSampler counts the connections open to an upstream port, over and
// over, until Stop; the largest count proves a cap. A count is of the
// connections listed both by a dump and by the one before it, which were
// all open at one moment (see together), not of the connections one dump
// lists, which may include two that were never open together (see
// establishedSockets). A connection that lives shorter than the time
// between two dumps (some tens of milliseconds) is not counted.
type ConnSampler struct {
	stop     chan struct{}
	done     chan struct{}
	once     sync.Once
	max, n   int
	dumpMax  int // the most sockets one dump listed
	firstErr error
}

// SampleConns starts sampling the connections established to port, every
// 10 ms, until Stop or the owner's cleanup.
func SampleConns(o Owner, port int) *ConnSampler {
	s := &ConnSampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		var last map[string]bool
		for {
			socks, err := establishedSockets(port)
			if err != nil && s.firstErr == nil {
				s.firstErr = err
			}
			s.n++
			s.dumpMax = max(s.dumpMax, len(socks))
			s.max = max(s.max, together(last, socks))
			last = socks
			select {
			case <-s.stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	o.Cleanup(func() { s.Stop() })
	return s
}

// Stop ends the sampling and returns the most connections open together,
// the number of dumps taken and the first error.
func (s *ConnSampler) Stop() (maxConns, samples int, err error) {
	s.once.Do(func() { close(s.stop) })
	<-s.done
	return s.max, s.n, s.firstErr
}

// MostInOneDump returns the most connections that one dump listed, after
// Stop: above the count Stop returns when connections opened and closed
// while a dump ran. For the log, not for a cap.
func (s *ConnSampler) MostInOneDump() int {
	<-s.done
	return s.dumpMax
}
