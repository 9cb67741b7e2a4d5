package proxy_test

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
	"github.com/smtppool/smtppool/proxy"
)

// TestBurstWithFewerBuffersThanSessions: a buffer budget that holds fewer
// messages than there are upstream sessions (issue 17: with 10 sessions,
// 10 MiB messages and 64 MiB of buffers, a burst of 2,000 into Postfix
// delivered 711 within a 30 s acquire timeout). The upstream makes a
// client that abandons a transaction wait, as Postfix's smtpd does. Every
// client of a burst gets 250 within the acquire timeout: a transaction
// waits for its share of the budget before it takes an upstream session,
// so no more sessions are lent out at once than the budget holds messages,
// and the upstream sees one MAIL per message and no RSET. The code before
// took a session at MAIL and, finding no buffer space at DATA, gave it
// back (RSET) and queued for a session again behind every client waiting
// at MAIL, each of which did the same.
func TestBurstWithFewerBuffersThanSessions(t *testing.T) {
	const (
		sessions = 10
		maxBytes = 4096
		held     = 6 // messages the budget holds
		clients  = 1000
	)
	// Sessions are not renewed during the burst: a closing session counts
	// as lent out until it is closed.
	e := newEnv(t, options{upstream: memsmtp.Options{AbandonDelay: 100 * time.Millisecond},
		pool:  pool.Config{MaxConns: sessions, MaxMessagesPerConn: 10 * clients},
		proxy: proxy.Config{MaxMessageBytes: maxBytes, MaxBufferBytes: held * maxBytes, AcquireTimeout: 5 * time.Second}})

	var mostLent int32
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for {
			mostLent = max(mostLent, e.pool.Stat().AcquiredConns)
			select {
			case <-stopSampling:
				return
			case <-tick.C:
			}
		}
	}()

	// Every client connects and says EHLO, then all send at once, as the
	// chat server's goroutines do in a burst.
	var wg sync.WaitGroup
	var mu sync.Mutex
	var greeted sync.WaitGroup
	greeted.Add(clients)
	failures := map[string]int{}
	var start time.Time
	allGreeted := make(chan struct{})
	go func() {
		greeted.Wait()
		start = time.Now()
		close(allGreeted)
	}()
	for i := range clients {
		wg.Go(func() {
			err := func() error {
				c, err := smtp.Dial(e.addr)
				if err == nil {
					defer c.Close()
					err = c.Hello("client.test")
				}
				greeted.Done()
				if err != nil {
					return err
				}
				<-allGreeted
				return send(c, "app@example.com", []string{"user@example.com"}, message(fmt.Sprint("few-buffers-", i)))
			}()
			if err != nil {
				mu.Lock()
				failures[strings.SplitN(err.Error(), "\n", 2)[0]]++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(stopSampling)
	<-sampled

	st := e.up.Stats()
	t.Logf("%d clients in %v: %d messages upstream, %d MAIL, %d RSET, %d upstream connections; at most %d sessions lent out at once; failures: %v",
		clients, elapsed.Round(time.Millisecond), st.Messages, st.Commands["MAIL"], st.Commands["RSET"], st.Conns, mostLent, failures)
	if len(failures) > 0 || st.Messages != clients {
		t.Errorf("%d of %d messages delivered; the clients' failures: %v", st.Messages, clients, failures)
	}
	if st.Commands["MAIL"] != clients || st.Commands["RSET"] != 0 {
		t.Errorf("the upstream saw %d MAIL and %d RSET for %d messages: transactions were begun upstream and given up for want of a buffer",
			st.Commands["MAIL"], st.Commands["RSET"], clients)
	}
	if mostLent > held {
		t.Errorf("%d sessions lent out at once, but the budget holds %d messages: transactions held sessions without a buffer", mostLent, held)
	}
	if peak := proxy.ReservedPeak(e.srv); peak > held*maxBytes {
		t.Errorf("buffers held %d bytes at most, above the budget of %d", peak, held*maxBytes)
	}
}
