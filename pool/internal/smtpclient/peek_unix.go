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
	rc  syscall.RawConn // the connection's, from the first look; nil before, or if it has none
	fn  func(fd uintptr)
	buf [1]byte
	n   int
	err error
}

// state reports what the server has sent on conn that has not been read.
func (p *socketPeeker) state(conn net.Conn) socketState {
	if p.rc == nil && !p.init(conn) {
		return socketUnknown
	}
	// Control, not Read: the look never waits, so it needs neither the
	// network poller nor the read deadline (which may have passed).
	if err := p.rc.Control(p.fn); err != nil {
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
	p.rc = rc
	p.fn = func(fd uintptr) {
		p.n, _, p.err = syscall.Recvfrom(int(fd), p.buf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	}
	return true
}
