package main

import (
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
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
func (b *bench) measureMemory() error {
	figs := b.memoryFigures()
	var err error
	if figs[0].Value, err = b.idleMemory(); err != nil {
		return fmt.Errorf("idle clients: %w", err)
	}
	if figs[1].Value, err = b.inflightMemory(); err != nil {
		return fmt.Errorf("messages in flight: %w", err)
	}
	for _, f := range figs {
		b.add(f)
	}
	return nil
}

// openClients opens n connections to addr, each greeted and past EHLO, 100
// at a time.
func openClients(addr string, n int) ([]*smtpConn, error) {
	conns := make([]*smtpConn, n)
	errs := make(chan error, n)
	sem := make(chan struct{}, 100)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := dialSMTP(addr, 30*time.Second)
			if err == nil {
				if err = c.ehlo(); err != nil {
					c.close()
				}
			}
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

func closeClients(conns []*smtpConn) {
	for _, c := range conns {
		if c != nil {
			c.close()
		}
	}
}

// idleMemory is 5a: a fresh smtppool, n clients connected and past EHLO
// (where the chat server's connections wait), held idle for a second; the
// figure is smtppool's VmHWM.
func (b *bench) idleMemory() (float64, error) {
	n := b.plan.idleClients
	sk, err := startSink(b.tmp, 0)
	if err != nil {
		return 0, err
	}
	defer sk.stop()
	px, err := startProxy(b.bin, sk.addr, nil)
	if err != nil {
		return 0, err
	}
	defer px.stop()
	if lim, err := procOpenFilesLimit(px.pid()); err != nil {
		return 0, err
	} else if lim < int64(n+64) {
		return 0, fmt.Errorf("smtppool's open-files limit is %d, too low for %d clients", lim, n)
	}
	rss0, err := px.kb("VmRSS")
	if err != nil {
		return 0, err
	}
	conns, err := openClients(px.addr, n)
	if err != nil {
		return 0, err
	}
	defer closeClients(conns)
	time.Sleep(time.Second)
	if err := px.alive(); err != nil {
		return 0, err
	}
	hwm, err := px.kb("VmHWM")
	if err != nil {
		return 0, err
	}
	rss, err := px.kb("VmRSS")
	if err != nil {
		return 0, err
	}
	b.detail("5a. Idle clients: a fresh smtppool; %d clients connect, read the greeting, send EHLO and wait (where the chat server's connections wait for MAIL). RSS %.1f MiB before, %.1f MiB with them (%.1f KiB per connection); VmHWM %.1f MiB.",
		n, kib(rss0)/1024, kib(rss)/1024, kib(rss-rss0)/float64(n), kib(hwm)/1024)
	return kib(hwm) / 1024, nil
}

func kib(kb int64) float64 { return float64(kb) }

// inflightMemory is 5c. smtp-sink delays its reply to each final dot, and
// smtppool has K sessions, so K messages sent at once are all held in
// smtppool's memory while it waits for the replies. The pool is warmed
// first (K small messages), so that its K upstream sessions exist in both
// samples. Baseline: K clients connected, past EHLO, idle. In flight: the
// same clients have each sent a message of S bytes, and smtp-sink has
// counted all K final dots, so every message is buffered in smtppool; RSS is
// sampled until the first reply arrives and the largest sample counts.
// Extra per message = (RSS in flight - RSS idle) / K - S.
func (b *bench) inflightMemory() (float64, error) {
	pl := b.plan
	k, size, delay := pl.inflightK, pl.inflightBytes, pl.inflightDelay
	sk, err := startSink(b.tmp, delay)
	if err != nil {
		return 0, err
	}
	defer sk.stop()
	px, err := startProxy(b.bin, sk.addr, map[string]string{"SMTPPOOL_MAX_CONNS": strconv.Itoa(k)})
	if err != nil {
		return 0, err
	}
	defer px.stop()

	// Warm-up: K small messages at once open K upstream sessions.
	conns, err := openClients(px.addr, k)
	if err != nil {
		return 0, err
	}
	small := testMessage(500, "warm")
	if err := eachConn(conns, func(c *smtpConn) error { return c.send(small) }); err != nil {
		closeClients(conns)
		return 0, fmt.Errorf("warm-up: %w", err)
	}
	for _, c := range conns {
		c.quit()
	}
	if c := sk.snapshot(); c.sess != 0 {
		return 0, fmt.Errorf("smtppool closed %d upstream sessions during the warm-up", c.sess)
	}

	// Baseline: K clients connected and idle.
	conns, err = openClients(px.addr, k)
	if err != nil {
		return 0, err
	}
	defer closeClients(conns)
	time.Sleep(time.Second)
	idle, err := sampleMedian(px, 5, 100*time.Millisecond)
	if err != nil {
		return 0, err
	}

	// In flight.
	msg := testMessage(size, "inflight")
	before := sk.snapshot().mesg
	var written sync.WaitGroup
	written.Add(k)
	var replies atomic.Int32
	errs := make(chan error, k)
	start := time.Now()
	for _, c := range conns {
		go func() {
			err := c.cmd(250, "MAIL FROM:<sender@bench.example>")
			if err == nil {
				err = c.cmd(250, "RCPT TO:<rcpt@rcpt.example>")
			}
			if err == nil {
				err = c.cmd(354, "DATA")
			}
			if err == nil {
				err = c.writeBody(msg)
			}
			written.Done()
			if err == nil {
				err = c.endReply()
			}
			replies.Add(1)
			errs <- err
		}()
	}
	written.Wait()
	if _, err := sk.waitFor(func(c sinkCounts) bool { return c.mesg >= before+int64(k) }, time.Duration(delay)*time.Second); err != nil {
		return 0, fmt.Errorf("not all %d messages reached the sink before the first reply could: %w", k, err)
	}
	allIn := time.Since(start)
	var peak int64
	samples := 0
	for replies.Load() == 0 && time.Since(start) < time.Duration(delay)*time.Second {
		rss, err := px.kb("VmRSS")
		if err != nil {
			return 0, err
		}
		if replies.Load() != 0 {
			break
		}
		peak = max(peak, rss)
		samples++
		time.Sleep(20 * time.Millisecond)
	}
	for range k {
		if err := <-errs; err != nil {
			return 0, fmt.Errorf("sending: %w", err)
		}
	}
	if samples == 0 {
		return 0, fmt.Errorf("no RSS sample while all %d messages were in flight (they all reached the sink after %v; the sink delays replies by %d s)", k, allIn, delay)
	}
	hwm, _ := px.kb("VmHWM")
	extra := (kib(peak)-kib(idle))*1024/float64(k) - float64(len(msg))
	b.detail("5c. In flight: smtp-sink -W .:%d holds every reply for %d s; smtppool with SMTPPOOL_MAX_CONNS=K=%d, its %d sessions opened by a warm-up; K clients past EHLO: RSS %.1f MiB idle (median of 5 samples). Each then sends a %d-byte message; %v after the start all K had reached the sink, so all were buffered in smtppool; the largest of %d RSS samples before the first reply: %.1f MiB (VmHWM %.1f MiB). Extra per message = (%.1f MiB - %.1f MiB) / %d - %d bytes = %.1f KiB.",
		delay, delay, k, k, kib(idle)/1024, len(msg), allIn.Round(time.Millisecond), samples, kib(peak)/1024, kib(hwm)/1024,
		kib(peak)/1024, kib(idle)/1024, k, len(msg), extra/1024)
	return extra / 1024, nil
}

// eachConn runs f on every connection at once and returns the first error.
func eachConn(conns []*smtpConn, f func(*smtpConn) error) error {
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
func sampleMedian(px *proxyProc, n int, gap time.Duration) (int64, error) {
	var xs []float64
	for i := range n {
		if i > 0 {
			time.Sleep(gap)
		}
		v, err := px.kb("VmRSS")
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
