package pool

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"sync/atomic"
	"time"
)

// upstream is one entry of Config.Addr, with its own prober and its own
// knowledge of STARTTLS.
type upstream struct {
	addr  string
	tls   *tls.Config // Config.TLSConfig, with this entry's server name
	probe prober

	// plainUntil, in opportunistic mode, is until when (Unix nanoseconds)
	// the warning that this entry offers no STARTTLS is not repeated.
	plainUntil atomic.Int64
}

// fullProbeBackoffMax caps the pause between probes of the last (or only)
// entry while it refuses sessions over its connection limit.
const fullProbeBackoffMax = time.Second

// newUpstreams makes the entries of cfg.Addr. Each but the last is skipped
// for FailoverCooldown after a failure, since the next one can serve; the
// last is probed again after the usual backoff. recovered is called when
// a probe of an entry that was full succeeds, reachable when one of an
// entry that could not be reached does.
func newUpstreams(cfg Config, recovered, reachable func()) ([]*upstream, error) {
	addrs, err := cfg.addrs()
	if err != nil {
		return nil, err
	}
	ups := make([]*upstream, len(addrs))
	for i, addr := range addrs {
		u := &upstream{addr: addr, tls: cfg.TLSConfig}
		if u.tls.ServerName == "" {
			host, _, _ := net.SplitHostPort(addr)
			u.tls = cfg.TLSConfig.Clone()
			u.tls.ServerName = host
		}
		u.probe = prober{base: cfg.ProbeBackoff, max: cfg.ProbeBackoffMax, fullMax: fullProbeBackoffMax,
			log: cfg.Logger.With("upstream", addr), recovered: recovered, reachable: reachable}
		if i < len(addrs)-1 {
			u.probe.base, u.probe.max, u.probe.fullMax = cfg.FailoverCooldown, cfg.FailoverCooldown, cfg.FailoverCooldown
		}
		ups[i] = u
	}
	return ups, nil
}

// connect sets up a session on the first entry of Addr that will take one:
// an entry whose last attempt failed, or was refused over its connection
// limit, is skipped until its next probe is due, if another entry follows
// it. While the only (or last) entry is down, the prober lets one attempt
// at a time through; while it is full, one attempt at a time, and the
// others return a *probeWait, for their acquirers to wait for (see
// prober.dial).
func (p *Pool) connect(ctx context.Context) (*session, error) {
	if err := ctx.Err(); err != nil {
		return nil, err // TryAcquire's background dial: nothing to do, nothing to count
	}
	var err error
	for i, u := range p.upstreams {
		last := i == len(p.upstreams)-1
		var s *session
		s, err = u.probe.dial(ctx, func(ctx context.Context) (*session, error) { return p.setUp(ctx, u) }, !last)
		if err == nil {
			return s, nil
		}
		if ctx.Err() != nil {
			return nil, err
		}
		if !last && !errors.Is(err, ErrUpstreamDown) && !errors.Is(err, errBackingOff) {
			p.log.Warn("upstream entry failed; failing over to the next", "upstream", u.addr, "next", p.upstreams[i+1].addr, "err", err)
		}
	}
	return nil, err
}

// upstreamUp reports whether any entry's last set-up or health check
// succeeded.
func (p *Pool) upstreamUp() bool {
	for _, u := range p.upstreams {
		if u.probe.up.Load() {
			return true
		}
	}
	return false
}
