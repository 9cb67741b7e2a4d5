//go:build e2e

package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

var (
	// proxyBin is the smtppool binary that TestMain builds once.
	proxyBin string
	// upstreamScript is shared/peers/postfix-upstream.sh.
	upstreamScript string
)

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "smtppool-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: FAIL:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	proxyBin = filepath.Join(dir, "smtppool")
	if err := setup(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: FAIL:", err)
		return 1
	}
	return m.Run()
}

// setup checks the peers, naming everything missing at once rather than
// failing one scenario at a time, and builds the proxy, with the race
// detector when the tests themselves run with -race.
func setup() error {
	ctx := context.Background()
	peers.AddSbinToPath()
	root, err := peers.ModuleRoot(ctx)
	if err != nil {
		return err
	}
	upstreamScript, err = peers.UpstreamScript(root)
	missing := peers.Require(peers.Program{Cmd: "swaks", Package: "swaks"}, peers.Program{Cmd: "python3", Package: "python3"},
		peers.Program{Cmd: "curl", Package: "curl"})
	if err := errors.Join(missing, err); err != nil {
		return fmt.Errorf("the end-to-end tests need peers that are missing: %w\n"+
			"Install them with: sh ../shared/peers/postfix-upstream.sh install", err)
	}
	if out, err := exec.Command("python3", "-c", "import smtplib, email.message").CombinedOutput(); err != nil {
		return fmt.Errorf("python3 cannot import smtplib: %v\n%s", err, out)
	}
	return peers.BuildProxy(ctx, root, proxyBin, raceEnabled)
}
