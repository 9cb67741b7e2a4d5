package main

// A memory cgroup of the benchmark's own, so that smtppool runs as in a
// container with a memory limit: it derives its client cap and GOMEMLIMIT
// from the limit, and the kernel charges the cgroup for what it uses,
// socket memory included.

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// memCgroup is a memory cgroup with a limit, made by the benchmark.
type memCgroup struct {
	dir string
	v2  bool
}

// newMemCgroup makes a cgroup named name with a memory limit of limit
// bytes, at the root of the cgroup v2 hierarchy, or of cgroup v1's memory
// hierarchy. It needs root and a writable /sys/fs/cgroup.
func newMemCgroup(name string, limit int64) (*memCgroup, error) {
	const root = "/sys/fs/cgroup"
	if _, err := os.Stat(filepath.Join(root, "cgroup.controllers")); err == nil {
		ctl, err := os.ReadFile(filepath.Join(root, "cgroup.subtree_control"))
		if err != nil {
			return nil, err
		}
		if !strings.Contains(" "+string(ctl)+" ", " memory ") {
			if err := os.WriteFile(filepath.Join(root, "cgroup.subtree_control"), []byte("+memory"), 0); err != nil {
				return nil, fmt.Errorf("enable the memory controller: %w", err)
			}
		}
		cg := &memCgroup{dir: filepath.Join(root, name), v2: true}
		if err := os.Mkdir(cg.dir, 0o755); err != nil {
			return nil, err
		}
		if err := cg.write("memory.max", strconv.FormatInt(limit, 10)); err != nil {
			cg.remove()
			return nil, err
		}
		cg.write("memory.swap.max", "0") // absent without swap accounting
		return cg, nil
	}
	cg := &memCgroup{dir: filepath.Join(root, "memory", name)}
	if err := os.Mkdir(cg.dir, 0o755); err != nil {
		return nil, fmt.Errorf("no cgroup v2, and cgroup v1's memory hierarchy: %w", err)
	}
	if err := cg.write("memory.limit_in_bytes", strconv.FormatInt(limit, 10)); err != nil {
		cg.remove()
		return nil, err
	}
	return cg, nil
}

func (cg *memCgroup) write(file, value string) error {
	return os.WriteFile(filepath.Join(cg.dir, file), []byte(value), 0)
}

// wrap writes a script to dir that moves itself into the cgroup and then
// runs bin in its place, and returns the script's path: smtppool starts in
// the cgroup, as in a container.
func (cg *memCgroup) wrap(bin, dir string) (string, error) {
	script := filepath.Join(dir, "smtppool-in-cgroup")
	body := fmt.Sprintf("#!/bin/sh\necho $$ > %q || exit 1\nexec %q \"$@\"\n", filepath.Join(cg.dir, "cgroup.procs"), bin)
	return script, os.WriteFile(script, []byte(body), 0o755)
}

// peak is the most memory the cgroup was charged for, in bytes: user
// memory and the kernel's (sockets, among others).
func (cg *memCgroup) peak() (int64, error) {
	file := "memory.max_usage_in_bytes"
	if cg.v2 {
		file = "memory.peak" // Linux 5.19 and later
	}
	b, err := os.ReadFile(filepath.Join(cg.dir, file))
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
}

// oomKills is how many processes the kernel killed in the cgroup for its
// limit.
func (cg *memCgroup) oomKills() (int, error) {
	file := "memory.oom_control"
	if cg.v2 {
		file = "memory.events"
	}
	f, err := os.Open(filepath.Join(cg.dir, file))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), " "); ok && k == "oom_kill" {
			return strconv.Atoi(v)
		}
	}
	return 0, errors.New("no oom_kill count in " + file)
}

// remove deletes the cgroup; its processes must have exited.
func (cg *memCgroup) remove() error { return os.Remove(cg.dir) }
