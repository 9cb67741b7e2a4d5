package main

// Client capacity: how many client connections smtppool holds at once. A
// client waiting for an upstream session costs memory, not upstream
// capacity, so the default cap is what the memory smtppool may use holds,
// after the message buffer budget and a base, and what the open-files
// limit allows.

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"

	"github.com/caarlos0/env/v11"
)

const (
	// clientConnBytes is what one client connection costs the Go runtime
	// while it waits for an upstream session, with a margin: about 16 KiB
	// live (12 KiB of heap, 8 of them go-smtp's reader and writer, and a
	// 4 KiB stack), 18 to 19 KiB of RSS at the height of a burst of 10,000
	// (the benchmark's measurement 8).
	clientConnBytes = 20 << 10

	// baseBytes is smtppool's memory with no client and no message: the Go
	// runtime, the upstream sessions, the metrics (13 MiB of RSS measured,
	// with 10 upstream sessions).
	baseBytes = 16 << 20

	// goMemLimitPercent is the share of the container's memory limit that
	// smtppool gives the Go runtime as GOMEMLIMIT; the rest is left for
	// the kernel's memory for the sockets, which the container is charged
	// for (about 2 KiB per client connection, measured), and for what the
	// runtime cannot give back at once.
	goMemLimitPercent = 90

	// unlimitedClientConns is the cap when no memory limit is known.
	unlimitedClientConns = 10_000

	// minDerivedClientConns is the least cap a memory limit may leave:
	// below it the limit is too small for the buffer budget, and smtppool
	// refuses to start rather than refuse most clients of a burst.
	minDerivedClientConns = 100

	// reservedFiles are the file descriptors kept for everything but
	// client connections and upstream sessions: the listeners, the admin
	// endpoint's connections, files read at run time.
	reservedFiles = 64
)

// noMemoryLimit is what cgroup v1 reports for an unlimited cgroup (a huge
// number rounded to pages); any limit at or above it is no limit.
const noMemoryLimit = 1 << 62

// memoryLimit is a limit on the memory smtppool may use, and where it came
// from.
type memoryLimit struct {
	bytes  int64  // 0 when there is none
	source string // the file or variable that set it
}

// cgroupMemoryLimit reads the memory limit of the cgroup that this process
// runs in, from the file system under root ("/" but in tests): cgroup v2's
// memory.max, else cgroup v1's memory.limit_in_bytes. The process's cgroup
// comes from root/proc/self/cgroup; the hierarchies are looked for where
// every container runtime and systemd mount them, root/sys/fs/cgroup (v2)
// and root/sys/fs/cgroup/memory (v1). The limit of a nested cgroup is the
// least of its own and its ancestors'. No cgroup file, or no limit in it,
// is no limit (zero), not an error.
func cgroupMemoryLimit(root string) (memoryLimit, error) {
	v2, v1, err := selfCgroups(filepath.Join(root, "proc/self/cgroup"))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return memoryLimit{}, nil // not Linux, or no /proc
		}
		return memoryLimit{}, err
	}
	if v2 != "" {
		lim, found, err := hierarchyLimit(filepath.Join(root, "sys/fs/cgroup"), v2, "memory.max")
		if err != nil || found {
			return lim, err
		}
	}
	if v1 != "" {
		lim, _, err := hierarchyLimit(filepath.Join(root, "sys/fs/cgroup/memory"), v1, "memory.limit_in_bytes")
		return lim, err
	}
	return memoryLimit{}, nil
}

// selfCgroups reads a /proc/PID/cgroup file: the process's cgroup in the
// v2 hierarchy ("0::/path") and in the v1 hierarchy of the memory
// controller ("N:...memory...:/path"); empty when it has none.
func selfCgroups(file string) (v2, v1 string, err error) {
	f, err := os.Open(file)
	if err != nil {
		return "", "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		id, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		controllers, path, ok := strings.Cut(rest, ":")
		if !ok {
			continue
		}
		switch {
		case id == "0" && controllers == "":
			v2 = path
		case containsWord(controllers, "memory"):
			v1 = path
		}
	}
	if err := sc.Err(); err != nil {
		return "", "", fmt.Errorf("read %s: %w", file, err)
	}
	return v2, v1, nil
}

// containsWord reports whether the comma-separated list has word.
func containsWord(list, word string) bool {
	for _, w := range strings.Split(list, ",") {
		if w == word {
			return true
		}
	}
	return false
}

// hierarchyLimit reads the limit file name of the cgroup path in the
// hierarchy mounted at mount, and of each of its ancestors up to the
// mount, and returns the least. A container with a cgroup namespace (or
// v1's usual mount of the container's own cgroup) sees its cgroup at the
// mount itself, though /proc/self/cgroup may name a longer path: when path
// is not under mount, the mount's own file counts. found is false when the
// cgroup has no such file (a v2 hierarchy without the memory controller).
func hierarchyLimit(mount, path, name string) (lim memoryLimit, found bool, err error) {
	dir := filepath.Join(mount, filepath.Clean("/"+path))
	if _, err := os.Stat(dir); err != nil {
		dir = mount
	}
	if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
		return memoryLimit{}, false, nil
	}
	for {
		file := filepath.Join(dir, name)
		n, err := readLimitFile(file)
		switch {
		case errors.Is(err, fs.ErrNotExist): // the root cgroup has none
		case err != nil:
			return memoryLimit{}, true, err
		case n > 0 && (lim.bytes == 0 || n < lim.bytes):
			lim = memoryLimit{bytes: n, source: file}
		}
		if dir == mount || len(dir) <= len(mount) {
			return lim, true, nil
		}
		dir = filepath.Dir(dir)
	}
}

// readLimitFile reads a cgroup memory limit file: a number of bytes, or
// "max" (v2), or a huge number (v1), both no limit (zero).
func readLimitFile(file string) (int64, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return 0, err
	}
	s := strings.TrimSpace(string(b))
	if s == "max" {
		return 0, nil
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %q is not a number of bytes", file, s)
	}
	if n >= noMemoryLimit {
		return 0, nil
	}
	return int64(n), nil
}

// capacity is what planCapacity derives: the client cap, the GOMEMLIMIT to
// set, and the figures behind them, for the start-up log.
type capacity struct {
	clientConns int
	derived     bool   // the cap was derived, not set by SMTPPOOL_MAX_CLIENT_CONNS
	limitedBy   string // what set the cap: "memory", "no memory limit", "open files", "SMTPPOOL_MAX_CLIENT_CONNS"

	container  memoryLimit // the cgroup's limit
	usable     memoryLimit // the memory smtppool may use: the operator's GOMEMLIMIT, or a share of the container's limit
	setGoLimit bool        // smtppool sets usable as GOMEMLIMIT (the operator has not set it)

	bufferBytes int64 // the message buffer budget
	openFiles   int64 // the open-files limit; 0 if unknown
	fileCap     int   // the most client connections the open-files limit allows; 0 if unknown

	warnings []string // for the log: an explicit cap beyond what memory or files allow, a buffer budget below the sessions
}

// systemCapacity is planCapacity for this process: its cgroup's memory
// limit, the GOMEMLIMIT in environ, its open-files limit. A cgroup file
// that cannot be read is logged and taken for no limit.
func systemCapacity(cfg config, environ []string, logger *slog.Logger) (capacity, error) {
	container, err := cgroupMemoryLimit("/")
	if err != nil {
		logger.Warn("cannot read the container's memory limit; the client cap is derived as without one", "err", err)
		container = memoryLimit{}
	}
	goLimit, goLimitSet := int64(0), false
	if v, ok := env.ToMap(environ)["GOMEMLIMIT"]; ok && v != "" {
		// The runtime has parsed it: its limit is the operator's.
		goLimit, goLimitSet = debug.SetMemoryLimit(-1), true
	}
	var files int64
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < math.MaxInt64 {
		files = int64(lim.Cur)
	}
	return planCapacity(cfg, container, goLimit, goLimitSet, files)
}

// planCapacity derives the client cap from the memory smtppool may use:
// with a memory limit (GOMEMLIMIT as the operator set it, else 90 % of the
// container's limit, which smtppool then sets as GOMEMLIMIT), as many
// clients as fit after the message buffer budget and a base; without one,
// unlimitedClientConns. Either way no more than the open-files limit
// allows. An explicit SMTPPOOL_MAX_CLIENT_CONNS (cfg.MaxClientConns above
// zero) stands, with a warning when it is beyond those. goLimitSet says
// whether the operator set GOMEMLIMIT, and goLimit is then the runtime's
// limit (math.MaxInt64 for "off"); openFiles is the soft RLIMIT_NOFILE (0
// if unknown).
func planCapacity(cfg config, container memoryLimit, goLimit int64, goLimitSet bool, openFiles int64) (capacity, error) {
	c := capacity{container: container, bufferBytes: cfg.bufferBudget(), openFiles: openFiles}
	if held := c.bufferBytes / max(cfg.MaxMessageBytes, 1); held < int64(cfg.MaxConns) {
		c.warn("SMTPPOOL_MAX_BUFFER_BYTES (%s) holds %d messages of SMTPPOOL_MAX_MESSAGE_BYTES, fewer than the %d upstream sessions of SMTPPOOL_MAX_CONNS: "+
			"in a burst, a transaction that finds no buffer space gives its session back and queues again behind every waiting client, "+
			"and much of the burst can time out; set it to at least SMTPPOOL_MAX_CONNS × SMTPPOOL_MAX_MESSAGE_BYTES (%s)",
			formatBytes(c.bufferBytes), held, cfg.MaxConns, formatBytes(int64(cfg.MaxConns)*cfg.MaxMessageBytes))
	}
	switch {
	case goLimitSet && goLimit > 0 && goLimit < math.MaxInt64:
		c.usable = memoryLimit{bytes: goLimit, source: "GOMEMLIMIT"}
	case container.bytes > 0:
		c.usable = memoryLimit{bytes: container.bytes / 100 * goMemLimitPercent,
			source: fmt.Sprintf("%d%% of the container's limit", goMemLimitPercent)}
		// GOMEMLIMIT=off is the operator's choice too.
		c.setGoLimit = !goLimitSet
	}
	if openFiles > 0 {
		c.fileCap = int(max(0, openFiles-reservedFiles-int64(cfg.MaxConns)))
	}
	memCap := unlimitedClientConns
	c.limitedBy = "no memory limit"
	if c.usable.bytes > 0 {
		memCap = int(max(0, (c.usable.bytes-baseBytes-c.bufferBytes)/clientConnBytes))
		c.limitedBy = "memory"
	}

	if cfg.MaxClientConns > 0 {
		c.clientConns, c.limitedBy = cfg.MaxClientConns, "SMTPPOOL_MAX_CLIENT_CONNS"
		switch {
		case c.usable.bytes > 0 && cfg.MaxClientConns > memCap:
			c.warn("SMTPPOOL_MAX_CLIENT_CONNS is %d, but the memory limit (%s, %s) holds about %d waiting clients "+
				"after the message buffer budget (%s): a burst that large may exceed it",
				cfg.MaxClientConns, formatBytes(c.usable.bytes), c.usable.source, memCap, formatBytes(c.bufferBytes))
		case c.fileCap > 0 && cfg.MaxClientConns > c.fileCap:
			c.warn("SMTPPOOL_MAX_CLIENT_CONNS is %d, but the open-files limit (%d) allows about %d client connections: "+
				"beyond them, accepting fails (too many open files) and clients wait in the kernel's backlog or are refused by it; raise the hard limit (ulimit -Hn, LimitNOFILE=)", cfg.MaxClientConns, openFiles, c.fileCap)
		}
		return c, nil
	}

	c.derived = true
	if memCap < minDerivedClientConns {
		return c, fmt.Errorf("SMTPPOOL_MAX_BUFFER_BYTES: the message buffer budget, %s (%s), and smtppool's base of %s leave room for only %d "+
			"waiting clients in the memory limit of %s (%s); lower SMTPPOOL_MAX_BUFFER_BYTES or SMTPPOOL_MAX_MESSAGE_BYTES, raise the memory limit, "+
			"or set SMTPPOOL_MAX_CLIENT_CONNS",
			formatBytes(c.bufferBytes), cfg.bufferBudgetSource(), formatBytes(baseBytes), memCap, formatBytes(c.usable.bytes), c.usable.source)
	}
	c.clientConns = memCap
	if c.fileCap > 0 && c.fileCap < memCap {
		c.clientConns, c.limitedBy = max(c.fileCap, 1), "open files"
	}
	return c, nil
}

// warn adds a warning for the start-up log.
func (c *capacity) warn(format string, args ...any) {
	c.warnings = append(c.warnings, fmt.Sprintf(format, args...))
}

// bufferBudget is the memory for messages buffered at once:
// SMTPPOOL_MAX_BUFFER_BYTES, or its default, as the proxy applies it.
func (c config) bufferBudget() int64 {
	if c.MaxBufferBytes > 0 {
		return max(c.MaxBufferBytes, c.MaxMessageBytes)
	}
	return 2 * int64(c.MaxConns) * c.MaxMessageBytes
}

// bufferBudgetSource says where the buffer budget comes from.
func (c config) bufferBudgetSource() string {
	if c.MaxBufferBytes > 0 {
		return "SMTPPOOL_MAX_BUFFER_BYTES"
	}
	return "2 × SMTPPOOL_MAX_CONNS × SMTPPOOL_MAX_MESSAGE_BYTES"
}

// LogValue describes the capacity for the start-up log.
func (c capacity) LogValue() slog.Value {
	attrs := []slog.Attr{
		slog.Int("max_client_conns", c.clientConns),
		slog.String("limited_by", c.limitedBy),
		slog.Int64("buffer_budget_bytes", c.bufferBytes),
	}
	if c.container.bytes > 0 {
		attrs = append(attrs, slog.Int64("container_memory_limit_bytes", c.container.bytes), slog.String("container_memory_limit_file", c.container.source))
	}
	if c.usable.bytes > 0 {
		attrs = append(attrs, slog.Int64("usable_memory_bytes", c.usable.bytes), slog.String("usable_memory_from", c.usable.source),
			slog.Bool("gomemlimit_set", c.setGoLimit))
	}
	if c.derived && c.usable.bytes > 0 {
		attrs = append(attrs, slog.Int64("base_bytes", baseBytes), slog.Int64("bytes_per_client", clientConnBytes))
	}
	if c.openFiles > 0 {
		attrs = append(attrs, slog.Int64("open_files_limit", c.openFiles))
	}
	return slog.GroupValue(attrs...)
}

// formatBytes writes a size in MiB, to a tenth, or in bytes below one.
func formatBytes(n int64) string {
	if n < 1<<20 {
		return fmt.Sprintf("%d bytes", n)
	}
	return strings.TrimSuffix(strconv.FormatFloat(float64(n)/(1<<20), 'f', 1, 64), ".0") + " MiB"
}
