package main

import (
	"bytes"
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestBuildScriptMakesAStaticStampedBinary builds with build.sh, the script
// the Dockerfile runs, and checks what the image relies on: the binary is
// static, so it runs on a distroless image without libc; it carries no
// local paths; and it reports the version it was stamped with.
func TestBuildScriptMakesAStaticStampedBinary(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("build.sh makes a Linux binary for the container image; this checks it as ELF")
	}
	if _, err := exec.LookPath("sh"); err != nil {
		t.Skip("no sh:", err)
	}
	repo, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "smtppool")
	const stamp = "v0.0.0-buildtest"

	start := time.Now()
	cmd := exec.Command("sh", "./build.sh", bin)
	cmd.Env = append(os.Environ(), "VERSION="+stamp)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("./build.sh: %v\n%s", err, out)
	}
	t.Logf("build.sh took %v", time.Since(start).Round(time.Millisecond))

	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		switch p.Type {
		case elf.PT_INTERP:
			t.Error("the binary has a PT_INTERP program header: it needs a dynamic loader, which a distroless static image lacks")
		case elf.PT_DYNAMIC:
			t.Error("the binary has a PT_DYNAMIC program header: it is dynamically linked")
		}
	}
	if s := f.Section(".dynamic"); s != nil {
		t.Error("the binary has a .dynamic section")
	}
	if s := f.Section(".interp"); s != nil {
		t.Error("the binary has an .interp section")
	}
	if libs, err := f.ImportedLibraries(); err != nil {
		t.Errorf("ImportedLibraries: %v", err)
	} else if len(libs) > 0 {
		t.Errorf("the binary needs shared libraries %v", libs)
	}
	// -s -w: no symbol table, no DWARF.
	if s := f.Section(".symtab"); s != nil {
		t.Error("the binary has a symbol table: -s was not applied")
	}
	if s := f.Section(".debug_info"); s != nil {
		t.Error("the binary has DWARF: -w was not applied")
	}

	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(data, []byte(repo+string(filepath.Separator))) {
		t.Errorf("the binary contains the checkout path %s: -trimpath was not applied", repo)
	}
	t.Logf("binary size: %d bytes (%.1f MiB)", len(data), float64(len(data))/(1<<20))
	// The image is this binary on gcr.io/distroless/static (about 2 MiB);
	// the issue asks for an image under 20 MB.
	if len(data) > 15<<20 {
		t.Errorf("binary is %d bytes; with the distroless base the image would exceed 20 MB", len(data))
	}

	out, err := exec.Command(bin, "-version").CombinedOutput()
	if err != nil {
		t.Fatalf("smtppool -version: %v\n%s", err, out)
	}
	want := "smtppool " + stamp + " " + runtime.Version() + "\n"
	if string(out) != want {
		t.Errorf("smtppool -version printed %q, want %q", out, want)
	}
}

// TestDockerfile checks the Dockerfile by reading it, since CI has no
// Docker engine: its build stage runs build.sh and sets no build flags of
// its own, and the final stage is distroless, non-root, without HEALTHCHECK.
func TestDockerfile(t *testing.T) {
	b, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	// Join continuation lines, drop comments.
	text := strings.ReplaceAll(string(b), "\\\n", " ")
	var lines []string
	for _, l := range strings.Split(text, "\n") {
		l = strings.TrimSpace(l)
		if l != "" && !strings.HasPrefix(l, "#") {
			lines = append(lines, l)
		}
	}
	instr := func(l string) string { kw, _, _ := strings.Cut(l, " "); return strings.ToUpper(kw) }

	var froms []string
	finalStage := 0
	for i, l := range lines {
		if instr(l) == "FROM" {
			froms = append(froms, l)
			finalStage = i
		}
	}
	if len(froms) < 2 {
		t.Fatalf("want a multi-stage build, got FROM lines %q", froms)
	}
	// The build stage runs on the builder's platform and cross-compiles
	// (GOOS and GOARCH from BuildKit's TARGETOS and TARGETARCH).
	if !regexp.MustCompile(`^FROM --platform=\$BUILDPLATFORM golang:1\.26\b`).MatchString(froms[0]) {
		t.Errorf("build stage %q: want golang:1.26 on $BUILDPLATFORM, matching go.mod", froms[0])
	}
	if want := "FROM gcr.io/distroless/static-debian12:nonroot"; froms[len(froms)-1] != want {
		t.Errorf("final stage %q, want %q", froms[len(froms)-1], want)
	}

	var runsBuildScript bool
	for _, l := range lines[:finalStage] {
		if instr(l) != "RUN" {
			continue
		}
		if strings.Contains(l, "./build.sh") {
			runsBuildScript = true
		}
		for _, flag := range []string{"go build", "-ldflags", "-trimpath", "CGO_ENABLED"} {
			if strings.Contains(l, flag) {
				t.Errorf("Dockerfile sets %q itself in %q; build flags belong in build.sh", flag, l)
			}
		}
	}
	if !runsBuildScript {
		t.Error("the build stage does not run ./build.sh")
	}
	for _, want := range []string{`GOOS="$TARGETOS"`, `GOARCH="$TARGETARCH"`} {
		if !strings.Contains(strings.Join(lines[:finalStage], "\n"), want) {
			t.Errorf("the build stage does not set %s: a multi-platform build would ship the builder's architecture", want)
		}
	}

	final := lines[finalStage:]
	has := func(want string) bool {
		for _, l := range final {
			if l == want {
				return true
			}
		}
		return false
	}
	// A numeric user, so that Kubernetes' runAsNonRoot can verify it.
	for _, want := range []string{"USER 65532:65532", "EXPOSE 2525 9025", `ENTRYPOINT ["/smtppool"]`} {
		if !has(want) {
			t.Errorf("final stage lacks %q", want)
		}
	}
	for _, l := range lines {
		if instr(l) == "HEALTHCHECK" {
			t.Errorf("%q: no Docker HEALTHCHECK; Kubernetes ignores it and probes /healthz and /readyz itself", l)
		}
	}
}
