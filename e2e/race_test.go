//go:build e2e && race

package e2e

// raceEnabled builds the proxy with the race detector when the tests run
// with -race, and makes a reported data race fail the scenario.
const raceEnabled = true
