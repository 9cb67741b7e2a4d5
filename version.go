package main

import (
	"flag"
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
)

// version is stamped at build time by build.sh:
//
//	go build -ldflags "-X main.version=v1.2.3"
//
// A plain go build leaves "dev"; go install module@version fills it from
// the module version instead (see versionString).
var version = "dev"

// errVersionShown ends run after -version printed the version. It wraps
// flag.ErrHelp, which main treats as a clean exit with status 0.
var errVersionShown = fmt.Errorf("version shown: %w", flag.ErrHelp)

// versionString is what -version prints: "smtppool <version> <go version>".
func versionString() string {
	v := version
	if v == "dev" {
		if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v = bi.Main.Version
		}
	}
	return fmt.Sprintf("smtppool %s %s", v, runtime.Version())
}

// printVersion writes the version line to w and returns errVersionShown.
func printVersion(w io.Writer) error {
	fmt.Fprintln(w, versionString())
	return errVersionShown
}
