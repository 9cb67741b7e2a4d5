package main

// Client capacity: how many client connections smtppool holds at once. A
// client waiting for an upstream session costs memory, not upstream
// capacity, so the default cap is what the memory smtppool may use holds,
// after the message buffer budget and a base, and what the open-files
// limit allows. The container's memory limit is read, and GOMEMLIMIT set
// from it, by automemlimit; the derivation itself (planCapacity) works on
// plain numbers.

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"

	"github.com/KimMachineGun/automemlimit/memlimit"

	"github.com/smtppool/smtppool/proxy"
)

const (
	// clientConnBytes is what one client connection costs the Go runtime
	// while it waits for an upstream session, with a margin: about 16 KiB
	// live (12 KiB of heap, 8 of them go-smtp's reader and writer, and a
	// 4 KiB stack), 18.0 KiB of RSS at the height of a burst of 10,000
	// (the benchmark's measurement 8; 16.7 KiB in a 320 MiB cgroup).
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

// memoryLimits are what the memory smtppool may use is derived from.
type memoryLimits struct {
	container int64 // the container's memory limit (its cgroup's), 0 if none
	goLimit   int64 // the GOMEMLIMIT in force, 0 if none (unset, or off)
	operator  bool  // the operator set GOMEMLIMIT; otherwise goLimit, if any, is smtppool's
}

// setGoMemLimit reads the container's memory limit from provider
// (memlimit.FromCgroup: cgroup v2's memory.max, or cgroup v1's limit, of
// this process's cgroup and its parents, found through
// /proc/self/mountinfo) and, unless the operator set GOMEMLIMIT (or
// AUTOMEMLIMIT=off), sets GOMEMLIMIT to goMemLimitPercent of it with
// automemlimit's memlimit.Set, which leaves an operator's GOMEMLIMIT
// alone. A limit that cannot be read is logged and taken for none. The
// only error is a bad AUTOMEMLIMIT.
func setGoMemLimit(provider memlimit.Provider, logger *slog.Logger) (memoryLimits, error) {
	var m memoryLimits
	n, err := provider()
	switch {
	case err == nil:
		if n < math.MaxInt64 {
			m.container = int64(n)
		}
	case errors.Is(err, memlimit.ErrNoLimit), errors.Is(err, memlimit.ErrNoCgroup), errors.Is(err, memlimit.ErrCgroupsNotSupported):
	default:
		logger.Warn("cannot read the container's memory limit; the client capacity is derived as without one", "err", err)
	}
	m.operator = os.Getenv("GOMEMLIMIT") != ""
	set := m.container > 0 && !m.operator && os.Getenv("AUTOMEMLIMIT") != "off"
	if set {
		_, err := memlimit.Set(memlimit.WithProvider(memlimit.Limit(uint64(m.container))),
			memlimit.WithRatio(goMemLimitPercent/100.0), memlimit.WithLogger(logger))
		if err != nil {
			return m, fmt.Errorf("AUTOMEMLIMIT: %w", err)
		}
	}
	// The runtime parsed the operator's GOMEMLIMIT as it started.
	if inForce := debug.SetMemoryLimit(-1); (set || m.operator) && inForce < math.MaxInt64 {
		m.goLimit = inForce
	}
	return m, nil
}

// memoryLimit is an amount of memory, and where it came from.
type memoryLimit struct {
	bytes  int64  // 0 when there is none
	source string // how it was set
}

// capacity is what planCapacity derives: the client cap, the GOMEMLIMIT to
// set, and the figures behind them, for the start-up log.
type capacity struct {
	clientConns int
	derived     bool   // the cap was derived, not set by SMTPPOOL_MAX_CLIENT_CONNS
	limitedBy   string // what set the cap: "memory", "no memory limit", "open files", "SMTPPOOL_MAX_CLIENT_CONNS"

	container  int64       // the container's memory limit, 0 if none
	usable     memoryLimit // the memory smtppool may use: the GOMEMLIMIT in force, or a share of the container's limit
	setGoLimit bool        // smtppool set usable as GOMEMLIMIT (the operator had not set it)

	bufferBytes    int64  // the message buffer budget
	bufferFrom     string // how it was set
	bufferMessages int64  // how many messages of SMTPPOOL_MAX_MESSAGE_BYTES it holds
	openFiles      int64  // the open-files limit; 0 if unknown
	fileCap        int    // the most client connections the open-files limit allows; 0 if unknown

	warnings []string // for the log: an explicit cap beyond what memory or files allow, a buffer budget below the sessions
}

// systemCapacity is planCapacity for this process: it reads its
// container's memory limit and sets GOMEMLIMIT from it (see
// setGoMemLimit), and reads its open-files limit.
func systemCapacity(cfg config, logger *slog.Logger) (capacity, error) {
	mem, err := setGoMemLimit(memlimit.FromCgroup, logger)
	if err != nil {
		return capacity{}, err
	}
	var files int64
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < math.MaxInt64 {
		files = int64(lim.Cur)
	}
	return planCapacity(cfg, mem, files)
}

// planCapacity derives the message buffer budget and the client cap from
// the memory smtppool may use: the GOMEMLIMIT in force, or, if it is off,
// 90 % of the container's limit.
//
// The buffer budget is SMTPPOOL_MAX_BUFFER_BYTES if set. Unset, with a
// memory limit, it is what is left after the base (half of it, or, with an
// explicit SMTPPOOL_MAX_CLIENT_CONNS, what those clients leave), in whole
// messages of SMTPPOOL_MAX_MESSAGE_BYTES, at least one and at most the
// proxy's default (proxy.DefaultMaxBufferBytes); without a memory limit,
// that default.
//
// The cap is as many clients as fit after the budget and the base, or
// unlimitedClientConns without a memory limit; either way no more than the
// open-files limit allows. An explicit SMTPPOOL_MAX_CLIENT_CONNS
// (cfg.MaxClientConns above zero) stands, with a warning when it is beyond
// those. A memory limit too small for the budget and
// minDerivedClientConns clients is an error naming the variable that was
// set (SMTPPOOL_MAX_BUFFER_BYTES, or SMTPPOOL_MAX_MESSAGE_BYTES), or, at
// the defaults, a warning. openFiles is the soft RLIMIT_NOFILE (0 if
// unknown).
func planCapacity(cfg config, mem memoryLimits, openFiles int64) (capacity, error) {
	c := capacity{container: mem.container, openFiles: openFiles}
	switch {
	case mem.goLimit > 0 && mem.operator:
		c.usable = memoryLimit{bytes: mem.goLimit, source: "GOMEMLIMIT"}
	case mem.goLimit > 0:
		c.usable = memoryLimit{bytes: mem.goLimit, source: "GOMEMLIMIT, set to " + sharePercent(mem.goLimit, mem.container)}
		c.setGoLimit = true
	case mem.container > 0:
		// GOMEMLIMIT is off: the operator's choice.
		c.usable = memoryLimit{bytes: mem.container / 100 * goMemLimitPercent,
			source: fmt.Sprintf("%d%% of the container's limit", goMemLimitPercent)}
	}
	share := c.planBuffers(cfg)
	c.bufferMessages = c.bufferBytes / cfg.MaxMessageBytes
	if c.bufferMessages < int64(cfg.MaxConns) {
		c.warnFewBuffers(cfg, share)
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
		tooSmall := fmt.Sprintf("the message buffer budget, %s (%s), and smtppool's base of %s leave room for only %d "+
			"waiting clients in the memory limit of %s (%s)",
			formatBytes(c.bufferBytes), c.bufferFrom, formatBytes(baseBytes), memCap, formatBytes(c.usable.bytes), c.usable.source)
		switch {
		case cfg.MaxBufferBytes > 0:
			return c, fmt.Errorf("SMTPPOOL_MAX_BUFFER_BYTES: %s; lower SMTPPOOL_MAX_BUFFER_BYTES or SMTPPOOL_MAX_MESSAGE_BYTES, raise the memory limit, "+
				"or set SMTPPOOL_MAX_CLIENT_CONNS", tooSmall)
		case cfg.MaxMessageBytes != proxy.DefaultConfig().MaxMessageBytes:
			return c, fmt.Errorf("SMTPPOOL_MAX_MESSAGE_BYTES: %s; lower SMTPPOOL_MAX_MESSAGE_BYTES or raise the memory limit", tooSmall)
		}
		c.warn("%s; the cap is %d all the same, which the memory limit may not hold: lower SMTPPOOL_MAX_MESSAGE_BYTES or raise the memory limit",
			tooSmall, minDerivedClientConns)
		memCap = minDerivedClientConns
	}
	c.clientConns = memCap
	if c.fileCap > 0 && c.fileCap < memCap {
		c.clientConns, c.limitedBy = max(c.fileCap, 1), "open files"
	}
	return c, nil
}

// planBuffers sets the message buffer budget and where it comes from (see
// planCapacity), once the usable memory is known. When it derives the
// budget from the memory, it returns the share of the memory it had for it,
// before rounding to whole messages.
func (c *capacity) planBuffers(cfg config) (share int64) {
	msg := cfg.MaxMessageBytes
	if cfg.MaxBufferBytes > 0 {
		c.bufferBytes, c.bufferFrom = max(cfg.MaxBufferBytes, msg), "SMTPPOOL_MAX_BUFFER_BYTES"
		return 0
	}
	def := proxy.DefaultMaxBufferBytes(cfg.MaxMessageBytes, cfg.MaxConns)
	if c.usable.bytes == 0 {
		c.bufferBytes, c.bufferFrom = def, "2 × SMTPPOOL_MAX_CONNS × SMTPPOOL_MAX_MESSAGE_BYTES"
		return 0
	}
	room := (c.usable.bytes - baseBytes) / 2
	c.bufferFrom = "half the usable memory after the base, in whole messages"
	if cfg.MaxClientConns > 0 {
		room = c.usable.bytes - baseBytes - int64(cfg.MaxClientConns)*clientConnBytes
		c.bufferFrom = "the usable memory after the base and SMTPPOOL_MAX_CLIENT_CONNS, in whole messages"
	}
	c.bufferBytes = room / msg * msg
	if c.bufferBytes < msg {
		c.bufferBytes, c.bufferFrom = msg, "one message of SMTPPOOL_MAX_MESSAGE_BYTES, the least"
	}
	if c.bufferBytes >= def {
		c.bufferBytes, c.bufferFrom = def, "2 × SMTPPOOL_MAX_CONNS × SMTPPOOL_MAX_MESSAGE_BYTES"
	}
	return room
}

// warnFewBuffers warns that the buffer budget holds fewer messages than
// there are upstream sessions, and says what would hold one for each;
// share is the memory that a derived budget had (see planBuffers).
func (c *capacity) warnFewBuffers(cfg config, share int64) {
	messages, transactions := "messages", "transactions use"
	if c.bufferMessages == 1 {
		messages, transactions = "message", "transaction uses"
	}
	few := fmt.Sprintf("holds %d %s of SMTPPOOL_MAX_MESSAGE_BYTES (%s), fewer than the %d upstream sessions of SMTPPOOL_MAX_CONNS: "+
		"no more than %d %s upstream sessions at once", c.bufferMessages, messages, formatBytes(cfg.MaxMessageBytes), cfg.MaxConns, c.bufferMessages, transactions)
	if cfg.MaxBufferBytes > 0 {
		c.warn("SMTPPOOL_MAX_BUFFER_BYTES (%s) %s; to use them all, set it to at least SMTPPOOL_MAX_CONNS × SMTPPOOL_MAX_MESSAGE_BYTES (%s)",
			formatBytes(c.bufferBytes), few, formatBytes(int64(cfg.MaxConns)*cfg.MaxMessageBytes))
		return
	}
	lower := ""
	if fits := share / int64(cfg.MaxConns); fits >= 1<<20 {
		lower = fmt.Sprintf(" lower SMTPPOOL_MAX_MESSAGE_BYTES to %d (%s),", fits>>20<<20, formatBytes(fits>>20<<20))
	}
	c.warn("the buffer budget derived from the memory limit, %s (%s), %s; to use them all,%s set SMTPPOOL_MAX_BUFFER_BYTES, or raise the memory limit",
		formatBytes(c.bufferBytes), c.bufferFrom, few, lower)
}

// sharePercent writes part as a share of whole, in per cent.
func sharePercent(part, whole int64) string {
	return strconv.FormatFloat(math.Round(float64(part)*1000/float64(whole))/10, 'f', -1, 64) + "% of the container's limit"
}

// warn adds a warning for the start-up log.
func (c *capacity) warn(format string, args ...any) {
	c.warnings = append(c.warnings, fmt.Sprintf(format, args...))
}

// LogValue describes the capacity for the start-up log.
func (c capacity) LogValue() slog.Value {
	attrs := []slog.Attr{
		slog.Int("max_client_conns", c.clientConns),
		slog.String("limited_by", c.limitedBy),
		slog.Int64("buffer_budget_bytes", c.bufferBytes),
		slog.String("buffer_budget_from", c.bufferFrom),
		slog.Int64("buffer_budget_messages", c.bufferMessages),
	}
	if c.container > 0 {
		attrs = append(attrs, slog.Int64("container_memory_limit_bytes", c.container))
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
