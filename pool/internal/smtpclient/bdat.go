package smtpclient

import (
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
	"time"
)

// Chunking of BDAT: a message up to chunkSize goes as one "BDAT <size>
// LAST" write, a larger one as chunks of about chunkSize. With
// pipelining, at most maxUnanswered chunks are written ahead of their
// replies, which keeps the server's replies from filling the buffers while
// the client is still writing.
const (
	chunkSize     = 64 << 10
	readSize      = 16 << 10
	headerRoom    = 32 // for "BDAT <size> LAST\r\n", written in front of the chunk
	maxUnanswered = 16
)

// chunkBuf is a chunk being assembled: the message is read into in and
// its line ends normalised into out, after room for the command line.
type chunkBuf struct {
	in  []byte
	out []byte
}

var chunkBufs = sync.Pool{New: func() any {
	return &chunkBuf{in: make([]byte, readSize), out: make([]byte, 0, headerRoom+chunkSize+2*readSize+2)}
}}

// BDAT sends msg with BDAT (RFC 3030), without dot-stuffing, its line ends
// made CRLF exactly as Data makes them, and reads the server's verdict,
// any 2xx to the last chunk being acceptance. A message of up to 64 KiB is
// one write and one reply. With pipelined, larger messages go as chunks
// written ahead of their replies; without, each chunk waits for its
// reply. The first refused chunk is the verdict, and no chunk follows it.
// A chunk written when no reply is due (the first, and each without
// pipelining) is preceded by checkInSync's look, as any command is.
// sent reports that the whole message, last chunk included, was written:
// when it is and err is not a reply, the server may have kept the message.
func (c *Client) BDAT(msg io.Reader, pipelined bool) (reply string, sent bool, err error) {
	buf := chunkBufs.Get().(*chunkBuf)
	defer chunkBufs.Put(buf)
	window := 0
	if pipelined {
		window = maxUnanswered
	}
	var ends lineEnds
	var refused error // the first refusal of a chunk
	chunks, answered := 0, 0
	// answer reads the reply to the oldest unanswered chunk.
	answer := func() error {
		last := sent && answered == chunks-1
		var text string
		var err error
		if last {
			_, text, err = c.readFinalReply(c.DataTimeout)
		} else {
			_, text, err = c.readReply(250, c.DataTimeout)
			if err == nil {
				err = c.checkNotAddressReply(text)
			}
		}
		answered++
		switch {
		case err == nil && last:
			reply = text
		case isReply(err) && refused == nil:
			refused = err
		case err != nil && !isReply(err):
			return fmt.Errorf("BDAT: %w", err)
		}
		return nil
	}
	out := buf.out[:headerRoom]
	for !sent && refused == nil {
		n, rerr := msg.Read(buf.in)
		out = ends.append(out, buf.in[:n])
		if rerr != nil && !errors.Is(rerr, io.EOF) {
			return "", false, fmt.Errorf("read message: %w", rerr)
		}
		last := rerr != nil
		if last {
			out = ends.finish(out)
		}
		if !last && len(out)-headerRoom < chunkSize {
			continue
		}
		if answered == chunks {
			// No reply is due: any byte waiting is one no command asked
			// for, which the next chunk's reply would be read as (the
			// first chunk, and each chunk without pipelining).
			if err := c.checkInSync(); err != nil {
				return "", false, err
			}
		}
		if err := c.writeChunk(out, last); err != nil {
			return "", false, err
		}
		out = out[:headerRoom]
		chunks++
		sent = last
		for chunks-answered > window && refused == nil {
			if err := answer(); err != nil {
				// Without pipelining, the last chunk's reply is read
				// here: the server may have kept the message.
				return "", sent, err
			}
		}
	}
	for answered < chunks {
		if err := answer(); err != nil {
			return "", sent, err
		}
	}
	if refused != nil {
		return "", sent, fmt.Errorf("BDAT: %w", refused)
	}
	return reply, true, nil
}

// writeChunk writes a BDAT command and its chunk, which follows headerRoom
// bytes of out, in one write within DataTimeout.
func (c *Client) writeChunk(out []byte, last bool) error {
	line := "BDAT " + strconv.Itoa(len(out)-headerRoom)
	if last {
		line += " LAST"
	}
	line += "\r\n"
	start := headerRoom - len(line)
	copy(out[start:], line)
	if err := c.flush(c.CommandTimeout); err != nil { // nothing is buffered, normally
		return err
	}
	c.conn.SetWriteDeadline(deadline(c.DataTimeout))
	if _, err := c.conn.Write(out[start:]); err != nil {
		return fmt.Errorf("write message: %w", err)
	}
	c.conn.SetWriteDeadline(time.Time{})
	return nil
}

// lineEnds makes bare LF into CRLF, and ends the message with a line end,
// exactly as textproto's DotWriter does (without its dot-stuffing), so
// that a message sent with BDAT arrives as the same bytes as with DATA.
type lineEnds struct{ state int }

const (
	endsBegin     = iota // nothing written yet
	endsData             // inside a line
	endsCR               // just after a CR
	endsBeginLine        // just after a line end
)

func (l *lineEnds) append(out, in []byte) []byte {
	for _, b := range in {
		switch l.state {
		case endsBegin, endsBeginLine, endsData:
			l.state = endsData
			if b == '\r' {
				l.state = endsCR
			}
			if b == '\n' {
				out = append(out, '\r')
				l.state = endsBeginLine
			}
		case endsCR:
			l.state = endsData
			if b == '\n' {
				l.state = endsBeginLine
			}
		}
		out = append(out, b)
	}
	return out
}

// finish adds what DotWriter's Close adds before the final dot.
func (l *lineEnds) finish(out []byte) []byte {
	switch l.state {
	case endsBeginLine:
		return out
	case endsCR:
		return append(out, '\n')
	}
	return append(out, '\r', '\n')
}
