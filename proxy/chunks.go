package proxy

import (
	"reflect"

	"github.com/emersion/go-smtp"
)

// A BDAT message is relayed only if every chunk delivered the bytes its
// command declared. go-smtp copies a chunk into the message's pipe with
// io.Copy over an io.LimitReader, which takes an early end of the client's
// stream for the end of the chunk: a plain TCP FIN, and, over STARTTLS,
// TLS's close_notify, which crypto/tls reads as io.EOF. Its pipe then ends
// cleanly, and the message looks complete.
//
// go-smtp counts the declared sizes (its Conn's bytesReceived, the sum of
// the sizes of the message's chunks, which it adds after copying each
// chunk and before closing the pipe after the last) but does not export the
// count, so declaredBytes reads it by reflection; the session counts the
// bytes that came through the pipe. A truncated chunk that is not the last
// needs nothing of this: go-smtp then reads the end of the stream as its
// next command and ends the message with an error.

// chunkCounter finds go-smtp's count of declared BDAT bytes in its Conn.
type chunkCounter struct {
	field []int // index of the int64 bytesReceived in smtp.Conn; nil if go-smtp changed
}

// newChunkCounter looks for the field once. If this version of go-smtp has
// no such field, BDAT gets 502 and clients use DATA: smtppool cannot tell a
// whole message from a cut one without it.
func newChunkCounter() chunkCounter {
	f, ok := reflect.TypeFor[smtp.Conn]().FieldByName("bytesReceived")
	if !ok || f.Type.Kind() != reflect.Int64 {
		return chunkCounter{}
	}
	return chunkCounter{field: f.Index}
}

// available reports whether declaredBytes can read c's count.
func (cc chunkCounter) available(c *smtp.Conn) bool { return cc.field != nil && c != nil }

// declaredBytes returns the sizes declared by the BDAT commands of the
// message being received on c, summed. It may be called only while go-smtp
// waits for Data's verdict, after the pipe ended cleanly (go-smtp wrote the
// count before it closed the pipe, and changes it again only after Data
// returns).
func (cc chunkCounter) declaredBytes(c *smtp.Conn) (int64, bool) {
	if !cc.available(c) {
		return 0, false
	}
	return reflect.ValueOf(c).Elem().FieldByIndex(cc.field).Int(), true
}
