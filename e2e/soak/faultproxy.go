package main

// The fault proxy: a TCP relay between smtppool and smtp-sink that cuts a
// chosen share of the upstream sessions at a random byte offset, in one
// direction or the other.

import (
	"fmt"
	"math/rand/v2"
	"net"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
)

// Directions of a session's byte stream.
const (
	toSink   = 0 // smtppool's commands and messages
	toClient = 1 // smtp-sink's replies
)

// faultProxy relays each connection it accepts to target. It picks a
// share rate of them, at random, to be cut: in a random direction, after a
// random number of bytes in that direction, it forwards the bytes up to
// that offset and closes both connections, with a FIN or, half the time,
// a RST. A session that ends before its offset is not cut.
type faultProxy struct {
	ln     net.Listener
	target string
	rate   float64
	// span is the range of the random offset in each direction, from 0:
	// about the bytes a whole session carries that way, so that cuts fall
	// anywhere in it, greeting and EHLO included.
	span [2]int64

	rmu sync.Mutex
	rng *rand.Rand

	sessions, planned, cut atomic.Int64
	wg                     sync.WaitGroup

	mu      sync.Mutex
	phases  map[string]int // cuts by the point of the SMTP conversation
	conns   map[net.Conn]struct{}
	closing bool
}

// startFaultProxy listens on a loopback port and relays to target.
func startFaultProxy(target string, rate float64, span [2]int64, seed uint64) (*faultProxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("fault proxy: %w", err)
	}
	p := &faultProxy{ln: ln, target: target, rate: rate, span: span,
		rng:    rand.New(rand.NewPCG(seed, seed^0x5eed)),
		phases: map[string]int{}, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.serve()
	return p, nil
}

// Addr is where smtppool connects.
func (p *faultProxy) Addr() string { return p.ln.Addr().String() }

// Close stops accepting, closes every relayed connection and waits for
// the relays to end.
func (p *faultProxy) Close() {
	p.ln.Close()
	p.mu.Lock()
	p.closing = true
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// Phases returns the cuts by point of the conversation, most frequent first.
func (p *faultProxy) Phases() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	type kv struct {
		k string
		n int
	}
	var all []kv
	for k, n := range p.phases {
		all = append(all, kv{k, n})
	}
	sort.Slice(all, func(i, j int) bool { return all[i].n > all[j].n || all[i].n == all[j].n && all[i].k < all[j].k })
	var b strings.Builder
	for i, e := range all {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s %d", e.k, e.n)
	}
	return b.String()
}

func (p *faultProxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go p.relay(c)
	}
}

// track registers c for Close; it reports false once Close has begun.
func (p *faultProxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closing {
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *faultProxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
}

// plan is what happens to one session.
type plan struct {
	cut    bool
	dir    int
	offset int64 // bytes in dir forwarded before the cut
	reset  bool  // close with RST rather than FIN
}

func (p *faultProxy) newPlan() plan {
	p.rmu.Lock()
	defer p.rmu.Unlock()
	if p.rng.Float64() >= p.rate {
		return plan{}
	}
	dir := p.rng.IntN(2)
	return plan{cut: true, dir: dir, offset: p.rng.Int64N(p.span[dir] + 1), reset: p.rng.IntN(2) == 0}
}

// relay carries one session between smtppool (client) and the sink.
func (p *faultProxy) relay(client net.Conn) {
	defer p.wg.Done()
	p.sessions.Add(1)
	up, err := net.Dial("tcp", p.target)
	if err != nil {
		client.Close()
		return
	}
	if !p.track(client) || !p.track(up) {
		client.Close()
		up.Close()
		return
	}
	defer p.untrack(client)
	defer p.untrack(up)
	s := &session{p: p, conns: [2]net.Conn{toSink: up, toClient: client}, plan: p.newPlan()}
	if s.plan.cut {
		p.planned.Add(1)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.pump(toClient, up, client)
	}()
	s.pump(toSink, client, up)
	<-done
}

// session is one relayed connection pair and what is known of its SMTP
// conversation, from the commands smtppool sends.
type session struct {
	p     *faultProxy
	conns [2]net.Conn
	plan  plan

	mu     sync.Mutex
	line   []byte // the command line being received
	inBody bool   // between DATA and the final dot
	phase  string // the last command, "message" in the body, "final dot" after it
	ended  bool
}

// pump copies src to dst, in direction dir, until either side ends or the
// planned cut; then it closes both connections, which ends the other pump.
func (s *session) pump(dir int, src, dst net.Conn) {
	defer s.end()
	buf := make([]byte, 32<<10)
	var sent int64
	for {
		n, err := src.Read(buf)
		chunk := buf[:n]
		if s.plan.cut && s.plan.dir == dir && n > 0 && sent+int64(n) >= s.plan.offset {
			chunk = chunk[:s.plan.offset-sent]
			s.observe(dir, chunk)
			if _, werr := dst.Write(chunk); werr == nil {
				s.cutHere(dir)
			}
			return
		}
		if n > 0 {
			s.observe(dir, chunk)
			if _, err := dst.Write(chunk); err != nil {
				return
			}
			sent += int64(n)
		}
		if err != nil {
			return
		}
	}
}

// observe follows the commands smtppool sends, to name the point of a cut.
func (s *session) observe(dir int, b []byte) {
	if dir != toSink {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range b {
		if c != '\n' {
			if len(s.line) < 64 {
				s.line = append(s.line, c)
			}
			continue
		}
		line := strings.TrimRight(string(s.line), "\r")
		s.line = s.line[:0]
		switch {
		case s.inBody && line == ".":
			s.inBody, s.phase = false, "final dot"
		case s.inBody:
			s.phase = "message"
		default:
			verb, _, _ := strings.Cut(line, " ")
			verb = strings.ToUpper(verb)
			if verb == "MAIL" || verb == "RCPT" {
				verb, _, _ = strings.Cut(strings.ToUpper(line), ":")
			}
			s.phase = verb
			s.inBody = verb == "DATA" // smtp-sink always answers 354
		}
	}
}

// cutHere records the cut and closes both connections.
func (s *session) cutHere(dir int) {
	s.mu.Lock()
	var where string
	switch {
	case dir == toClient && s.phase == "":
		where = "in the greeting"
	case dir == toClient:
		where = "in the reply to " + s.phase
	case s.inBody || s.phase == "DATA":
		where = "in the message"
	case len(s.line) > 0:
		verb, _, _ := strings.Cut(strings.ToUpper(string(s.line)), " ")
		where = "in " + strings.TrimRight(verb, "\r")
	case s.phase == "":
		where = "before EHLO"
	default:
		where = "after " + s.phase
	}
	s.mu.Unlock()
	s.p.cut.Add(1)
	s.p.mu.Lock()
	s.p.phases[where]++
	s.p.mu.Unlock()
	if s.plan.reset {
		for _, c := range s.conns {
			if tc, ok := c.(*net.TCPConn); ok {
				tc.SetLinger(0)
			}
		}
	}
	s.end()
}

// end closes both connections, once.
func (s *session) end() {
	s.mu.Lock()
	ended := s.ended
	s.ended = true
	s.mu.Unlock()
	if !ended {
		s.conns[0].Close()
		s.conns[1].Close()
	}
}
