package proxy

import (
	"bytes"
	"io"
	"sync"
)

// Chunk sizes of a messageBuffer: the first chunk is small, each next one
// twice the last, up to the largest. Memory beyond the message is thus at
// most the last chunk (typically an eighth of the message, at most
// maxChunk), and growing never copies what was already read.
const (
	minChunkShift = 12 // 4 KiB
	maxChunkShift = 15 // 32 KiB
	numChunkSizes = maxChunkShift - minChunkShift + 1
)

// chunkPools recycle chunks by size, so that a steady stream of messages
// allocates almost nothing.
var chunkPools [numChunkSizes]sync.Pool

func getChunk(class int) []byte {
	if c, ok := chunkPools[class].Get().(*[]byte); ok {
		return (*c)[:0]
	}
	return make([]byte, 0, 1<<(minChunkShift+class))
}

func putChunk(class int, c []byte) {
	chunkPools[class].Put(&c)
}

// messageBuffer holds one message, as read from the client, so that it can
// be sent upstream as many times as a transaction is tried. It is a list of
// chunks rather than one growing slice: no copying as it grows, and little
// memory beyond the message itself.
type messageBuffer struct {
	chunks [][]byte
	size   int
}

func chunkClass(i int) int { return min(i, numChunkSizes-1) }

// ReadFrom reads r to its end into the buffer.
func (m *messageBuffer) ReadFrom(r io.Reader) (int64, error) {
	var total int64
	for {
		if n := len(m.chunks); n == 0 || len(m.chunks[n-1]) == cap(m.chunks[n-1]) {
			m.chunks = append(m.chunks, getChunk(chunkClass(n)))
		}
		last := &m.chunks[len(m.chunks)-1]
		n, err := r.Read((*last)[len(*last):cap(*last)])
		*last = (*last)[:len(*last)+n]
		m.size += n
		total += int64(n)
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// Len returns the message's size in bytes.
func (m *messageBuffer) Len() int { return m.size }

// Reader returns a reader of the whole message, which leaves the buffer
// intact for the next try.
func (m *messageBuffer) Reader() io.Reader { return &messageReader{chunks: m.chunks} }

// release returns the chunks for reuse; the buffer is empty after.
func (m *messageBuffer) release() {
	for i, c := range m.chunks {
		putChunk(chunkClass(i), c)
	}
	m.chunks, m.size = m.chunks[:0], 0
}

// isASCII reports whether the message has only 7-bit bytes.
func (m *messageBuffer) isASCII() bool {
	for _, c := range m.chunks {
		if !isASCII(c) {
			return false
		}
	}
	return true
}

// headerIsASCII reports whether the header, up to the first empty line, has
// only 7-bit bytes. It is called only for 8-bit messages, so joining the
// chunks is acceptable.
func (m *messageBuffer) headerIsASCII() bool {
	whole := bytes.Join(m.chunks, nil)
	header, _, _ := bytes.Cut(whole, []byte("\r\n\r\n"))
	return isASCII(header)
}

// messageReader reads a messageBuffer; WriteTo lets io.Copy hand each chunk
// to the writer whole.
type messageReader struct {
	chunks [][]byte
	off    int // within chunks[0]
}

func (r *messageReader) Read(p []byte) (int, error) {
	for len(r.chunks) > 0 && r.off == len(r.chunks[0]) {
		r.chunks, r.off = r.chunks[1:], 0
	}
	if len(r.chunks) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.chunks[0][r.off:])
	r.off += n
	return n, nil
}

func (r *messageReader) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for ; len(r.chunks) > 0; r.chunks, r.off = r.chunks[1:], 0 {
		n, err := w.Write(r.chunks[0][r.off:])
		total += int64(n)
		if err != nil {
			return total, err
		}
	}
	return total, nil
}

// crlfReader normalises line ends: a CR not followed by LF becomes CRLF.
// (go-smtp's client turns bare LF into CRLF as it sends.) Some receivers
// take a bare CR for a line end, so without this a message could smuggle a
// second one past the upstream.
type crlfReader struct {
	r      io.Reader
	buf    [4096]byte
	data   []byte // read from r, not yet returned
	err    error  // r's error, returned once data is drained
	lastCR bool   // the last byte returned was a CR
}

func (c *crlfReader) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		if c.lastCR && (len(c.data) > 0 || c.err != nil) {
			c.lastCR = false
			if len(c.data) == 0 || c.data[0] != '\n' {
				p[n] = '\n'
				n++
				continue
			}
		}
		if len(c.data) == 0 {
			if c.err != nil || n > 0 {
				break
			}
			m, err := c.r.Read(c.buf[:])
			c.data, c.err = c.buf[:m], err
			continue
		}
		end := len(c.data)
		if i := bytes.IndexByte(c.data, '\r'); i >= 0 {
			end = i + 1
		}
		m := copy(p[n:], c.data[:end])
		n += m
		c.lastCR = m == end && c.data[end-1] == '\r'
		c.data = c.data[m:]
	}
	if n == 0 && c.err != nil {
		return 0, c.err
	}
	return n, nil
}
