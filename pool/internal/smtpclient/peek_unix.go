//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package smtpclient

import (
	"errors"
	"net"
	"syscall"
)

// socketPeeker looks into a TCP connection's socket, without blocking and
// without consuming anything: one recv with MSG_PEEK and MSG_DONTWAIT, no
// round trip. Its state lives in the Client, so that a look allocates
// nothing.
type socketPeeker struct {
	rc  syscall.RawConn // nil until the first look; unusable when ok is false
	ok  bool
	fn  func(fd uintptr) bool
	buf [1]byte
	n   int
	err error
}

// state reports what the server has sent on conn that has not been read.
func (p *socketPeeker) state(conn net.Conn) socketState {
	if p.rc == nil && !p.init(conn) {
		return socketUnknown
	}
	if !p.ok {
		return socketUnknown
	}
	// A read deadline in the past would fail the call before the look.
	conn.SetReadDeadline(noDeadline)
	if err := p.rc.Read(p.fn); err != nil {
		return socketUnknown
	}
	switch {
	case errors.Is(p.err, syscall.EAGAIN), errors.Is(p.err, syscall.EWOULDBLOCK), errors.Is(p.err, syscall.EINTR):
		return socketEmpty
	case p.err != nil:
		return socketClosed // reset, or another failure of the connection
	case p.n == 0:
		return socketClosed // the server's FIN
	}
	return socketData
}

func (p *socketPeeker) init(conn net.Conn) bool {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	p.rc, p.ok = rc, true
	p.fn = func(fd uintptr) bool {
		p.n, _, p.err = syscall.Recvfrom(int(fd), p.buf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		return true // never wait
	}
	return true
}
