//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// TestCapacityFromAMemoryCgroup runs the smtppool binary in memory cgroups
// made for the test (cgroup v2, or cgroup v1's memory hierarchy, as this
// machine has), as in a container with a memory limit: it finds the limit
// through /proc/self/cgroup, /proc/self/mountinfo and the cgroup's files,
// sets GOMEMLIMIT to 90 % of it (the runtime's own limit, read from its
// metrics) unless the operator set GOMEMLIMIT, logs the buffer budget and
// the client cap derived from it, and relays a message. With its defaults
// it starts in 128 MiB, with a buffer budget of one 32 MiB message (the
// code before refused to start below 384 MiB).
func TestCapacityFromAMemoryCgroup(t *testing.T) {
	const (
		base = 16 << 20 // what the derivation keeps for smtppool itself
		each = 20 << 10 // per client connection
	)
	sink := startSink(t, false)
	// The k8s example's message settings: 10 MiB messages, 64 MiB of
	// buffers.
	k8s := map[string]string{"SMTPPOOL_MAX_CONNS": "5", "SMTPPOOL_MAX_MESSAGE_BYTES": "10485760", "SMTPPOOL_MAX_BUFFER_BYTES": "67108864"}
	ninety := func(limit int64) int64 {
		f := float64(limit)
		return int64(f * 0.9) // as automemlimit computes it
	}
	const half = "half the usable memory after the base, in whole messages"

	for i, tc := range []struct {
		name     string
		limit    int64
		env      map[string]string
		goLimit  int64 // the GOMEMLIMIT in force
		from     string
		set      bool
		buffer   int64
		bufFrom  string
		capacity int64
	}{
		{"GOMEMLIMIT from the limit", 256 << 20, k8s, ninety(256 << 20), "GOMEMLIMIT, set to 90% of the container's limit", true,
			64 << 20, "SMTPPOOL_MAX_BUFFER_BYTES", (ninety(256<<20) - base - 64<<20) / each},
		{"the operator's GOMEMLIMIT", 256 << 20, merge(k8s, map[string]string{"GOMEMLIMIT": "200MiB"}), 200 << 20, "GOMEMLIMIT", false,
			64 << 20, "SMTPPOOL_MAX_BUFFER_BYTES", (200<<20 - base - 64<<20) / each},
		{"the defaults in 128 MiB", 128 << 20, nil, ninety(128 << 20), "GOMEMLIMIT, set to 90% of the container's limit", true,
			32 << 20, half, (ninety(128<<20) - base - 32<<20) / each},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cg, err := peers.NewMemCgroup(t, fmt.Sprintf("smtppool-e2e-%d-%d", os.Getpid(), i), tc.limit)
			if err != nil {
				t.Fatalf("cannot make a memory cgroup (this test needs root and a writable /sys/fs/cgroup): %v", err)
			}
			wrapped, err := cg.Wrap(proxyBin, publicDir(t, "cgroup"))
			if err != nil {
				t.Fatal(err)
			}
			// GOMEMLIMIT unset unless the case sets it.
			env := merge(map[string]string{"SMTPPOOL_LOG_LEVEL": "info", "SMTPPOOL_LOG_FORMAT": "text", "GOMEMLIMIT": ""}, tc.env)
			p, err := peers.StartProxy(t, wrapped, sink.Addr, env)
			if err != nil {
				t.Fatal(err)
			}
			logOnFailure(t, p.Process)
			if own, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", p.Pid())); err != nil || !strings.Contains(string(own), ":/"+cgName(cg)+"\n") {
				t.Fatalf("smtppool's /proc/PID/cgroup (%v):\n%s\nwant it in %s", err, own, cg.Dir)
			}
			got := capacityFigures(t, p.Log())
			t.Logf("client capacity: %v", got)
			want := map[string]string{
				"max_client_conns":             strconv.FormatInt(tc.capacity, 10),
				"limited_by":                   "memory",
				"buffer_budget_bytes":          strconv.FormatInt(tc.buffer, 10),
				"buffer_budget_from":           tc.bufFrom,
				"container_memory_limit_bytes": strconv.FormatInt(tc.limit, 10),
				"usable_memory_bytes":          strconv.FormatInt(tc.goLimit, 10),
				"usable_memory_from":           tc.from,
				"gomemlimit_set":               strconv.FormatBool(tc.set),
			}
			for k, v := range want {
				if got[k] != v {
					t.Errorf("logged %s=%q, want %q", k, got[k], v)
				}
			}
			metrics := scrapeMetrics(t, adminAddress(t, p))
			if v, ok := metrics.Value("go_gc_gomemlimit_bytes"); !ok || int64(v) != tc.goLimit {
				t.Errorf("the runtime's GOMEMLIMIT (go_gc_gomemlimit_bytes) is %v (found %v), want %d", int64(v), ok, tc.goLimit)
			}
			msg := peers.NewMessages("cgroup", 1)[0]
			if r := peers.SendMail(p.Addr, msg, peers.SendOptions{}); !r.Accepted() {
				t.Errorf("a message through smtppool in the cgroup: %v", r)
			}
			stopProxy(t, p)
		})
	}
}

// merge returns the variables of a and b, b's where both have one.
func merge(a, b map[string]string) map[string]string {
	m := map[string]string{}
	for _, vars := range []map[string]string{a, b} {
		for k, v := range vars {
			m[k] = v
		}
	}
	return m
}

// cgName is the cgroup's path in its hierarchy, as /proc/PID/cgroup names
// it (without the leading slash).
func cgName(cg *peers.MemCgroup) string {
	i := strings.LastIndex(cg.Dir, "/")
	return cg.Dir[i+1:]
}

// capacityFigures reads the figures of the "client capacity" line of a
// text log.
func capacityFigures(t *testing.T, log string) map[string]string {
	t.Helper()
	line := grepLines(log, `msg="client capacity"`)
	if line == "" {
		t.Fatalf("no client capacity line in the log:\n%s", peers.Tail(log, 30))
	}
	figs := map[string]string{}
	for _, m := range regexp.MustCompile(`capacity\.(\w+)=("(?:[^"\\]|\\.)*"|\S+)`).FindAllStringSubmatch(line, -1) {
		v := m[2]
		if u, err := strconv.Unquote(v); err == nil {
			v = u
		}
		figs[m[1]] = v
	}
	return figs
}
