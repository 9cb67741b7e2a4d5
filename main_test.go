package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/internal/memsmtp"
	"github.com/smtppool/smtppool/pool"
	"github.com/smtppool/smtppool/proxy"
)

// TestConfigDefaultsAreThePackagesDefaults: each default is written once,
// in pool.DefaultConfig or proxy.DefaultConfig; the environment's defaults
// are those.
func TestConfigDefaultsAreThePackagesDefaults(t *testing.T) {
	cfg, err := loadConfig([]string{"SMTPPOOL_UPSTREAM_ADDR=smtp.corp.example:587"}, false)
	if err != nil {
		t.Fatal(err)
	}
	pc, err := cfg.poolConfig(nil)
	if err != nil {
		t.Fatal(err)
	}
	pd := pool.DefaultConfig()
	pd.Addr = "smtp.corp.example:587"
	pc.LocalName, pd.LocalName = "", "" // smtppool's is the host name
	// Not set from the environment: the pool applies its defaults.
	pd.PingAfterIdle, pd.HealthCheckPeriod, pd.ProbeBackoff, pd.ProbeBackoffMax = 0, 0, 0, 0
	pd.CapRecovery, pd.SlowDown, pd.FailoverCooldown = 0, 0, 0
	if !reflect.DeepEqual(pc, pd) {
		t.Errorf("pool config from the environment's defaults:\n got %+v\nwant %+v", pc, pd)
	}
	xc, xd := cfg.proxyConfig(nil), proxy.DefaultConfig()
	xc.Hostname, xd.Hostname = "", ""
	if xc != xd {
		t.Errorf("proxy config from the environment's defaults:\n got %+v\nwant %+v", xc, xd)
	}
}

// TestReadmeTableMatchesUsage: the README's variable table lists exactly
// the variables -h lists, with the same defaults where it gives values.
func TestReadmeTableMatchesUsage(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	usage := map[string]string{}
	for _, v := range envVars() {
		usage[v.key] = v.def
	}
	code := regexp.MustCompile("`([^`]+)`")
	inTable := map[string]bool{}
	for _, line := range strings.Split(string(readme), "\n") {
		cells := strings.Split(line, "|")
		if len(cells) < 4 || !strings.Contains(cells[1], "`SMTPPOOL_") {
			continue
		}
		var names, defaults []string
		for _, m := range code.FindAllStringSubmatch(cells[1], -1) {
			if strings.HasPrefix(m[1], "SMTPPOOL_") {
				names = append(names, m[1])
			}
		}
		for _, m := range code.FindAllStringSubmatch(cells[2], -1) {
			defaults = append(defaults, m[1])
		}
		for i, name := range names {
			inTable[name] = true
			def, ok := usage[name]
			switch {
			case !ok:
				t.Errorf("README lists %s, which -h does not", name)
			case len(defaults) == len(names) && defaults[i] != def && !strings.HasPrefix(defaults[i], "SMTPPOOL_"):
				t.Errorf("README gives %s the default %q, -h %q", name, defaults[i], def)
			}
		}
	}
	for name := range usage {
		if !inTable[name] {
			t.Errorf("-h lists %s, which the README's table lacks", name)
		}
	}
}

func TestConfigErrorsNameTheVariable(t *testing.T) {
	base := []string{"SMTPPOOL_UPSTREAM_ADDR=smtp.corp.example:587"}
	tests := []configError{
		{"missing upstream", nil, "SMTPPOOL_UPSTREAM_ADDR"},
		{"upstream without port", []string{"SMTPPOOL_UPSTREAM_ADDR=smtp.corp.example"}, "SMTPPOOL_UPSTREAM_ADDR"},
		{"bad TLS mode", append(base, "SMTPPOOL_UPSTREAM_TLS=maybe"), "SMTPPOOL_UPSTREAM_TLS"},
		{"bad number", append(base, "SMTPPOOL_MAX_CONNS=many"), "SMTPPOOL_MAX_CONNS"},
		{"zero conns", append(base, "SMTPPOOL_MAX_CONNS=0"), "SMTPPOOL_MAX_CONNS"},
		{"bad duration", append(base, "SMTPPOOL_ACQUIRE_TIMEOUT=2 minutes"), "SMTPPOOL_ACQUIRE_TIMEOUT"},
		{"negative attempts", append(base, "SMTPPOOL_MAX_ATTEMPTS=-1"), "SMTPPOOL_MAX_ATTEMPTS"},
		{"bad log level", append(base, "SMTPPOOL_LOG_LEVEL=loud"), "SMTPPOOL_LOG_LEVEL"},
		{"bad log format", append(base, "SMTPPOOL_LOG_FORMAT=xml"), "SMTPPOOL_LOG_FORMAT"},
		{"listener not host:port", append(base, "SMTPPOOL_LISTEN_ADDR=0.0.0.0"), "SMTPPOOL_LISTEN_ADDR"},
		{"user without password", append(base, "SMTPPOOL_UPSTREAM_USERNAME=app"), "SMTPPOOL_UPSTREAM_PASSWORD"},
		{"password without user", append(base, "SMTPPOOL_UPSTREAM_PASSWORD=pw-s3cret"), "SMTPPOOL_UPSTREAM_USERNAME"},
		{"credentials in clear text", append(base, "SMTPPOOL_UPSTREAM_USERNAME=app", "SMTPPOOL_UPSTREAM_PASSWORD=pw-s3cret", "SMTPPOOL_UPSTREAM_TLS=none"), "SMTPPOOL_UPSTREAM_TLS"},
		{"password twice", append(base, "SMTPPOOL_UPSTREAM_PASSWORD=pw-s3cret", "SMTPPOOL_UPSTREAM_PASSWORD_FILE=/etc/hostname"), "SMTPPOOL_UPSTREAM_PASSWORD_FILE"},
		{"missing password file", append(base, "SMTPPOOL_UPSTREAM_USERNAME=app", "SMTPPOOL_UPSTREAM_PASSWORD_FILE=/nonexistent"), "SMTPPOOL_UPSTREAM_PASSWORD_FILE"},
		{"bad CA file", append(base, "SMTPPOOL_UPSTREAM_CA_FILE=/etc/hostname"), "SMTPPOOL_UPSTREAM_CA_FILE"},
		{"absurd conns", append(base, "SMTPPOOL_MAX_CONNS=100000"), "SMTPPOOL_MAX_CONNS"},
		{"absurd retry timeout", append(base, "SMTPPOOL_RETRY_TIMEOUT=48h"), "SMTPPOOL_RETRY_TIMEOUT"},
		{"negative retry timeout", append(base, "SMTPPOOL_RETRY_TIMEOUT=-1s"), "SMTPPOOL_RETRY_TIMEOUT"},
		{"backoff above its maximum", append(base, "SMTPPOOL_RETRY_BACKOFF=10s", "SMTPPOOL_RETRY_BACKOFF_MAX=1s"), "SMTPPOOL_RETRY_BACKOFF_MAX"},
		{"tiny message limit", append(base, "SMTPPOOL_MAX_MESSAGE_BYTES=10"), "SMTPPOOL_MAX_MESSAGE_BYTES"},
		{"buffer smaller than a message", append(base, "SMTPPOOL_MAX_BUFFER_BYTES=1024"), "SMTPPOOL_MAX_BUFFER_BYTES"},
		{"hostname not a domain", append(base, "SMTPPOOL_HOSTNAME=my host"), "SMTPPOOL_HOSTNAME"},
		{"hostname with a bad label", append(base, "SMTPPOOL_HOSTNAME=-relay.example"), "SMTPPOOL_HOSTNAME"},
		{"unknown auth", append(base, "SMTPPOOL_UPSTREAM_AUTH=cram-md5"), "SMTPPOOL_UPSTREAM_AUTH"},
		{"xoauth2 without mailbox", append(base, "SMTPPOOL_UPSTREAM_AUTH=xoauth2", "SMTPPOOL_OAUTH2_TOKEN_FILE=/tmp/t"), "SMTPPOOL_UPSTREAM_USERNAME"},
		{"xoauth2 without token URL", append(base, "SMTPPOOL_UPSTREAM_AUTH=xoauth2", "SMTPPOOL_UPSTREAM_USERNAME=a@corp.example"), "SMTPPOOL_OAUTH2_TOKEN_URL"},
		{"xoauth2 without client ID", append(base, "SMTPPOOL_UPSTREAM_AUTH=xoauth2", "SMTPPOOL_UPSTREAM_USERNAME=a@corp.example",
			"SMTPPOOL_OAUTH2_TOKEN_URL=https://login.example/t"), "SMTPPOOL_OAUTH2_CLIENT_ID"},
		{"xoauth2 without secret", append(base, "SMTPPOOL_UPSTREAM_AUTH=xoauth2", "SMTPPOOL_UPSTREAM_USERNAME=a@corp.example",
			"SMTPPOOL_OAUTH2_TOKEN_URL=https://login.example/t", "SMTPPOOL_OAUTH2_CLIENT_ID=id"), "SMTPPOOL_OAUTH2_CLIENT_SECRET"},
		{"xoauth2 without scopes", append(base, "SMTPPOOL_UPSTREAM_AUTH=xoauth2", "SMTPPOOL_UPSTREAM_USERNAME=a@corp.example",
			"SMTPPOOL_OAUTH2_TOKEN_URL=https://login.example/t", "SMTPPOOL_OAUTH2_CLIENT_ID=id", "SMTPPOOL_OAUTH2_CLIENT_SECRET=pw-s3cret"), "SMTPPOOL_OAUTH2_SCOPES"},
		{"xoauth2 with a password", append(base, "SMTPPOOL_UPSTREAM_AUTH=xoauth2", "SMTPPOOL_UPSTREAM_USERNAME=a@corp.example",
			"SMTPPOOL_UPSTREAM_PASSWORD=pw-s3cret"), "SMTPPOOL_UPSTREAM_PASSWORD"},
		{"token file and grant", append(base, "SMTPPOOL_UPSTREAM_AUTH=xoauth2", "SMTPPOOL_UPSTREAM_USERNAME=a@corp.example",
			"SMTPPOOL_OAUTH2_TOKEN_FILE=/tmp/t", "SMTPPOOL_OAUTH2_TOKEN_URL=https://login.example/t"), "SMTPPOOL_OAUTH2_TOKEN_FILE"},
		{"OAuth2 settings without xoauth2", append(base, "SMTPPOOL_OAUTH2_TOKEN_FILE=/tmp/t"), "SMTPPOOL_UPSTREAM_AUTH"},
		{"client secret twice", append(base, "SMTPPOOL_OAUTH2_CLIENT_SECRET=pw-s3cret", "SMTPPOOL_OAUTH2_CLIENT_SECRET_FILE=/etc/hostname"), "SMTPPOOL_OAUTH2_CLIENT_SECRET_FILE"},
	}
	checkConfigErrors(t, tests)
}

// TestConfigErrorBlamesOnlyTheBadVariable: a bad SMTPPOOL_MAX_CONNS is
// not also blamed on SMTPPOOL_MIN_IDLE_CONNS.
func TestConfigErrorBlamesOnlyTheBadVariable(t *testing.T) {
	for _, env := range [][]string{{"SMTPPOOL_MAX_CONNS=-1"}, {"SMTPPOOL_MAX_CONNS=6000", "SMTPPOOL_MIN_IDLE_CONNS=5000"}} {
		_, err := loadConfig(append([]string{"SMTPPOOL_UPSTREAM_ADDR=smtp.corp.example:587"}, env...), false)
		if err == nil || !strings.Contains(err.Error(), "SMTPPOOL_MAX_CONNS") || strings.Contains(err.Error(), "SMTPPOOL_MIN_IDLE_CONNS") {
			t.Errorf("loadConfig with %v: %v; want an error that names SMTPPOOL_MAX_CONNS only", env, err)
		}
	}
}

// configError is an environment that must not load, and the variable its
// error must name.
type configError struct {
	name string
	env  []string
	want string
}

// checkConfigErrors checks that each environment fails to load with one
// line that names the variable and never shows the password.
func checkConfigErrors(t *testing.T, tests []configError) {
	t.Helper()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := loadConfig(tt.env, false)
			if err == nil {
				t.Fatal("loadConfig succeeded")
			}
			msg := err.Error()
			if !strings.Contains(msg, tt.want) || strings.Contains(msg, "\n") {
				t.Errorf("error %q does not name %s on one line", msg, tt.want)
			}
			if strings.Contains(msg, "pw-s3cret") {
				t.Errorf("error %q shows the password", msg)
			}
		})
	}
}

func TestConfigAccepts(t *testing.T) {
	pwFile := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pwFile, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := loadConfig([]string{
		"SMTPPOOL_UPSTREAM_ADDR=smtp.office365.com:587",
		"SMTPPOOL_UPSTREAM_TLS=starttls",
		"SMTPPOOL_UPSTREAM_USERNAME=app@corp.example",
		"SMTPPOOL_UPSTREAM_PASSWORD_FILE=" + pwFile,
		"SMTPPOOL_LISTEN_ADDR=[::1]:2525",
		"SMTPPOOL_LOG_LEVEL=debug",
	}, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := loadConfig([]string{"SMTPPOOL_UPSTREAM_ADDR=a.example:25", "SMTPPOOL_HOSTNAME=relay-1.corp.example",
		"SMTPPOOL_MAX_ATTEMPTS=0", "SMTPPOOL_RETRY_TIMEOUT=1s", "SMTPPOOL_MAX_BUFFER_BYTES=67108864"}, false); err != nil {
		t.Errorf("valid hostname, no retries, explicit buffer: %v", err)
	}
	if cfg.UpstreamPassword != "s3cret" || cfg.UpstreamTLS != pool.TLSStartTLS {
		t.Errorf("password %q, TLS %v; want the file's password without its newline, and starttls", cfg.UpstreamPassword, cfg.UpstreamTLS)
	}
	if _, err := loadConfig([]string{"SMTPPOOL_LISTEN_ADDR=0.0.0.0:2525", "SMTPPOOL_ALLOWED_NETWORKS=172.16.0.0/12"}, true); err != nil {
		t.Errorf("demo mode with a remote listener and allowed networks: %v", err)
	}
}

func TestUsageListsEveryVariableWithItsDefault(t *testing.T) {
	var buf bytes.Buffer
	printUsage(&buf)
	out := buf.String()
	for _, name := range []string{"SMTPPOOL_LISTEN_ADDR", "SMTPPOOL_UPSTREAM_ADDR", "SMTPPOOL_UPSTREAM_TLS",
		"SMTPPOOL_UPSTREAM_USERNAME", "SMTPPOOL_UPSTREAM_PASSWORD", "SMTPPOOL_UPSTREAM_PASSWORD_FILE",
		"SMTPPOOL_UPSTREAM_ALLOW_INSECURE_AUTH", "SMTPPOOL_MAX_CONNS", "SMTPPOOL_ACQUIRE_TIMEOUT",
		"SMTPPOOL_MAX_ATTEMPTS", "SMTPPOOL_MAX_CONN_LIFETIME", "SMTPPOOL_MAX_CONN_IDLE_TIME",
		"SMTPPOOL_MAX_MESSAGES_PER_CONN", "SMTPPOOL_MAX_MESSAGE_BYTES", "SMTPPOOL_MAX_RECIPIENTS",
		"SMTPPOOL_LOG_LEVEL", "SMTPPOOL_LOG_FORMAT"} {
		if !strings.Contains(out, "  "+name+" (default ") {
			t.Errorf("usage lacks %s with its default", name)
		}
	}
	for _, v := range envVars() {
		if v.help == "" || (v.def != "" && !strings.Contains(out, v.key+" (default "+v.def+")")) {
			t.Errorf("usage of %s lacks its help or default %q", v.key, v.def)
		}
	}
	if err := run(context.Background(), []string{"-h"}, nil, &buf); err == nil || !strings.Contains(err.Error(), "help") {
		t.Errorf("run -h = %v, want flag.ErrHelp", err)
	}
}

// startRun runs the program with environ and waits for its listener; it
// returns the listen address, the log, and a stop function that returns
// run's error.
func startRun(t *testing.T, args, environ []string) (addr string, log *memsmtp.LogBuffer, stop func() error) {
	t.Helper()
	log = &memsmtp.LogBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, args, append([]string{"SMTPPOOL_LISTEN_ADDR=127.0.0.1:0", "SMTPPOOL_ADMIN_ADDR=127.0.0.1:0", "SMTPPOOL_LOG_LEVEL=debug"}, environ...), log)
	}()
	re := regexp.MustCompile(`"msg":"smtppool listening","addr":"([^"]+)"`)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if m := re.FindStringSubmatch(log.String()); m != nil {
			addr = m[1]
			break
		}
		select {
		case err := <-done:
			t.Fatalf("run exited early: %v\n%s", err, log.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no listening line in the log:\n%s", log.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
	stopped := false
	stop = func() error {
		if stopped {
			return nil
		}
		stopped = true
		cancel()
		return <-done
	}
	t.Cleanup(func() { stop() })
	return addr, log, stop
}

func TestDemoModeRelaysToTheEmbeddedUpstream(t *testing.T) {
	addr, log, stop := startRun(t, []string{"demo"}, nil)
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	msg := "Message-ID: <demo-1@test>\r\nSubject: hello\r\n\r\nsecret body text\r\n"
	if err := c.SendMail("app@example.com", []string{"user@example.com"}, strings.NewReader(msg)); err != nil {
		t.Fatal(err)
	}
	c.Quit()
	if err := stop(); err != nil {
		t.Fatalf("run: %v", err)
	}
	out := log.String()
	var found bool
	for _, line := range strings.Split(out, "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) == nil && rec["msg"] == "demo upstream received a message" && rec["message_id"] == "<demo-1@test>" {
			found = true
		}
	}
	if !found {
		t.Errorf("the demo upstream did not log the message:\n%s", out)
	}
	if strings.Contains(out, "secret body text") {
		t.Errorf("the log contains the message body")
	}
}

func TestRunRelaysAndQuitsUpstreamSessionsOnShutdown(t *testing.T) {
	up, err := memsmtp.Start(memsmtp.Options{Username: "app", Password: "pw-s3cret"})
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	addr, log, stop := startRun(t, nil, []string{"SMTPPOOL_UPSTREAM_ADDR=" + up.Addr, "SMTPPOOL_UPSTREAM_TLS=none",
		"SMTPPOOL_UPSTREAM_USERNAME=app", "SMTPPOOL_UPSTREAM_PASSWORD=pw-s3cret", "SMTPPOOL_UPSTREAM_ALLOW_INSECURE_AUTH=true"})
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SendMail("app@example.com", []string{"user@example.com"}, strings.NewReader("Subject: x\r\n\r\nbody\r\n")); err != nil {
		t.Fatal(err)
	}
	c.Quit()
	if err := stop(); err != nil {
		t.Fatalf("run: %v", err)
	}
	st := up.Stats()
	if st.Messages != 1 || st.Auths != 1 || st.Commands["QUIT"] != 1 {
		t.Errorf("upstream: %d messages, %d AUTH, %d QUIT; want 1, 1, 1", st.Messages, st.Auths, st.Commands["QUIT"])
	}
	if strings.Contains(log.String(), "pw-s3cret") {
		t.Errorf("the log contains the password")
	}
	// Durations are logged as people write them, not in nanoseconds.
	for _, want := range []string{`"retry_timeout":"2m0s"`, `"shutdown_timeout":"20s"`, `"timeout":"20s"`} {
		if !strings.Contains(log.String(), want) {
			t.Errorf("the log lacks %s", want)
		}
	}
}

// TestShutdownClosesClientsThatOutstayTheTimeout: a client that stays in a
// transaction does not hold the shutdown past SMTPPOOL_SHUTDOWN_TIMEOUT,
// and its upstream session is still closed with QUIT.
func TestShutdownClosesClientsThatOutstayTheTimeout(t *testing.T) {
	up, err := memsmtp.Start(memsmtp.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	addr, _, stop := startRun(t, nil, []string{"SMTPPOOL_UPSTREAM_ADDR=" + up.Addr, "SMTPPOOL_UPSTREAM_TLS=none",
		"SMTPPOOL_SHUTDOWN_TIMEOUT=50ms"})
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Mail("app@example.com", nil); err != nil {
		t.Fatal(err)
	}
	// MAIL waits for the first RCPT to reach an upstream that offers
	// PIPELINING: with one, the upstream has a transaction to reset.
	if err := c.Rcpt("user@example.com", nil); err != nil {
		t.Fatal(err)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("shutdown still waiting for the idle client after 20 s")
	}
	if err := c.Noop(); err == nil {
		t.Error("the client's connection is still open after shutdown")
	}
	if st := up.Stats(); st.Commands["RSET"] != 1 || st.Commands["QUIT"] != 1 {
		t.Errorf("upstream saw %d RSET and %d QUIT, want the unfinished transaction reset and the session quit", st.Commands["RSET"], st.Commands["QUIT"])
	}
}

// TestShutdownKeepsItsTimeoutWhenTheUpstreamStalls: an upstream that
// stalls its reply to a message for a minute does not hold the process past
// SMTPPOOL_SHUTDOWN_TIMEOUT plus a few seconds, and the stalled client
// gets no 250.
func TestShutdownKeepsItsTimeoutWhenTheUpstreamStalls(t *testing.T) {
	up, err := memsmtp.Start(memsmtp.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	up.Inject(memsmtp.Data, memsmtp.Fault{Delay: time.Minute})
	addr, _, stop := startRun(t, nil, []string{"SMTPPOOL_UPSTREAM_ADDR=" + up.Addr, "SMTPPOOL_UPSTREAM_TLS=none",
		"SMTPPOOL_SHUTDOWN_TIMEOUT=200ms"})
	sent := make(chan error, 1)
	go func() {
		c, err := smtp.Dial(addr)
		if err != nil {
			sent <- err
			return
		}
		defer c.Close()
		sent <- c.SendMail("app@example.com", []string{"user@example.com"}, strings.NewReader("Subject: x\r\n\r\nbody\r\n"))
	}()
	deadline := time.Now().Add(10 * time.Second)
	for up.Stats().Commands["DATA"] == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	start := time.Now()
	if err := stop(); err != nil {
		t.Fatalf("run: %v", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("shutdown took %v with a 200ms timeout", took)
	}
	if err := <-sent; err == nil {
		t.Error("the stalled client got 250")
	}
}
