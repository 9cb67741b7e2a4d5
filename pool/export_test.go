package pool

import "time"

// SetPlainTextMemory shortens how long the pool remembers that the
// upstream offered no STARTTLS, and returns the function that restores it.
func SetPlainTextMemory(d time.Duration) (restore func()) {
	old := plainTextMemory
	plainTextMemory = d
	return func() { plainTextMemory = old }
}
