package peers

import (
	"fmt"
	"net"
	"net/textproto"
	"sync/atomic"
	"testing"
	"time"

	"github.com/smtppool/smtppool/internal/memsmtp"
)

// TestSendBurstLimitedKeepsItsLimit sends 40 messages, 5 at a time, to an
// in-memory server that holds each end of DATA for 20 ms: every message is
// accepted, the server never holds more than 5 messages at once, and it
// does hold several, so the limit is what held the clients back. (The
// server's count of open connections would lag: it sees a close a moment
// after the client has moved on.)
func TestSendBurstLimitedKeepsItsLimit(t *testing.T) {
	const messages, limit = 40, 5
	var holding, most atomic.Int64
	srv, err := memsmtp.Start(memsmtp.Options{OnMessage: func(memsmtp.Message) {
		n := holding.Add(1)
		for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
		}
		time.Sleep(20 * time.Millisecond)
		holding.Add(-1)
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	results := SendBurstLimited(srv.Addr, NewMessages("limited", messages), limit, SendOptions{Timeout: 10 * time.Second})
	for _, r := range results {
		if !r.Accepted() {
			t.Errorf("not accepted: %v", r)
		}
		if r.Local == "" {
			t.Errorf("%s: no local address recorded", r.Msg.ID)
		}
	}
	t.Logf("%d messages, limit %d: the server held at most %d at once", messages, limit, most.Load())
	if most.Load() > limit {
		t.Errorf("the server held %d messages at once; want at most %d", most.Load(), limit)
	}
	if most.Load() < 2 {
		t.Errorf("the server held at most %d message at once: the clients did not run concurrently", most.Load())
	}
}

// TestSendBurstCountsClientsAwaitingMail runs a burst against a server that
// greets, answers EHLO and then holds every MAIL until released: while it
// holds them, the counter shows every client awaiting the reply to MAIL;
// once the server has answered (421) and the burst is over, none.
func TestSendBurstCountsClientsAwaitingMail(t *testing.T) {
	const clients = 5
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	release := make(chan struct{})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				tc := textproto.NewConn(c)
				_ = tc.PrintfLine("220 held.test")
				if _, err := tc.ReadLine(); err != nil { // EHLO
					return
				}
				_ = tc.PrintfLine("250 held.test")
				if _, err := tc.ReadLine(); err != nil { // MAIL
					return
				}
				<-release
				_ = tc.PrintfLine("421 4.3.0 released")
			}()
		}
	}()
	var awaiting atomic.Int64
	done := make(chan []Result, 1)
	go func() {
		done <- SendBurst(ln.Addr().String(), NewMessages("awaiting", clients), BurstOptions{AwaitingMail: &awaiting, Timeout: 30 * time.Second})
	}()
	err = Poll(t.Context(), 20*time.Second, "every client to await the reply to MAIL", func() (bool, string) {
		n := awaiting.Load()
		return n == clients, fmt.Sprintf("%d awaiting", n)
	})
	close(release)
	results := <-done
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range results {
		if r.Stage != StageMAIL || r.Code != 421 {
			t.Errorf("%v; want 421 at MAIL", r)
		}
	}
	if n := awaiting.Load(); n != 0 {
		t.Errorf("%d clients still counted as awaiting MAIL after the burst; want 0", n)
	}
}
