//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package smtpclient

import "net"

// socketPeeker cannot look into a socket on this system: only bytes
// already read into the client's buffer are seen.
type socketPeeker struct{}

func (*socketPeeker) state(net.Conn) socketState { return socketUnknown }
