package main

// smtppool's resources, from its /metrics (peers.AdminAddr and
// peers.ScrapeMetrics find and read it).

import (
	"fmt"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// usage is smtppool's resident memory and goroutines at one moment.
type usage struct {
	rss        float64 // bytes
	goroutines float64
}

func usageOf(m peers.Metrics) usage {
	rss, _ := m.Value("process_resident_memory_bytes")
	goroutines, _ := m.Value("go_goroutines")
	return usage{rss: rss, goroutines: goroutines}
}

func (u usage) String() string {
	return fmt.Sprintf("RSS %.1f MiB, %.0f goroutines", u.rss/(1<<20), u.goroutines)
}
