package main

import (
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

func (b *bench) memoryFigures() []figure {
	pl := b.plan
	return []figure{
		{ID: "5a", Name: fmt.Sprintf("smtppool peak RSS (VmHWM) with %d idle client connections", pl.idleClients),
			Short: fmt.Sprintf("Peak RSS, %d idle clients", pl.idleClients), Unit: "MiB", Digits: 1, Target: 64, Dir: atMost},
		{ID: "5c", Name: fmt.Sprintf("Memory per message in flight beyond the message (K=%d × %d KiB)", pl.inflightK, pl.inflightBytes>>10),
			Short: "Extra memory per in-flight message", Unit: "KiB", Digits: 1, Target: 64, Dir: atMost},
	}
}

// measureMemory is measurements 5a and 5c (5b comes from measurement 1).
func (b *bench) measureMemory(g *peers.Group) error {
	figs := b.memoryFigures()
	var err error
	if figs[0].Value, err = b.idleMemory(g); err != nil {
		return fmt.Errorf("idle clients: %w", err)
	}
	if figs[1].Value, err = b.inflightMemory(g); err != nil {
		return fmt.Errorf("messages in flight: %w", err)
	}
	b.add(figs...)
	return nil
}

// openClients opens n connections to addr, each greeted and past EHLO, 100
// at a time.
func openClients(addr string, n int) ([]*peers.Conn, error) {
	conns := make([]*peers.Conn, n)
	errs := make(chan error, n)
	sem := make(chan struct{}, 100)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := peers.Open(addr, 30*time.Second)
			if err != nil {
				errs <- err
				return
			}
			conns[i] = c
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		closeClients(conns)
		return nil, err
	}
	return conns, nil
}

func closeClients(conns []*peers.Conn) {
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
}

// idleMemory is 5a: a fresh smtppool, n clients connected and past EHLO
// (where the chat server's connections wait), held idle for a second; the
// figure is smtppool's VmHWM.
func (b *bench) idleMemory(g *peers.Group) (float64, error) {
	n := b.plan.idleClients
	sk, err := b.startSink(g, 0)
	if err != nil {
		return 0, err
	}
	defer sk.Stop()
	// SMTPPOOL_MAX_CLIENT_CONNS (derived from memory by default) must let
	// them all in, whatever the machine.
	px, err := b.startProxy(g, sk.Addr, map[string]string{"SMTPPOOL_MAX_CLIENT_CONNS": strconv.Itoa(max(n, 1000))})
	if err != nil {
		return 0, err
	}
	defer px.Stop()
	if lim, err := procOpenFilesLimit(px.Pid()); err != nil {
		return 0, err
	} else if lim < int64(n+64) {
		return 0, fmt.Errorf("smtppool's open-files limit is %d, too low for %d clients", lim, n)
	}
	rss0, err := procStatusKB(px.Pid(), "VmRSS")
	if err != nil {
		return 0, err
	}
	conns, err := openClients(px.Addr, n)
	if err != nil {
		return 0, err
	}
	defer closeClients(conns)
	time.Sleep(time.Second)
	if err := px.Alive(); err != nil {
		return 0, err
	}
	hwm, err := procStatusKB(px.Pid(), "VmHWM")
	if err != nil {
		return 0, err
	}
	rss, err := procStatusKB(px.Pid(), "VmRSS")
	if err != nil {
		return 0, err
	}
	b.detail("5a. Idle clients: a fresh smtppool; %d clients connect, read the greeting, send EHLO and wait (where the chat server's connections wait for MAIL). RSS %.1f MiB before, %.1f MiB with them (%.1f KiB per connection); VmHWM %.1f MiB.",
		n, mib(rss0), mib(rss), float64(rss-rss0)/float64(n), mib(hwm))
	return mib(hwm), nil
}

// mib converts a /proc figure in KiB to MiB.
func mib(kb int64) float64 { return float64(kb) / 1024 }

// inflightMemory is 5c. smtp-sink delays its reply to each final dot, and
// smtppool has K sessions, so K messages sent at once are all held in
// smtppool's memory while it waits for the replies. The pool is warmed
// first (K small messages), so that its K upstream sessions exist in both
// samples. Baseline: K clients connected, past EHLO, idle. In flight: the
// same clients have each sent a message of S bytes, and smtp-sink has
// counted all K final dots, so every message is buffered in smtppool; RSS is
// sampled until the first reply arrives and the largest sample counts.
// Extra per message = (RSS in flight - RSS idle) / K - S.
func (b *bench) inflightMemory(g *peers.Group) (float64, error) {
	pl := b.plan
	k, delay := pl.inflightK, pl.inflightDelay
	sk, err := b.startSink(g, delay)
	if err != nil {
		return 0, err
	}
	defer sk.Stop()
	px, err := b.startProxy(g, sk.Addr, map[string]string{"SMTPPOOL_MAX_CONNS": strconv.Itoa(k)})
	if err != nil {
		return 0, err
	}
	defer px.Stop()
	if err := warmPool(px, sk, k); err != nil {
		return 0, fmt.Errorf("warm-up: %w", err)
	}

	// Baseline: K clients connected and idle.
	conns, err := openClients(px.Addr, k)
	if err != nil {
		return 0, err
	}
	defer closeClients(conns)
	time.Sleep(time.Second)
	idle, err := sampleMedian(px, 5, 100*time.Millisecond)
	if err != nil {
		return 0, err
	}

	m := peers.NewMessages("inflight", 1)[0].Padded(pl.inflightBytes)
	held, err := holdInFlight(g, px, sk, conns, m, time.Duration(delay)*time.Second)
	if err != nil {
		return 0, err
	}
	extra := (float64(held.peak)-float64(idle))*1024/float64(k) - float64(held.size)
	b.detail("5c. In flight: smtp-sink -W .:%d holds every reply for %d s; smtppool with SMTPPOOL_MAX_CONNS=K=%d, its %d sessions opened by a warm-up; K clients past EHLO: RSS %.1f MiB idle (median of 5 samples). Each then sends a %d-byte message; %v after the start all K had reached the sink, so all were buffered in smtppool; the largest of %d RSS samples before the first reply: %.1f MiB (VmHWM %.1f MiB). Extra per message = (%.1f MiB - %.1f MiB) / %d - %d bytes = %.1f KiB.",
		delay, delay, k, k, mib(idle), held.size, held.allIn.Round(time.Millisecond), held.samples, mib(held.peak), mib(held.hwm),
		mib(held.peak), mib(idle), k, held.size, extra/1024)
	return extra / 1024, nil
}

// warmPool makes smtppool open k upstream sessions: k clients send a small
// message each, at once.
func warmPool(px *peers.Proxy, sk *peers.Sink, k int) error {
	conns, err := openClients(px.Addr, k)
	if err != nil {
		return err
	}
	small := peers.NewMessages("warm", 1)[0].Padded(500)
	if err := eachConn(conns, func(c *peers.Conn) error { return c.Send(small) }); err != nil {
		closeClients(conns)
		return err
	}
	for _, c := range conns {
		c.Quit()
	}
	if c := sk.Counters(); c.Sess != 0 {
		return fmt.Errorf("smtppool closed %d upstream sessions during the warm-up", c.Sess)
	}
	return nil
}

// inFlight is what holdInFlight saw.
type inFlight struct {
	size      int           // bytes of each message
	allIn     time.Duration // from the start until the sink had every message
	peak, hwm int64         // smtppool's largest RSS sample, and its VmHWM, in KiB
	samples   int
}

// holdInFlight has every client send m at once, waits until the sink has
// counted every final dot (it holds the replies for delay), then samples
// smtppool's RSS until the first reply arrives.
func holdInFlight(g *peers.Group, px *peers.Proxy, sk *peers.Sink, conns []*peers.Conn, m peers.Message, delay time.Duration) (inFlight, error) {
	data := m.Bytes()
	r := inFlight{size: len(data)}
	before := sk.Counters().Mesg
	var written sync.WaitGroup
	written.Add(len(conns))
	var replies atomic.Int32
	errs := make(chan error, len(conns))
	start := time.Now()
	for _, c := range conns {
		go func() {
			err := c.Begin(m)
			if err == nil {
				err = c.WriteData(data)
			}
			written.Done()
			if err == nil {
				err = c.Expect(250, "")
			}
			replies.Add(1)
			errs <- err
		}()
	}
	written.Wait()
	if _, err := sk.WaitCounters(g.Context(), delay, func(c peers.SinkCounters) bool { return c.Mesg >= before+len(conns) }); err != nil {
		return r, fmt.Errorf("not all %d messages reached the sink before the first reply could: %w", len(conns), err)
	}
	r.allIn = time.Since(start)
	for replies.Load() == 0 && time.Since(start) < delay {
		rss, err := procStatusKB(px.Pid(), "VmRSS")
		if err != nil {
			return r, err
		}
		if replies.Load() != 0 {
			break
		}
		r.peak = max(r.peak, rss)
		r.samples++
		time.Sleep(20 * time.Millisecond)
	}
	for range conns {
		if err := <-errs; err != nil {
			return r, fmt.Errorf("sending: %w", err)
		}
	}
	if r.samples == 0 {
		return r, fmt.Errorf("no RSS sample while all %d messages were in flight (they all reached the sink after %v; the sink delays replies by %v)", len(conns), r.allIn, delay)
	}
	r.hwm, _ = procStatusKB(px.Pid(), "VmHWM")
	return r, nil
}

// eachConn runs f on every connection at once and returns the first error.
func eachConn(conns []*peers.Conn, f func(*peers.Conn) error) error {
	errs := make(chan error, len(conns))
	for _, c := range conns {
		go func() { errs <- f(c) }()
	}
	var first error
	for range conns {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// sampleMedian returns the median of n VmRSS samples of px, every gap.
func sampleMedian(px *peers.Proxy, n int, gap time.Duration) (int64, error) {
	var xs []float64
	for i := range n {
		if i > 0 {
			time.Sleep(gap)
		}
		v, err := procStatusKB(px.Pid(), "VmRSS")
		if err != nil {
			return 0, err
		}
		xs = append(xs, float64(v))
	}
	return int64(median(xs)), nil
}

// fsType names the file system that holds path, e.g. ext4 or tmpfs.
func fsType(path string) string {
	out, err := exec.Command("df", "--output=fstype", path).Output()
	if f := strings.Fields(string(out)); err == nil && len(f) == 2 {
		return f[1]
	}
	return "an unknown file system"
}
