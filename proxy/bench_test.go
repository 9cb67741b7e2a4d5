package proxy_test

import (
	"strings"
	"testing"

	"github.com/emersion/go-smtp"
)

// BenchmarkRelay measures one whole transaction relayed to the in-process
// upstream over a warm session, client connection kept open.
func BenchmarkRelay(b *testing.B) {
	e := newEnv(b, options{})
	c, err := smtp.Dial(e.addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	msg := message("bench") + strings.Repeat("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\r\n", 15)
	b.SetBytes(int64(len(msg)))
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if err := send(c, "app@example.com", []string{"user@example.com"}, msg); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRelayNewConnection is BenchmarkRelay with a new client
// connection per message, as a chat server sends.
func BenchmarkRelayNewConnection(b *testing.B) {
	e := newEnv(b, options{})
	msg := message("bench") + strings.Repeat("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\r\n", 15)
	b.SetBytes(int64(len(msg)))
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		c, err := smtp.Dial(e.addr)
		if err != nil {
			b.Fatal(err)
		}
		if err := send(c, "app@example.com", []string{"user@example.com"}, msg); err != nil {
			b.Fatal(err)
		}
		c.Quit()
	}
}
