package main

import (
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// fakeRoot writes files (path relative to the root: content) under a
// fresh folder, the root of a fake file system with /proc and a cgroup
// hierarchy.
func fakeRoot(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for name, content := range files {
		path := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

const (
	mib       = 1 << 20
	v1NoLimit = "9223372036854771712\n" // what cgroup v1 shows for no limit
)

// TestCgroupMemoryLimit reads the container's memory limit from fake
// cgroup file systems laid out as container runtimes and systemd lay them.
func TestCgroupMemoryLimit(t *testing.T) {
	tests := []struct {
		name  string
		files map[string]string
		want  int64
		file  string // where the limit was found, relative to the root
	}{
		{"v2 with a cgroup namespace (Kubernetes, Docker)", map[string]string{
			"proc/self/cgroup":          "0::/\n",
			"sys/fs/cgroup/memory.max":  "268435456\n",
			"sys/fs/cgroup/memory.high": "max\n",
		}, 256 * mib, "sys/fs/cgroup/memory.max"},
		{"v2 without a limit", map[string]string{
			"proc/self/cgroup":         "0::/\n",
			"sys/fs/cgroup/memory.max": "max\n",
		}, 0, ""},
		{"v2 nested, the parent's limit is lower (a systemd slice)", map[string]string{
			"proc/self/cgroup":                                       "0::/system.slice/smtppool.service\n",
			"sys/fs/cgroup/system.slice/memory.max":                  "536870912\n",
			"sys/fs/cgroup/system.slice/smtppool.service/memory.max": "max\n",
		}, 512 * mib, "sys/fs/cgroup/system.slice/memory.max"},
		{"v2 nested, its own limit is lower", map[string]string{
			"proc/self/cgroup":                                       "0::/system.slice/smtppool.service\n",
			"sys/fs/cgroup/system.slice/memory.max":                  "536870912\n",
			"sys/fs/cgroup/system.slice/smtppool.service/memory.max": "134217728\n",
		}, 128 * mib, "sys/fs/cgroup/system.slice/smtppool.service/memory.max"},
		{"v2 path outside the namespace's view", map[string]string{
			"proc/self/cgroup":         "0::/../../kubepods/pod1/ctr\n",
			"sys/fs/cgroup/memory.max": "268435456\n",
		}, 256 * mib, "sys/fs/cgroup/memory.max"},
		{"v1 only (older Docker)", map[string]string{
			"proc/self/cgroup":                           "12:pids:/docker/abc\n4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n",
			"sys/fs/cgroup/memory/memory.limit_in_bytes": "268435456\n",
		}, 256 * mib, "sys/fs/cgroup/memory/memory.limit_in_bytes"},
		{"v1 unlimited", map[string]string{
			"proc/self/cgroup":                           "3:memory:/\n",
			"sys/fs/cgroup/memory/memory.limit_in_bytes": v1NoLimit,
		}, 0, ""},
		{"hybrid: v2 mounted without the memory controller, v1 has it", map[string]string{
			"proc/self/cgroup":                                           "0::/user.slice\n4:memory:/process_api/abc\n1:name=systemd:/\n",
			"sys/fs/cgroup/user.slice/cgroup.procs":                      "",
			"sys/fs/cgroup/memory/memory.limit_in_bytes":                 v1NoLimit,
			"sys/fs/cgroup/memory/process_api/memory.limit_in_bytes":     v1NoLimit,
			"sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes": "1073741824\n",
		}, 1024 * mib, "sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes"},
		{"no cgroup at all (not Linux)", map[string]string{}, 0, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := fakeRoot(t, tt.files)
			got, err := cgroupMemoryLimit(root)
			if err != nil {
				t.Fatal(err)
			}
			wantFile := ""
			if tt.file != "" {
				wantFile = filepath.Join(root, tt.file)
			}
			if got.bytes != tt.want || got.source != wantFile {
				t.Errorf("limit %d from %q, want %d from %q", got.bytes, got.source, tt.want, wantFile)
			}
		})
	}

	root := fakeRoot(t, map[string]string{"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/memory.max": "256M\n"})
	if _, err := cgroupMemoryLimit(root); err == nil || !strings.Contains(err.Error(), "memory.max") {
		t.Errorf("a memory.max that is not a number: error %v, want one naming the file", err)
	}
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

// TestDerivedClientCapFromAFakeCgroup: with a container memory limit of
// 256 MiB (a fake memory.max), the cap is what fits in 90 % of it after the
// buffer budget and the base, GOMEMLIMIT is set to that 90 %, and one more
// client would not fit.
func TestDerivedClientCapFromAFakeCgroup(t *testing.T) {
	root := fakeRoot(t, map[string]string{"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/memory.max": "268435456\n"})
	lim, err := cgroupMemoryLimit(root)
	if err != nil {
		t.Fatal(err)
	}
	cfg := k8sConfig(t)
	c, err := planCapacity(cfg, lim, 0, false, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	usable := int64(256*mib) * 90 / 100
	if !c.setGoLimit || c.usable.bytes < usable-100 || c.usable.bytes > usable {
		t.Errorf("GOMEMLIMIT: set %v to %d, want it set to 90%% of 256 MiB, %d", c.setGoLimit, c.usable.bytes, usable)
	}
	need := func(clients int) int64 { return baseBytes + 64*mib + int64(clients)*clientConnBytes }
	if !c.derived || c.limitedBy != "memory" || c.clientConns < minDerivedClientConns ||
		need(c.clientConns) > c.usable.bytes || need(c.clientConns+1) <= c.usable.bytes {
		t.Errorf("cap %d (derived %v, limited by %s): %d clients need %d bytes, %d clients %d; the usable memory is %d",
			c.clientConns, c.derived, c.limitedBy, c.clientConns, need(c.clientConns), c.clientConns+1, need(c.clientConns+1), c.usable.bytes)
	}

	// A larger limit holds more clients.
	bigger, err := planCapacity(cfg, memoryLimit{bytes: 512 * mib, source: "test"}, 0, false, 1<<20)
	if err != nil || bigger.clientConns <= c.clientConns {
		t.Errorf("512 MiB: cap %d (%v), want more than 256 MiB's %d", bigger.clientConns, err, c.clientConns)
	}
}

func TestDerivedClientCap(t *testing.T) {
	defaults := k8sConfig(t)
	container := memoryLimit{bytes: 256 * mib, source: "memory.max"}

	t.Run("no memory limit", func(t *testing.T) {
		c, err := planCapacity(defaults, memoryLimit{}, 0, false, 1<<20)
		if err != nil || c.clientConns != 10_000 || c.setGoLimit || c.limitedBy != "no memory limit" {
			t.Errorf("cap %d limited by %s, GOMEMLIMIT set %v, err %v; want 10000, no GOMEMLIMIT", c.clientConns, c.limitedBy, c.setGoLimit, err)
		}
	})
	t.Run("the open-files limit", func(t *testing.T) {
		c, err := planCapacity(defaults, memoryLimit{}, 0, false, 4096)
		if want := 4096 - reservedFiles - 5; err != nil || c.clientConns != want || c.limitedBy != "open files" {
			t.Errorf("open-files limit 4096: cap %d limited by %s, err %v; want %d limited by open files", c.clientConns, c.limitedBy, err, want)
		}
	})
	t.Run("the operator's GOMEMLIMIT", func(t *testing.T) {
		c, err := planCapacity(defaults, container, 128*mib, true, 1<<20)
		if err != nil || c.setGoLimit || c.usable.bytes != 128*mib || c.usable.source != "GOMEMLIMIT" {
			t.Fatalf("usable %+v, GOMEMLIMIT set %v, err %v; want the operator's 128 MiB, left alone", c.usable, c.setGoLimit, err)
		}
		if want := int((128*mib - baseBytes - 64*mib) / clientConnBytes); c.clientConns != want {
			t.Errorf("cap %d, want %d", c.clientConns, want)
		}
		off, err := planCapacity(defaults, container, math.MaxInt64, true, 1<<20)
		if err != nil || off.setGoLimit || off.usable.bytes == 0 {
			t.Errorf("GOMEMLIMIT=off: usable %+v, GOMEMLIMIT set %v, err %v; want the container's share, GOMEMLIMIT left off", off.usable, off.setGoLimit, err)
		}
	})
	t.Run("explicit cap", func(t *testing.T) {
		c, err := planCapacity(k8sConfig(t, "SMTPPOOL_MAX_CLIENT_CONNS=20000"), container, 0, false, 1<<20)
		if err != nil || c.clientConns != 20000 || c.derived || len(c.warnings) != 1 || !strings.Contains(c.warnings[0], "SMTPPOOL_MAX_CLIENT_CONNS is 20000") {
			t.Errorf("cap %d, derived %v, warnings %q, err %v; want 20000 kept, with a warning that memory holds fewer", c.clientConns, c.derived, c.warnings, err)
		}
		if !c.setGoLimit {
			t.Errorf("GOMEMLIMIT not set from the container's limit with an explicit cap")
		}
		c, err = planCapacity(k8sConfig(t, "SMTPPOOL_MAX_CLIENT_CONNS=3000"), memoryLimit{}, 0, false, 1024)
		if err != nil || c.clientConns != 3000 || len(c.warnings) != 1 || !strings.Contains(c.warnings[0], "open-files limit") {
			t.Errorf("cap %d, warnings %q, err %v; want 3000 kept, with a warning about the open-files limit", c.clientConns, c.warnings, err)
		}
	})
	t.Run("a buffer budget below the sessions", func(t *testing.T) {
		if c, _ := planCapacity(defaults, memoryLimit{}, 0, false, 1<<20); len(c.warnings) != 0 {
			t.Errorf("64 MiB for 5 sessions of 10 MiB messages: warnings %q, want none", c.warnings)
		}
		c, err := planCapacity(k8sConfig(t, "SMTPPOOL_MAX_CONNS=10"), memoryLimit{}, 0, false, 1<<20)
		if err != nil || len(c.warnings) != 1 || !strings.HasPrefix(c.warnings[0], "SMTPPOOL_MAX_BUFFER_BYTES (64 MiB) holds 6 messages") ||
			!strings.Contains(c.warnings[0], "at least SMTPPOOL_MAX_CONNS × SMTPPOOL_MAX_MESSAGE_BYTES (100 MiB)") {
			t.Errorf("64 MiB for 10 sessions of 10 MiB messages: warnings %q, err %v; want one naming SMTPPOOL_MAX_BUFFER_BYTES and 100 MiB", c.warnings, err)
		}
	})
	t.Run("a limit too small for the buffer budget", func(t *testing.T) {
		// The binary's own defaults buffer 2 × 5 × 32 MiB = 320 MiB.
		cfg, err := loadConfig([]string{"SMTPPOOL_UPSTREAM_ADDR=smtp.corp.example:587"}, false)
		if err != nil {
			t.Fatal(err)
		}
		_, err = planCapacity(cfg, container, 0, false, 1<<20)
		if err == nil || !strings.HasPrefix(err.Error(), "SMTPPOOL_MAX_BUFFER_BYTES: ") || !strings.Contains(err.Error(), "320 MiB") {
			t.Errorf("320 MiB of buffers in a 256 MiB container: %v, want an error naming SMTPPOOL_MAX_BUFFER_BYTES and the budget", err)
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

// TestRunLogsTheClientCapacity: the start-up log gives the cap in force
// and what set it.
func TestRunLogsTheClientCapacity(t *testing.T) {
	_, log, _ := startRun(t, []string{"demo"}, []string{"SMTPPOOL_MAX_CLIENT_CONNS=1234"})
	m := regexp.MustCompile(`"msg":"client capacity","capacity":\{"max_client_conns":(\d+),"limited_by":"([^"]+)"`).FindStringSubmatch(log.String())
	if m == nil || m[1] != "1234" || m[2] != "SMTPPOOL_MAX_CLIENT_CONNS" {
		t.Errorf("start-up log: %v, want the client capacity line with 1234 set by SMTPPOOL_MAX_CLIENT_CONNS:\n%s", m, log.String())
	}
}
