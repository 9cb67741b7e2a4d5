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

// EstablishedTo counts the TCP connections open to port right now.
func EstablishedTo(port int) (int, error) {
	out, err := ss("-Htn", "state", "established", fmt.Sprintf("( dport = :%d )", port))
	return len(nonEmptyLines(out)), err
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
// over, until Stop; the largest count proves a cap.
type ConnSampler struct {
	stop     chan struct{}
	done     chan struct{}
	once     sync.Once
	max, n   int
	firstErr error
}

// SampleConns starts sampling the connections established to port, every
// 10 ms, until Stop or the owner's cleanup.
func SampleConns(o Owner, port int) *ConnSampler {
	s := &ConnSampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		for {
			n, err := EstablishedTo(port)
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
	o.Cleanup(func() { s.Stop() })
	return s
}

// Stop ends the sampling and returns the largest count, the number of
// samples taken and the first error.
func (s *ConnSampler) Stop() (maxConns, samples int, err error) {
	s.once.Do(func() { close(s.stop) })
	<-s.done
	return s.max, s.n, s.firstErr
}
