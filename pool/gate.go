package pool

import (
	"container/list"
	"context"
	"sync"
)

// capGate bounds the sessions lent out at once by an effective cap that can
// move between 1 and MaxConns while waiters queue, first come first served.
// puddle's size is fixed when the pool is made; the gate in front of it is
// what lets the cap learn the upstream's limit.
type capGate struct {
	mu      sync.Mutex
	limit   int32
	inUse   int32
	waiters list.List // of chan struct{}, closed when granted
}

func newCapGate(limit int32) *capGate { return &capGate{limit: limit} }

// acquire waits for a place under the cap, or for ctx to end. With first,
// it goes ahead of those waiting: a caller that held a place and had to
// give it back.
func (g *capGate) acquire(ctx context.Context, first bool) error {
	g.mu.Lock()
	if g.inUse < g.limit && (first || g.waiters.Len() == 0) {
		g.inUse++
		g.mu.Unlock()
		return nil
	}
	ready := make(chan struct{})
	var elem *list.Element
	if first {
		elem = g.waiters.PushFront(ready)
	} else {
		elem = g.waiters.PushBack(ready)
	}
	g.mu.Unlock()
	select {
	case <-ready:
		return nil
	case <-ctx.Done():
		g.mu.Lock()
		select {
		case <-ready: // granted meanwhile: give it back
			g.mu.Unlock()
			g.release()
		default:
			g.waiters.Remove(elem)
			g.mu.Unlock()
		}
		return ctx.Err()
	}
}

// tryAcquire takes a place under the cap if one is free and nobody waits,
// and reports whether it did.
func (g *capGate) tryAcquire() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.inUse < g.limit && g.waiters.Len() == 0 {
		g.inUse++
		return true
	}
	return false
}

// release gives back a place.
func (g *capGate) release() {
	g.mu.Lock()
	g.inUse--
	g.grantLocked()
	g.mu.Unlock()
}

// setLimit moves the cap; places already given stay given.
func (g *capGate) setLimit(n int32) {
	g.mu.Lock()
	g.limit = n
	g.grantLocked()
	g.mu.Unlock()
}

// queued returns the number of callers waiting for a place.
func (g *capGate) queued() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.waiters.Len()
}

// current returns the cap.
func (g *capGate) current() int32 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.limit
}

func (g *capGate) grantLocked() {
	for g.inUse < g.limit && g.waiters.Len() > 0 {
		ready := g.waiters.Remove(g.waiters.Front()).(chan struct{})
		g.inUse++
		close(ready)
	}
}
