//go:build !linux

package proxy

import "errors"

// departures would notice clients that leave while the proxy waits on
// their behalf without a goroutine per client; it needs epoll, so
// elsewhere every watch reads (readWatch).
type departures struct{}

// errNoDepartures means that the connection is watched by reading.
var errNoDepartures = errors.New("no epoll watch")

func (d *departures) watch(*clientConn, func()) (stop func(), err error) { return nil, errNoDepartures }

func (d *departures) close() {}

func (d *departures) closing(*clientConn) {}
