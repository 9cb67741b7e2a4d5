package proxy

import "time"

// WithAuthFailureDelay returns a with the pause before answering a wrong
// password set to d.
func WithAuthFailureDelay(a AccessConfig, d time.Duration) AccessConfig {
	a.failureDelay = d
	return a
}

// SetCheckInterval sets the least time between two looks at the files.
func (r *CertReloader) SetCheckInterval(d time.Duration) {
	r.mu.Lock()
	r.interval = d
	r.mu.Unlock()
}
