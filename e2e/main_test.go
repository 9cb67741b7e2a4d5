//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

var (
	// proxyBin is the smtppool binary that TestMain builds once.
	proxyBin string
	// upstreamScript is shared/peers/postfix-upstream.sh.
	upstreamScript string
)

// peers are the programs the scenarios drive, with the package that has them.
var peers = []struct{ cmd, pkg string }{
	{"postfix", "postfix"},
	{"postconf", "postfix"},
	{"postqueue", "postfix"},
	{"smtp-sink", "postfix"},
	{"smtp-source", "postfix"},
	{"swaks", "swaks"},
	{"python3", "python3"},
	{"ss", "iproute2"},
}

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	// Postfix's commands live in /usr/sbin, which a CI user's PATH may lack.
	path := os.Getenv("PATH")
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		if !slices.Contains(filepath.SplitList(path), dir) {
			path += string(os.PathListSeparator) + dir
		}
	}
	os.Setenv("PATH", path)
	if err := checkPeers(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: FAIL:", err)
		return 1
	}
	dir, err := os.MkdirTemp("", "smtppool-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: FAIL:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	proxyBin = filepath.Join(dir, "smtppool")
	if err := buildProxy(proxyBin); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: FAIL:", err)
		return 1
	}
	return m.Run()
}

// buildProxy builds the module root's main package, with the race detector
// when the tests themselves run with -race.
func buildProxy(out string) error {
	args := []string{"build", "-o", out}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, ".")
	// go test puts its own toolchain first in the PATH of the tests.
	cmd := exec.Command("go", args...)
	cmd.Dir = ".." // the module root, from e2e/
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, b)
	}
	return nil
}

// checkPeers names everything missing at once, rather than failing one
// scenario at a time.
func checkPeers() error {
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root privileges (Postfix and smtp-sink -u nobody need them)")
	}
	for _, p := range peers {
		if _, err := exec.LookPath(p.cmd); err != nil {
			missing = append(missing, fmt.Sprintf("%s (Debian package %s)", p.cmd, p.pkg))
		}
	}
	shared := os.Getenv("SMTPPOOL_SHARED_DIR")
	if shared == "" {
		shared = filepath.Join("..", "..", "shared")
	}
	script, err := filepath.Abs(filepath.Join(shared, "peers", "postfix-upstream.sh"))
	if err == nil {
		_, err = os.Stat(script)
	}
	if err != nil {
		missing = append(missing, fmt.Sprintf("the upstream recipe %s (set SMTPPOOL_SHARED_DIR to the shared/ folder): %v", script, err))
	}
	upstreamScript = script
	if len(missing) > 0 {
		return fmt.Errorf("the end-to-end tests need peers that are missing:\n  - %s\n"+
			"Install them with: sh %s install", strings.Join(missing, "\n  - "), script)
	}
	if out, err := exec.Command("python3", "-c", "import smtplib, email.message").CombinedOutput(); err != nil {
		return fmt.Errorf("python3 cannot import smtplib: %v\n%s", err, out)
	}
	return nil
}
