package peers

// A memory cgroup made for a test or the benchmark, so that smtppool runs
// as in a container with a memory limit: it reads the limit, derives its
// client cap, buffer budget and GOMEMLIMIT from it, and the kernel charges
// the cgroup for all it uses, socket memory included.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// MemCgroup is a memory cgroup with a limit.
type MemCgroup struct {
	Dir string // its folder under /sys/fs/cgroup
	V2  bool   // in the cgroup v2 hierarchy; else in cgroup v1's memory hierarchy
}

// NewMemCgroup makes a cgroup named name with a memory limit of limit
// bytes, at the root of the cgroup v2 hierarchy mounted at /sys/fs/cgroup,
// or else of cgroup v1's memory hierarchy at /sys/fs/cgroup/memory. It
// needs root and a writable /sys/fs/cgroup. The owner's cleanup removes it,
// once the processes in it have exited: make it before starting them, so
// that their cleanups run first.
func NewMemCgroup(o Owner, name string, limit int64) (*MemCgroup, error) {
	const root = "/sys/fs/cgroup"
	var cg *MemCgroup
	if _, err := os.Stat(filepath.Join(root, "cgroup.controllers")); err == nil {
		ctl, err := os.ReadFile(filepath.Join(root, "cgroup.subtree_control"))
		if err != nil {
			return nil, err
		}
		if !strings.Contains(" "+strings.TrimSpace(string(ctl))+" ", " memory ") {
			if err := os.WriteFile(filepath.Join(root, "cgroup.subtree_control"), []byte("+memory"), 0); err != nil {
				return nil, fmt.Errorf("enable the memory controller: %w", err)
			}
		}
		cg = &MemCgroup{Dir: filepath.Join(root, name), V2: true}
		if err := os.Mkdir(cg.Dir, 0o755); err != nil {
			return nil, err
		}
	} else {
		cg = &MemCgroup{Dir: filepath.Join(root, "memory", name)}
		if err := os.Mkdir(cg.Dir, 0o755); err != nil {
			return nil, fmt.Errorf("no cgroup v2 at %s, and cgroup v1's memory hierarchy: %w", root, err)
		}
	}
	o.Cleanup(func() {
		if err := cg.remove(); err != nil {
			o.Errorf("remove the cgroup %s: %v", cg.Dir, err)
		}
	})
	file := "memory.limit_in_bytes"
	if cg.V2 {
		file = "memory.max"
	}
	if err := cg.write(file, strconv.FormatInt(limit, 10)); err != nil {
		return nil, err
	}
	if cg.V2 {
		cg.write("memory.swap.max", "0") // absent without swap accounting
	}
	return cg, nil
}

func (cg *MemCgroup) write(file, value string) error {
	return os.WriteFile(filepath.Join(cg.Dir, file), []byte(value), 0)
}

// Wrap writes a script to dir that moves itself into the cgroup and then
// runs bin in its place, and returns the script's path: run in place of
// bin, bin starts in the cgroup, as in a container.
func (cg *MemCgroup) Wrap(bin, dir string) (string, error) {
	script := filepath.Join(dir, "smtppool-in-cgroup")
	body := fmt.Sprintf("#!/bin/sh\necho $$ > %q || exit 1\nexec %q \"$@\"\n", filepath.Join(cg.Dir, "cgroup.procs"), bin)
	return script, os.WriteFile(script, []byte(body), 0o755)
}

// Peak is the most memory the cgroup was charged for, in bytes: user
// memory and the kernel's (sockets, among others).
func (cg *MemCgroup) Peak() (int64, error) {
	file := "memory.max_usage_in_bytes"
	if cg.V2 {
		file = "memory.peak" // Linux 5.19 and later
	}
	b, err := os.ReadFile(filepath.Join(cg.Dir, file))
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
}

// OOMKills is how many processes the kernel killed in the cgroup for its
// limit.
func (cg *MemCgroup) OOMKills() (int, error) {
	file := "memory.oom_control"
	if cg.V2 {
		file = "memory.events"
	}
	f, err := os.Open(filepath.Join(cg.Dir, file))
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

// remove deletes the cgroup, waiting a little for the kernel to let go of
// processes that have just exited.
func (cg *MemCgroup) remove() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var err error
	Poll(ctx, 5*time.Second, "the cgroup to be removable", func() (bool, string) {
		err = os.Remove(cg.Dir)
		return err == nil || errors.Is(err, os.ErrNotExist), fmt.Sprint(err)
	})
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}
