package peers

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// DelayLink is a TCP proxy on a loopback port in front of a target, which
// delays every byte by a fixed time in each direction, as a network link
// with that one-way latency would, without limiting bandwidth: a round
// trip through it costs twice the delay. The delay can change while
// connections are open; bytes already in flight keep theirs.
//
// Go's timers fire up to a millisecond late on some machines, which would
// add that much to every crossing: the link learns how late they fire and
// sets them that much early, so that the delay is right on average (give
// or take a fraction of a millisecond for each chunk). Measured reports
// the delay the bytes really had.
type DelayLink struct {
	Port int
	Addr string

	target string
	oneWay atomic.Int64 // nanoseconds
	early  atomic.Int64 // how early timers are set, learnt: nanoseconds
	// The delay the chunks had since the last SetDelay: their count and
	// the sum, in nanoseconds.
	crossings, delays atomic.Int64
	ln                net.Listener
	mu                sync.Mutex
	conns             map[net.Conn]struct{}
	wg                sync.WaitGroup
	stopped           bool
}

// StartDelayLink listens on a free loopback port and relays each
// connection to target with oneWay delay each way. The owner's cleanup
// stops it and closes its connections.
func StartDelayLink(o Owner, target string, oneWay time.Duration) (*DelayLink, error) {
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("delay link: %w", err)
	}
	l := &DelayLink{Port: port, Addr: addr, target: target, ln: ln, conns: map[net.Conn]struct{}{}}
	l.SetDelay(oneWay)
	o.Cleanup(l.stop)
	l.wg.Add(1)
	go l.serve()
	return l, nil
}

// SetDelay sets the one-way delay of the bytes that enter the link from now
// on.
func (l *DelayLink) SetDelay(oneWay time.Duration) {
	l.oneWay.Store(int64(oneWay))
	l.crossings.Store(0)
	l.delays.Store(0)
}

// Measured returns the mean delay that the chunks that crossed the link
// since the last SetDelay had, and their number.
func (l *DelayLink) Measured() (mean time.Duration, chunks int64) {
	n := l.crossings.Load()
	if n == 0 {
		return 0, 0
	}
	return time.Duration(l.delays.Load() / n), n
}

// Delay returns the one-way delay.
func (l *DelayLink) Delay() time.Duration { return time.Duration(l.oneWay.Load()) }

func (l *DelayLink) serve() {
	defer l.wg.Done()
	for {
		c, err := l.ln.Accept()
		if err != nil {
			return
		}
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			l.relay(c)
		}()
	}
}

// track registers c to be closed by stop; it reports false once stopped.
func (l *DelayLink) track(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped {
		return false
	}
	l.conns[c] = struct{}{}
	return true
}

func (l *DelayLink) untrack(c net.Conn) {
	l.mu.Lock()
	delete(l.conns, c)
	l.mu.Unlock()
}

// relay connects client to the target and carries bytes both ways, each
// direction through its own delay line, until both directions have ended.
func (l *DelayLink) relay(client net.Conn) {
	server, err := net.Dial("tcp", l.target)
	if err != nil {
		client.Close()
		return
	}
	if !l.track(client) || !l.track(server) {
		client.Close()
		server.Close()
		return
	}
	defer func() {
		client.Close()
		server.Close()
		l.untrack(client)
		l.untrack(server)
	}()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); l.line(server, client) }()
	go func() { defer wg.Done(); l.line(client, server) }()
	wg.Wait()
}

// chunk is what one read got, when, and when it may leave the line.
type chunk struct {
	b        []byte
	read     time.Time
	due      time.Time
	err      error // the read's error, after b: the end of the direction
	counting bool  // its delay counts for Measured
}

// line copies src to dst, each chunk after the delay in force when it was
// read. When src ends, dst's writing side is closed (after the bytes
// before it have left); a failed write closes both.
func (l *DelayLink) line(dst, src net.Conn) {
	queue := make(chan chunk, 1024)
	go func() {
		defer close(queue)
		for {
			b := make([]byte, 32<<10)
			n, err := src.Read(b)
			now := time.Now()
			due := now.Add(l.Delay())
			if n > 0 {
				queue <- chunk{b: b[:n], read: now, due: due, counting: true}
			}
			if err != nil {
				queue <- chunk{err: err, due: due}
				return
			}
		}
	}()
	timer := time.NewTimer(0)
	<-timer.C
	for c := range queue {
		if wait := time.Until(c.due) - time.Duration(l.early.Load()); wait > 0 {
			timer.Reset(wait)
			<-timer.C
			l.learn(time.Since(c.due))
		}
		if c.counting {
			l.crossings.Add(1)
			l.delays.Add(int64(time.Since(c.read)))
		}
		if c.err != nil {
			if tc, ok := dst.(*net.TCPConn); ok && errors.Is(c.err, io.EOF) {
				tc.CloseWrite()
			} else {
				dst.Close()
			}
			continue
		}
		if _, err := dst.Write(c.b); err != nil {
			dst.Close()
			src.Close()
		}
	}
}

// maxEarly bounds how early timers are set: lateness beyond it is the
// machine's load, not the timers' granularity, and is left in the delay.
const maxEarly = 2 * time.Millisecond

// learn moves how early timers are set by an eighth of the error of the
// last one, late positive, early negative, within 0 and maxEarly.
func (l *DelayLink) learn(late time.Duration) {
	early := time.Duration(l.early.Load()) + late/8
	l.early.Store(int64(min(max(early, 0), maxEarly)))
}

// stop closes the listener and every connection, and waits for the relays
// to end.
func (l *DelayLink) stop() {
	l.ln.Close()
	l.mu.Lock()
	l.stopped = true
	for c := range l.conns {
		c.Close()
	}
	l.mu.Unlock()
	l.wg.Wait()
}
