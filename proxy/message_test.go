package proxy

import (
	"bytes"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

func TestMessageBufferKeepsTheMessageWithLittleSlack(t *testing.T) {
	for _, size := range []int{0, 1, 4095, 4096, 4097, 12288, 100_000, 1 << 20, 5<<20 + 3} {
		want := bytes.Repeat([]byte("0123456789abcdef\r\n"), size/18+1)[:size]
		var m messageBuffer
		// OneByteReader and HalfReader make reads end anywhere in a chunk.
		if _, err := m.ReadFrom(iotest.HalfReader(bytes.NewReader(want))); err != nil {
			t.Fatal(err)
		}
		if m.Len() != size {
			t.Fatalf("size %d: Len = %d", size, m.Len())
		}
		for try := range 2 { // a message is sent again on a retry
			var got bytes.Buffer
			if _, err := io.Copy(&got, m.Reader()); err != nil || !bytes.Equal(got.Bytes(), want) {
				t.Fatalf("size %d, try %d: copy = %d bytes, %v; want the message", size, try, got.Len(), err)
			}
		}
		if err := iotest.TestReader(m.Reader(), want); err != nil {
			t.Fatalf("size %d: %v", size, err)
		}
		var capacity int
		for _, c := range m.chunks {
			capacity += cap(c)
		}
		if slack := capacity - size; slack > 1<<maxChunkShift || (size < 4096 && capacity > 4096) {
			t.Errorf("size %d: %d bytes of chunks, %d beyond the message", size, capacity, slack)
		}
		m.release()
	}
}

func TestMessageBufferCharacterChecks(t *testing.T) {
	tests := []struct {
		msg                string
		ascii, headerASCII bool
	}{
		{"Subject: hi\r\n\r\nhello\r\n", true, true},
		{"Subject: hi\r\n\r\nGrüße\r\n", false, true},
		{"Subject: Grüße\r\n\r\nhello\r\n", false, false},
		{strings.Repeat("X-Long: "+strings.Repeat("a", 900)+"\r\n", 40) + "Subject: Grüße\r\n\r\nhi\r\n", false, false},
		{strings.Repeat("X-Long: "+strings.Repeat("a", 900)+"\r\n", 40) + "\r\nGrüße\r\n", false, true},
	}
	for _, tt := range tests {
		var m messageBuffer
		m.ReadFrom(strings.NewReader(tt.msg))
		if m.isASCII() != tt.ascii || (!tt.ascii && m.headerIsASCII() != tt.headerASCII) {
			t.Errorf("%.40q…: isASCII %v, headerIsASCII %v; want %v, %v", tt.msg, m.isASCII(), m.headerIsASCII(), tt.ascii, tt.headerASCII)
		}
		m.release()
	}
}
