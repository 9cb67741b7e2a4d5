package main

import (
	"errors"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/internal/memsmtp"
)

// adminAddr reads the admin endpoints' address from the log.
func adminAddr(t *testing.T, log *memsmtp.LogBuffer) string {
	t.Helper()
	m := regexp.MustCompile(`"msg":"admin endpoints listening","addr":"([^"]+)"`).FindStringSubmatch(log.String())
	if m == nil {
		t.Fatalf("no admin line in the log:\n%s", log.String())
	}
	return m[1]
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// refusedAddr returns a loopback address where nothing listens.
func refusedAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// TestStartsAndStaysReadyWithAnUnreachableUpstream: start-up does not wait
// for the upstream; readiness does not depend on it; the metrics say it is
// down and count what failed.
func TestStartsAndStaysReadyWithAnUnreachableUpstream(t *testing.T) {
	upstream := refusedAddr(t)
	addr, log, _ := startRun(t, nil, []string{"SMTPPOOL_UPSTREAM_ADDR=" + upstream, "SMTPPOOL_UPSTREAM_TLS=none",
		"SMTPPOOL_RETRY_TIMEOUT=300ms", "SMTPPOOL_RETRY_BACKOFF=20ms", "SMTPPOOL_RETRY_BACKOFF_MAX=50ms"})
	base := "http://" + adminAddr(t, log)
	for _, path := range []string{"/healthz", "/readyz"} {
		if code, body := httpGet(t, base+path); code != 200 {
			t.Errorf("%s = %d %q with the upstream unreachable, want 200", path, code, body)
		}
	}
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Mail("app@example.com", nil)
	var got *smtp.SMTPError
	if !errors.As(err, &got) || got.Code != 451 {
		t.Fatalf("MAIL with the upstream unreachable: %v, want 451", err)
	}
	c.Quit()
	_, metrics := httpGet(t, base+"/metrics")
	for _, want := range []string{
		`smtppool_upstream_up{upstream="` + upstream + `"} 0`,
		`smtppool_upstream_max_connections{upstream="` + upstream + `"} 5`,
		`smtppool_transactions_total{result="failed",upstream="none"} 1`,
		`smtppool_retries_total{reason="connect",upstream="` + upstream + `"}`,
		`smtppool_upstream_connect_failures_total{upstream="` + upstream + `"}`,
		`smtppool_build_info{goversion="go`,
		`smtppool_client_connections`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if code, _ := httpGet(t, base+"/readyz"); code != 200 {
		t.Errorf("/readyz = %d after the upstream failed, want 200: an upstream outage must not take the pod out", code)
	}
}

// TestProbesNeverReachTheUpstream: however often the kubelet and
// Prometheus call, no upstream connection is opened.
func TestProbesNeverReachTheUpstream(t *testing.T) {
	up, err := memsmtp.Start(memsmtp.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	_, log, _ := startRun(t, nil, []string{"SMTPPOOL_UPSTREAM_ADDR=" + up.Addr, "SMTPPOOL_UPSTREAM_TLS=none"})
	base := "http://" + adminAddr(t, log)
	for range 20 {
		for _, path := range []string{"/healthz", "/readyz", "/metrics"} {
			if code, _ := httpGet(t, base+path); code != 200 {
				t.Fatalf("%s = %d", path, code)
			}
		}
	}
	if n := up.Stats().Conns; n != 0 {
		t.Errorf("the upstream saw %d connections from probes, want 0", n)
	}
}

// TestReadinessTurnsOffWhenShutdownStarts: /readyz answers 503 from the
// moment a shutdown starts, while open transactions may still finish.
func TestReadinessTurnsOffWhenShutdownStarts(t *testing.T) {
	up, err := memsmtp.Start(memsmtp.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	addr, log, stop := startRun(t, nil, []string{"SMTPPOOL_UPSTREAM_ADDR=" + up.Addr, "SMTPPOOL_UPSTREAM_TLS=none",
		"SMTPPOOL_SHUTDOWN_TIMEOUT=10s"})
	base := "http://" + adminAddr(t, log)
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Mail("app@example.com", nil); err != nil { // keeps the shutdown draining
		t.Fatal(err)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if code, _ := httpGet(t, base+"/readyz"); code == 503 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("/readyz still 200 five seconds into the shutdown")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if code, _ := httpGet(t, base+"/healthz"); code != 200 {
		t.Errorf("/healthz = %d while draining, want 200", code)
	}
	// The open transaction may still finish during the drain.
	if err := c.Rcpt("user@example.com", nil); err != nil {
		t.Fatalf("RCPT during the drain: %v", err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte("Subject: drain\r\n\r\nbody\r\n"))
	if err := w.Close(); err != nil {
		t.Fatalf("end of DATA during the drain: %v", err)
	}
	c.Quit()
	if err := <-stopped; err != nil {
		t.Fatalf("run: %v", err)
	}
	if n := up.Stats().Messages; n != 1 {
		t.Errorf("upstream has %d messages, want the drained one", n)
	}
}

// TestSecretsAndBodiesNeverReachTheLog: at debug level, through a success,
// a retry, a refusal and a wrong password, the log never holds the
// password or a message body.
func TestSecretsAndBodiesNeverReachTheLog(t *testing.T) {
	const password, body = "pw-Zq81-s3cret", "BODY-a7c1-never-logged"
	up, err := memsmtp.Start(memsmtp.Options{Username: "app", Password: password})
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	up.Inject(memsmtp.Data, memsmtp.Fault{Drop: true})
	env := []string{"SMTPPOOL_UPSTREAM_ADDR=" + up.Addr, "SMTPPOOL_UPSTREAM_TLS=none", "SMTPPOOL_UPSTREAM_ALLOW_INSECURE_AUTH=true",
		"SMTPPOOL_UPSTREAM_USERNAME=app", "SMTPPOOL_UPSTREAM_PASSWORD=" + password, "SMTPPOOL_RETRY_BACKOFF=10ms"}
	addr, log, stop := startRun(t, nil, env)
	msg := "Subject: secret\r\n\r\n" + body + "\r\n"
	for i := range 2 { // the first is retried once, the second refused
		if i == 1 {
			up.Inject(memsmtp.Data, memsmtp.Fault{Reply: &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "spam"}})
		}
		c, err := smtp.Dial(addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SendMail("app@example.com", []string{"user@example.com"}, strings.NewReader(msg))
		c.Close()
	}
	stop()

	wrong, log2, stop2 := startRun(t, nil, append(env, "SMTPPOOL_UPSTREAM_PASSWORD=pw-Wrong-9911", "SMTPPOOL_RETRY_TIMEOUT=100ms"))
	c, err := smtp.Dial(wrong)
	if err != nil {
		t.Fatal(err)
	}
	c.SendMail("app@example.com", []string{"user@example.com"}, strings.NewReader(msg))
	c.Close()
	stop2()

	out := log.String() + log2.String()
	for _, secret := range []string{password, "pw-Wrong-9911", body} {
		if strings.Contains(out, secret) {
			t.Errorf("the log holds %q", secret)
		}
	}
	if !strings.Contains(log.String(), `"outcome":"delivered"`) || !strings.Contains(log.String(), `"outcome":"rejected"`) {
		t.Errorf("the log lacks the transaction lines it should have:\n%s", log.String())
	}
}
