package main

import (
	"bytes"
	"errors"
	"log/slog"
	"math"
	"os"
	"regexp"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"

	"github.com/KimMachineGun/automemlimit/memlimit"
)

const mib = 1 << 20

// clearGoMemLimit makes the test run as a process started without
// GOMEMLIMIT and AUTOMEMLIMIT, and restores the runtime's memory limit
// and the environment after it.
func clearGoMemLimit(t *testing.T) {
	t.Helper()
	saved := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(saved) })
	debug.SetMemoryLimit(math.MaxInt64)
	for _, k := range []string{"GOMEMLIMIT", "AUTOMEMLIMIT"} {
		t.Setenv(k, "") // restored after the test
		os.Unsetenv(k)
	}
}

// TestSetGoMemLimit: the container's limit comes from the provider, and
// GOMEMLIMIT is set to 90 % of it through automemlimit, unless the
// operator set GOMEMLIMIT (as the runtime parses it at start) or turned
// automemlimit off; the runtime's own limit is checked, not only what is
// reported.
func TestSetGoMemLimit(t *testing.T) {
	logger := slog.New(slog.DiscardHandler)
	const limit = 256 * mib
	t.Run("a container limit", func(t *testing.T) {
		clearGoMemLimit(t)
		m, err := setGoMemLimit(memlimit.Limit(limit), logger)
		f := float64(limit)
		want := int64(f * 0.9) // as automemlimit rounds it
		if inForce := debug.SetMemoryLimit(-1); err != nil || inForce != want || m != (memoryLimits{container: limit, goLimit: want}) {
			t.Errorf("%+v, %v; GOMEMLIMIT in force %d; want the container's 256 MiB and GOMEMLIMIT set to 90%% of it, %d", m, err, inForce, want)
		}
	})
	t.Run("the operator's GOMEMLIMIT", func(t *testing.T) {
		clearGoMemLimit(t)
		t.Setenv("GOMEMLIMIT", "100MiB")
		debug.SetMemoryLimit(100 * mib) // as the runtime does at start
		m, err := setGoMemLimit(memlimit.Limit(limit), logger)
		if inForce := debug.SetMemoryLimit(-1); err != nil || inForce != 100*mib || m != (memoryLimits{container: limit, goLimit: 100 * mib, operator: true}) {
			t.Errorf("%+v, %v; GOMEMLIMIT in force %d; want the operator's 100 MiB left alone", m, err, inForce)
		}
	})
	t.Run("GOMEMLIMIT=off", func(t *testing.T) {
		clearGoMemLimit(t)
		t.Setenv("GOMEMLIMIT", "off")
		m, err := setGoMemLimit(memlimit.Limit(limit), logger)
		if inForce := debug.SetMemoryLimit(-1); err != nil || inForce != math.MaxInt64 || m != (memoryLimits{container: limit, operator: true}) {
			t.Errorf("%+v, %v; GOMEMLIMIT in force %d; want none", m, err, inForce)
		}
	})
	t.Run("AUTOMEMLIMIT", func(t *testing.T) {
		clearGoMemLimit(t)
		t.Setenv("AUTOMEMLIMIT", "0.5")
		m, err := setGoMemLimit(memlimit.Limit(limit), logger)
		if inForce := debug.SetMemoryLimit(-1); err != nil || inForce != limit/2 || m.goLimit != limit/2 || m.operator {
			t.Errorf("AUTOMEMLIMIT=0.5: %+v, %v; GOMEMLIMIT in force %d; want half the limit", m, err, inForce)
		}
		clearGoMemLimit(t)
		t.Setenv("AUTOMEMLIMIT", "off")
		m, err = setGoMemLimit(memlimit.Limit(limit), logger)
		if inForce := debug.SetMemoryLimit(-1); err != nil || inForce != math.MaxInt64 || m != (memoryLimits{container: limit}) {
			t.Errorf("AUTOMEMLIMIT=off: %+v, %v; GOMEMLIMIT in force %d; want none", m, err, inForce)
		}
		clearGoMemLimit(t)
		t.Setenv("AUTOMEMLIMIT", "most")
		if _, err := setGoMemLimit(memlimit.Limit(limit), logger); err == nil || !strings.HasPrefix(err.Error(), "AUTOMEMLIMIT: ") {
			t.Errorf("AUTOMEMLIMIT=most: %v, want an error naming AUTOMEMLIMIT", err)
		}
	})
	t.Run("no limit", func(t *testing.T) {
		for _, err := range []error{memlimit.ErrNoLimit, memlimit.ErrNoCgroup, memlimit.ErrCgroupsNotSupported, errors.New("permission denied")} {
			clearGoMemLimit(t)
			var log bytes.Buffer
			m, setErr := setGoMemLimit(func() (uint64, error) { return 0, err }, slog.New(slog.NewTextHandler(&log, nil)))
			if inForce := debug.SetMemoryLimit(-1); setErr != nil || inForce != math.MaxInt64 || m != (memoryLimits{}) {
				t.Errorf("provider error %v: %+v, %v; GOMEMLIMIT in force %d; want no limit", err, m, setErr, inForce)
			}
			if warned := strings.Contains(log.String(), "cannot read the container's memory limit"); warned != (err.Error() == "permission denied") {
				t.Errorf("provider error %v: warned %v:\n%s", err, warned, log.String())
			}
		}
	})
}

// k8sConfig is the configuration of the k8s/ example as far as memory
// goes: 10 MiB messages, 64 MiB of buffers.
func k8sConfig(t *testing.T, more ...string) config {
	t.Helper()
	cfg, err := loadConfig(append([]string{"SMTPPOOL_UPSTREAM_ADDR=smtp.corp.example:587",
		"SMTPPOOL_MAX_MESSAGE_BYTES=10485760", "SMTPPOOL_MAX_BUFFER_BYTES=67108864"}, more...), false)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestDerivedClientCapFromAFakeLimit: with a container memory limit of
// 256 MiB (a fake provider), GOMEMLIMIT is set to 90 % of it, and the cap
// is what fits in that after the buffer budget and the base: one more
// client would not fit.
func TestDerivedClientCapFromAFakeLimit(t *testing.T) {
	clearGoMemLimit(t)
	mem, err := setGoMemLimit(memlimit.Limit(256*mib), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	cfg := k8sConfig(t)
	c, err := planCapacity(cfg, mem, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	usable := int64(256*mib) * 90 / 100
	if inForce := debug.SetMemoryLimit(-1); !c.setGoLimit || c.usable.bytes != inForce || c.usable.bytes < usable-100 || c.usable.bytes > usable ||
		c.usable.source != "GOMEMLIMIT, set to 90% of the container's limit" {
		t.Errorf("usable %+v, GOMEMLIMIT set %v, in force %d; want it set to 90%% of 256 MiB, %d", c.usable, c.setGoLimit, inForce, usable)
	}
	need := func(clients int) int64 { return baseBytes + 64*mib + int64(clients)*clientConnBytes }
	if !c.derived || c.limitedBy != "memory" || c.clientConns < minDerivedClientConns ||
		need(c.clientConns) > c.usable.bytes || need(c.clientConns+1) <= c.usable.bytes {
		t.Errorf("cap %d (derived %v, limited by %s): %d clients need %d bytes, %d clients %d; the usable memory is %d",
			c.clientConns, c.derived, c.limitedBy, c.clientConns, need(c.clientConns), c.clientConns+1, need(c.clientConns+1), c.usable.bytes)
	}

	// A larger limit holds more clients.
	bigger, err := planCapacity(cfg, memoryLimits{container: 512 * mib, goLimit: 512 * mib * 9 / 10}, 1<<20)
	if err != nil || bigger.clientConns <= c.clientConns {
		t.Errorf("512 MiB: cap %d (%v), want more than 256 MiB's %d", bigger.clientConns, err, c.clientConns)
	}
}

func TestDerivedClientCap(t *testing.T) {
	defaults := k8sConfig(t)
	// 256 MiB, and GOMEMLIMIT set from it.
	container := memoryLimits{container: 256 * mib, goLimit: 256 * mib * 9 / 10}

	t.Run("no memory limit", func(t *testing.T) {
		c, err := planCapacity(defaults, memoryLimits{}, 1<<20)
		if err != nil || c.clientConns != 10_000 || c.setGoLimit || c.limitedBy != "no memory limit" {
			t.Errorf("cap %d limited by %s, GOMEMLIMIT set %v, err %v; want 10000, no GOMEMLIMIT", c.clientConns, c.limitedBy, c.setGoLimit, err)
		}
	})
	t.Run("the open-files limit", func(t *testing.T) {
		c, err := planCapacity(defaults, memoryLimits{}, 4096)
		if want := 4096 - reservedFiles - 5; err != nil || c.clientConns != want || c.limitedBy != "open files" {
			t.Errorf("open-files limit 4096: cap %d limited by %s, err %v; want %d limited by open files", c.clientConns, c.limitedBy, err, want)
		}
	})
	t.Run("the operator's GOMEMLIMIT", func(t *testing.T) {
		c, err := planCapacity(defaults, memoryLimits{container: 256 * mib, goLimit: 128 * mib, operator: true}, 1<<20)
		if err != nil || c.setGoLimit || c.usable.bytes != 128*mib || c.usable.source != "GOMEMLIMIT" {
			t.Fatalf("usable %+v, GOMEMLIMIT set %v, err %v; want the operator's 128 MiB, left alone", c.usable, c.setGoLimit, err)
		}
		if want := int((128*mib - baseBytes - 64*mib) / clientConnBytes); c.clientConns != want {
			t.Errorf("cap %d, want %d", c.clientConns, want)
		}
		off, err := planCapacity(defaults, memoryLimits{container: 256 * mib, operator: true}, 1<<20)
		if err != nil || off.setGoLimit || off.usable.bytes != 256*mib/100*90 {
			t.Errorf("GOMEMLIMIT=off: usable %+v, GOMEMLIMIT set %v, err %v; want the container's share, GOMEMLIMIT left off", off.usable, off.setGoLimit, err)
		}
	})
	t.Run("explicit cap", func(t *testing.T) {
		c, err := planCapacity(k8sConfig(t, "SMTPPOOL_MAX_CLIENT_CONNS=20000"), container, 1<<20)
		if err != nil || c.clientConns != 20000 || c.derived || len(c.warnings) != 1 || !strings.Contains(c.warnings[0], "SMTPPOOL_MAX_CLIENT_CONNS is 20000") {
			t.Errorf("cap %d, derived %v, warnings %q, err %v; want 20000 kept, with a warning that memory holds fewer", c.clientConns, c.derived, c.warnings, err)
		}
		c, err = planCapacity(k8sConfig(t, "SMTPPOOL_MAX_CLIENT_CONNS=3000"), memoryLimits{}, 1024)
		if err != nil || c.clientConns != 3000 || len(c.warnings) != 1 || !strings.Contains(c.warnings[0], "open-files limit") {
			t.Errorf("cap %d, warnings %q, err %v; want 3000 kept, with a warning about the open-files limit", c.clientConns, c.warnings, err)
		}
	})
	t.Run("a buffer budget below the sessions", func(t *testing.T) {
		if c, _ := planCapacity(defaults, memoryLimits{}, 1<<20); len(c.warnings) != 0 {
			t.Errorf("64 MiB for 5 sessions of 10 MiB messages: warnings %q, want none", c.warnings)
		}
		c, err := planCapacity(k8sConfig(t, "SMTPPOOL_MAX_CONNS=10"), memoryLimits{}, 1<<20)
		if err != nil || len(c.warnings) != 1 || !strings.HasPrefix(c.warnings[0], "SMTPPOOL_MAX_BUFFER_BYTES (64 MiB) holds 6 messages") ||
			!strings.Contains(c.warnings[0], "at least SMTPPOOL_MAX_CONNS × SMTPPOOL_MAX_MESSAGE_BYTES (100 MiB)") {
			t.Errorf("64 MiB for 10 sessions of 10 MiB messages: warnings %q, err %v; want one naming SMTPPOOL_MAX_BUFFER_BYTES and 100 MiB", c.warnings, err)
		}
	})
	t.Run("a buffer budget too large for the limit", func(t *testing.T) {
		cfg := defaultsConfig(t, "SMTPPOOL_MAX_BUFFER_BYTES=335544320")
		_, err := planCapacity(cfg, container, 1<<20)
		if err == nil || !strings.HasPrefix(err.Error(), "SMTPPOOL_MAX_BUFFER_BYTES: ") || !strings.Contains(err.Error(), "320 MiB") {
			t.Errorf("320 MiB of buffers in a 256 MiB container: %v, want an error naming SMTPPOOL_MAX_BUFFER_BYTES and the budget", err)
		}
	})
	t.Run("a message too large for the limit", func(t *testing.T) {
		cfg := defaultsConfig(t, "SMTPPOOL_MAX_MESSAGE_BYTES=268435456")
		_, err := planCapacity(cfg, container, 1<<20)
		if err == nil || !strings.HasPrefix(err.Error(), "SMTPPOOL_MAX_MESSAGE_BYTES: ") || !strings.Contains(err.Error(), "256 MiB") {
			t.Errorf("a 256 MiB message in a 256 MiB container: %v, want an error naming SMTPPOOL_MAX_MESSAGE_BYTES", err)
		}
	})
}

// defaultsConfig is the binary's own defaults (5 sessions, 32 MiB
// messages), with more settings.
func defaultsConfig(t *testing.T, more ...string) config {
	t.Helper()
	cfg, err := loadConfig(append([]string{"SMTPPOOL_UPSTREAM_ADDR=smtp.corp.example:587"}, more...), false)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// containerOf is a container limit of n bytes with GOMEMLIMIT set to 90 %
// of it, as automemlimit sets it.
func containerOf(n int64) memoryLimits {
	return memoryLimits{container: n, goLimit: int64(float64(n) * 0.9)}
}

// TestDerivedBufferBudget: with SMTPPOOL_MAX_BUFFER_BYTES unset and a
// memory limit, the defaults start in a small container: the buffer
// budget is half of the usable memory after the base, in whole messages,
// at least one and at most two per session, and the cap is derived after
// it; the budget, the base and the cap's clients fit in the usable memory.
// (The code before took the budget without a limit, 320 MiB at the
// defaults, and refused to start in a container of less than 384 MiB.)
func TestDerivedBufferBudget(t *testing.T) {
	cfg := defaultsConfig(t)
	const half = "half the usable memory after the base, in whole messages"
	fits := func(c capacity) bool {
		return baseBytes+c.bufferBytes+int64(c.clientConns)*clientConnBytes <= c.usable.bytes
	}
	for _, tc := range []struct {
		limit    int64
		messages int64
		from     string
		cap      int
	}{
		{128 * mib, 1, half, 3440},
		{256 * mib, 3, half, 6062},
		{512 * mib, 6, half, 12943},
		{1024 * mib, 10, "2 × SMTPPOOL_MAX_CONNS × SMTPPOOL_MAX_MESSAGE_BYTES", 29982},
	} {
		c, err := planCapacity(cfg, containerOf(tc.limit), 1<<20)
		if err != nil || c.bufferBytes != tc.messages*32*mib || c.bufferMessages != tc.messages || c.bufferFrom != tc.from ||
			c.clientConns != tc.cap || !c.derived || !fits(c) {
			t.Errorf("defaults in %s: %v; budget %d bytes (%d messages) from %q, cap %d, fits %v; want %d messages from %q, cap %d",
				formatBytes(tc.limit), err, c.bufferBytes, c.bufferMessages, c.bufferFrom, c.clientConns, fits(c), tc.messages, tc.from, tc.cap)
		}
		if share := (c.usable.bytes - baseBytes) / 2; tc.from == half && (c.bufferBytes > share && tc.messages > 1 || share-c.bufferBytes >= 32*mib) {
			t.Errorf("defaults in %s: budget %d, not the whole messages of half the usable memory after the base, %d", formatBytes(tc.limit), c.bufferBytes, share)
		}
	}

	// Fewer messages than sessions: a warning that says what to lower.
	c, _ := planCapacity(cfg, containerOf(128*mib), 1<<20)
	if len(c.warnings) != 1 || !strings.HasPrefix(c.warnings[0], "the buffer budget derived from the memory limit, 32 MiB ("+half+"), holds 1 message of") ||
		!strings.Contains(c.warnings[0], "lower SMTPPOOL_MAX_MESSAGE_BYTES to 9437184 (9 MiB)") {
		t.Errorf("defaults in 128 MiB: warnings %q, want one that the budget holds 1 message and 9 MiB messages would fit 5", c.warnings)
	}
	if c, _ := planCapacity(defaultsConfig(t, "SMTPPOOL_MAX_MESSAGE_BYTES=9437184"), containerOf(128*mib), 1<<20); c.bufferMessages != 5 || len(c.warnings) != 0 {
		t.Errorf("9 MiB messages in 128 MiB: the budget holds %d, warnings %q; want 5, none", c.bufferMessages, c.warnings)
	}

	t.Run("no memory limit", func(t *testing.T) {
		c, err := planCapacity(cfg, memoryLimits{}, 1<<20)
		if err != nil || c.bufferBytes != 320*mib || c.bufferFrom != "2 × SMTPPOOL_MAX_CONNS × SMTPPOOL_MAX_MESSAGE_BYTES" {
			t.Errorf("no memory limit: budget %d from %q, %v; want 320 MiB, two messages per session", c.bufferBytes, c.bufferFrom, err)
		}
	})
	t.Run("an explicit cap", func(t *testing.T) {
		c, err := planCapacity(defaultsConfig(t, "SMTPPOOL_MAX_CLIENT_CONNS=2000"), containerOf(256*mib), 1<<20)
		if err != nil || c.bufferMessages != 5 || c.bufferFrom != "the usable memory after the base and SMTPPOOL_MAX_CLIENT_CONNS, in whole messages" ||
			!fits(c) || len(c.warnings) != 0 {
			t.Errorf("2,000 clients in 256 MiB: budget %d messages from %q, fits %v, warnings %q, %v; want the 5 messages they leave room for",
				c.bufferMessages, c.bufferFrom, fits(c), c.warnings, err)
		}
		// A cap that leaves no room: one message, and the warning.
		c, err = planCapacity(defaultsConfig(t, "SMTPPOOL_MAX_CLIENT_CONNS=20000"), containerOf(256*mib), 1<<20)
		if err != nil || c.bufferMessages != 1 || c.clientConns != 20000 || len(c.warnings) != 2 || !strings.HasPrefix(c.warnings[1], "SMTPPOOL_MAX_CLIENT_CONNS is 20000") {
			t.Errorf("20,000 clients in 256 MiB: budget %d messages, cap %d, warnings %q, %v; want one message, the cap kept, a warning", c.bufferMessages, c.clientConns, c.warnings, err)
		}
	})
	t.Run("a container too small for a message", func(t *testing.T) {
		c, err := planCapacity(cfg, containerOf(48*mib), 1<<20)
		if err != nil || c.bufferMessages != 1 || c.bufferFrom != "one message of SMTPPOOL_MAX_MESSAGE_BYTES, the least" ||
			c.clientConns != minDerivedClientConns || len(c.warnings) != 2 ||
			!strings.Contains(c.warnings[1], "lower SMTPPOOL_MAX_MESSAGE_BYTES or raise the memory limit") {
			t.Errorf("defaults in 48 MiB: %v, budget %d messages, cap %d, warnings %q; want it to start, with one message, %d clients and a warning",
				err, c.bufferMessages, c.clientConns, c.warnings, minDerivedClientConns)
		}
	})
}

// TestUsageSaysHowTheCapIsDerived: -h gives the figures the derivation
// uses, so that they cannot drift apart.
func TestUsageSaysHowTheCapIsDerived(t *testing.T) {
	var help string
	for _, v := range envVars() {
		if v.key == "SMTPPOOL_MAX_CLIENT_CONNS" {
			help = v.help
		}
	}
	for _, want := range []string{
		strconv.Itoa(goMemLimitPercent) + "% of the container's memory limit",
		formatBytes(baseBytes), strconv.Itoa(clientConnBytes>>10) + " KiB per client",
		strconv.Itoa(unlimitedClientConns) + " without a memory limit", "memory.max", "GOMEMLIMIT", "open-files limit",
	} {
		if !strings.Contains(help, want) {
			t.Errorf("-h for SMTPPOOL_MAX_CLIENT_CONNS lacks %q:\n%s", want, help)
		}
	}
}

// TestUsageSaysHowTheBufferBudgetIsDerived: -h gives the figures the
// derivation of the buffer budget uses.
func TestUsageSaysHowTheBufferBudgetIsDerived(t *testing.T) {
	var v envVar
	for _, v = range envVars() {
		if v.key == "SMTPPOOL_MAX_BUFFER_BYTES" {
			break
		}
	}
	for _, want := range []string{"half of that limit after " + formatBytes(baseBytes), strconv.Itoa(clientConnBytes>>10) + " KiB each",
		"in whole messages, at least one and at most 2 x SMTPPOOL_MAX_CONNS x SMTPPOOL_MAX_MESSAGE_BYTES", "without a memory limit"} {
		if !strings.Contains(v.help, want) {
			t.Errorf("-h for SMTPPOOL_MAX_BUFFER_BYTES lacks %q:\n%s", want, v.help)
		}
	}
	if v.def != "derived from memory" {
		t.Errorf("-h gives SMTPPOOL_MAX_BUFFER_BYTES the default %q", v.def)
	}
}

// TestRunLogsTheClientCapacity: the start-up log gives the cap in force
// and what set it.
func TestRunLogsTheClientCapacity(t *testing.T) {
	_, log, _ := startRun(t, []string{"demo"}, []string{"SMTPPOOL_MAX_CLIENT_CONNS=1234"})
	m := regexp.MustCompile(`"msg":"client capacity","capacity":\{"max_client_conns":(\d+),"limited_by":"([^"]+)"`).FindStringSubmatch(log.String())
	if m == nil || m[1] != "1234" || m[2] != "SMTPPOOL_MAX_CLIENT_CONNS" {
		t.Errorf("start-up log: %v, want the client capacity line with 1234 set by SMTPPOOL_MAX_CLIENT_CONNS:\n%s", m, log.String())
	}
}
