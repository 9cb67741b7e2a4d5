//go:build e2e

package e2e

// Summaries of what the clients of a burst saw, for the tests' logs and
// failure messages.

import (
	"cmp"
	"fmt"
	"maps"
	"net"
	"slices"
	"strings"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// count returns how many results satisfy f.
func count(rs []peers.Result, f func(peers.Result) bool) int {
	n := 0
	for _, r := range rs {
		if f(r) {
			n++
		}
	}
	return n
}

// tally sums results up by where they ended and how, such as
// "end of data 250: 240, greeting 421: 20".
func tally(rs []peers.Result) string {
	counts := map[string]int{}
	for _, r := range rs {
		key := fmt.Sprintf("%s %d", r.Stage, r.Code)
		if r.Err != nil {
			key = r.Stage + " no reply"
			if ne, ok := r.Err.(net.Error); ok && ne.Timeout() {
				key = r.Stage + " timeout"
			}
		}
		counts[key]++
	}
	return formatCounts(counts)
}

// formatCounts lists counts by key, in the keys' order, such as
// "1: 258, 2: 2".
func formatCounts[K cmp.Ordered](counts map[K]int) string {
	keys := slices.Sorted(maps.Keys(counts))
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%v: %d", k, counts[k])
	}
	return strings.Join(parts, ", ")
}

// examples returns up to n results that satisfy f, one per line, for
// failure messages.
func examples(rs []peers.Result, n int, f func(peers.Result) bool) string {
	var lines []string
	for _, r := range rs {
		if f(r) && len(lines) < n {
			lines = append(lines, "  "+r.String())
		}
	}
	return strings.Join(lines, "\n")
}
