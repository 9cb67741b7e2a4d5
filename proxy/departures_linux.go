//go:build linux

package proxy

import (
	"errors"
	"os"
	"sync"
	"syscall"
)

// departures notices clients that leave while the proxy waits on their
// behalf, without a goroutine or a buffer per waiting client: a waiting
// client costs what its connection costs, and no more.
//
// Each watched connection is registered with one epoll instance of the
// Listener for EPOLLRDHUP (the client closed its side), with EPOLLHUP and
// EPOLLERR (a reset) that epoll always reports, and not for data: a client
// that pipelines its next commands wakes nothing, and they wait in the
// kernel for the server's next read. Registrations are one-shot. The epoll
// instance is itself polled by Go's network poller, so no thread blocks on
// it; one goroutine reads its events, for all connections.
//
// When a watched client closes or resets its side, the watch turns into a
// reading watch (readWatch) on a goroutine of its own, which tells a
// client that pipelined its whole session up to QUIT from one that left,
// as before: departures are rare, waiting clients many.
type departures struct {
	mu      sync.Mutex
	file    *os.File      // the epoll instance; nil while no loop runs
	epfd    int           // its descriptor
	done    chan struct{} // closed when the loop has ended
	watches map[int32]*departure
	next    int32
	closed  bool // the Listener is closed: the loop ends with the last watch
}

// departure is one watched connection.
type departure struct {
	c    *clientConn
	gone func()

	// Guarded by departures.mu.
	stopped  bool
	stopRead func() // set once the client closed its side: stops the reading watch
	closed   bool   // the connection was closed under the watch: gone was called
}

// errNoDepartures means that the connection cannot be watched by epoll
// (not a socket, or epoll failed): it is watched by reading instead.
var errNoDepartures = errors.New("no epoll watch")

// watch registers c, and calls gone if the client closes its side of the
// connection or resets it before stop is called (with readWatch's rules).
func (d *departures) watch(c *clientConn, gone func()) (stop func(), err error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, errNoDepartures
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	w := &departure{c: c, gone: gone}
	d.mu.Lock()
	if err := d.startLocked(); err != nil {
		d.mu.Unlock()
		return nil, err
	}
	if d.watches == nil {
		d.watches = map[int32]*departure{}
	}
	d.next++
	for d.next == 0 || d.watches[d.next] != nil { // 0 is no watch
		d.next++
	}
	id, epfd := d.next, d.epfd
	d.watches[id] = w
	c.watchID = id
	d.mu.Unlock()
	// A watch counts as a read in progress: a Close meanwhile comes from
	// outside the server's reading, and ends the connection at once.
	c.reading.Add(1)

	ev := syscall.EpollEvent{Events: syscall.EPOLLRDHUP | syscall.EPOLLONESHOT, Fd: id}
	var ctlErr error
	if err := rc.Control(func(fd uintptr) { ctlErr = syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, int(fd), &ev) }); err != nil || ctlErr != nil {
		d.forget(c, id)
		c.reading.Add(-1)
		return nil, errors.Join(err, ctlErr)
	}
	return func() {
		d.mu.Lock()
		w.stopped = true
		stopRead := w.stopRead
		d.mu.Unlock()
		// The registration goes before the watch is forgotten, so that
		// the epoll instance is still open. A connection closed meanwhile
		// (a shutdown) has lost its registration with its descriptor, and
		// Control fails without touching a descriptor reused since.
		rc.Control(func(fd uintptr) { syscall.EpollCtl(epfd, syscall.EPOLL_CTL_DEL, int(fd), nil) })
		if stopRead != nil {
			stopRead()
		}
		d.forget(c, id)
		c.reading.Add(-1)
	}, nil
}

// forget drops c's watch id, and ends the loop if the Listener is closed
// and it was the last.
func (d *departures) forget(c *clientConn, id int32) {
	d.mu.Lock()
	delete(d.watches, id)
	if c.watchID == id {
		c.watchID = 0
	}
	d.stopIfIdleLocked()
}

// closing tells the watch of c, if any, that the connection is being
// closed under it (a server's Close, a shutdown's CloseConnections): the
// client can no longer be served, so it has gone, as a reading watch
// would find. Closing the descriptor drops its epoll registration without
// an event.
func (d *departures) closing(c *clientConn) {
	d.mu.Lock()
	w := d.watches[c.watchID]
	fire := w != nil && !w.stopped && w.stopRead == nil && !w.closed
	if fire {
		w.closed = true
	}
	d.mu.Unlock()
	if fire {
		w.gone()
	}
}

// close tells the departures that the Listener is closed: the loop ends
// once no connection is watched.
func (d *departures) close() {
	d.mu.Lock()
	d.closed = true
	d.stopIfIdleLocked()
}

// stopIfIdleLocked ends the loop, if one runs, when the Listener is closed
// and nothing is watched, and waits for it. It unlocks mu.
func (d *departures) stopIfIdleLocked() {
	if !d.closed || len(d.watches) > 0 || d.file == nil {
		d.mu.Unlock()
		return
	}
	file, done := d.file, d.done
	d.file = nil
	d.mu.Unlock()
	file.Close() // wakes the loop
	<-done
}

// startLocked starts the epoll instance and its loop, unless they run.
func (d *departures) startLocked() error {
	if d.file != nil {
		return nil
	}
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return err
	}
	if err := syscall.SetNonblock(epfd, true); err != nil {
		syscall.Close(epfd)
		return err
	}
	// Non-blocking, it is polled by Go's network poller.
	file := os.NewFile(uintptr(epfd), "epoll")
	rc, err := file.SyscallConn()
	if err != nil {
		file.Close()
		return err
	}
	d.file, d.epfd, d.done = file, epfd, make(chan struct{})
	go d.loop(rc, d.done)
	return nil
}

// loop reads the epoll instance's events until it is closed.
func (d *departures) loop(rc syscall.RawConn, done chan struct{}) {
	defer close(done)
	events := make([]syscall.EpollEvent, 64)
	var ready []int32
	for {
		ready = ready[:0]
		err := rc.Read(func(fd uintptr) bool {
			for {
				n, err := syscall.EpollWait(int(fd), events, 0)
				switch {
				case err == syscall.EINTR:
					continue
				case err != nil || n <= 0:
					return false // wait until the instance is readable
				}
				for _, ev := range events[:n] {
					ready = append(ready, ev.Fd)
				}
				return true
			}
		})
		if err != nil {
			return // closed
		}
		d.mu.Lock()
		for _, id := range ready {
			if w := d.watches[id]; w != nil && !w.stopped && w.stopRead == nil && !w.closed {
				// The client closed its side or reset the connection:
				// read what is left, to tell a pipelined QUIT from a
				// departure.
				w.stopRead = w.c.readWatch(w.gone)
			}
		}
		d.mu.Unlock()
	}
}
