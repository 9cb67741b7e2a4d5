package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// postfixRelay is a private Postfix instance, in its own folder, that
// accepts mail on a loopback port and relays all of it to one smtp-sink:
// the full MTA that users put in front of their relay instead of
// smtppool. It uses no system configuration and no DNS.
type postfixRelay struct {
	dir, etc string
	port     int
	addr     string
	stop     func()
}

// startPostfixRelay writes main.cf and master.cf for a relay to sinkPort
// with concurrency n and connection caching, and starts it.
//
// Beyond what a relay needs, it is set up to do its best in this test: the
// destination starts at its full concurrency (initial_destination_concurrency
// = n) rather than ramping up from 5, and connections to the sink are
// cached. Everything else, including the disk queue and its fsyncs, is
// Postfix's default.
func startPostfixRelay(parent string, sinkPort, n int) (*postfixRelay, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	d := filepath.Join(parent, fmt.Sprintf("postfix-relay-%d", port))
	pf := &postfixRelay{dir: d, etc: filepath.Join(d, "etc"), port: port, addr: fmt.Sprintf("127.0.0.1:%d", port)}
	for _, sub := range []string{"etc", "spool", "data"} {
		if err := os.MkdirAll(filepath.Join(d, sub), 0o755); err != nil {
			return nil, err
		}
	}
	if err := os.Chmod(d, 0o755); err != nil {
		return nil, err
	}
	if out, err := exec.Command("chown", "postfix:postfix", filepath.Join(d, "data")).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("chown postfix data directory: %v: %s", err, out)
	}
	sinkDest := fmt.Sprintf("[127.0.0.1]:%d", sinkPort)
	mainCF := fmt.Sprintf(`compatibility_level = 3.6
config_directory = %[1]s/etc
queue_directory = %[1]s/spool
data_directory = %[1]s/data
myhostname = relay.bench.example
mydomain = bench.example
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = %[2]s
smtpd_relay_restrictions = permit_mynetworks, reject
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_peername_lookup = no
alias_maps =
alias_database =
local_recipient_maps =
biff = no
maillog_file = %[1]s/postfix.log
maillog_file_prefixes = /var, /dev/stdout, %[1]s
smtpd_client_connection_count_limit = 1000
smtpd_client_connection_rate_limit = 0
default_process_limit = 200
default_destination_concurrency_limit = %[3]d
smtp_destination_concurrency_limit = %[3]d
relay_destination_concurrency_limit = %[3]d
initial_destination_concurrency = %[3]d
smtp_connection_cache_on_demand = yes
smtp_connection_cache_destinations = %[2]s
`, d, sinkDest, n)
	masterCF := fmt.Sprintf(`127.0.0.1:%d inet n - n - 200 smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
`, port)
	if err := os.WriteFile(filepath.Join(pf.etc, "main.cf"), []byte(mainCF), 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(pf.etc, "master.cf"), []byte(masterCF), 0o644); err != nil {
		return nil, err
	}
	if out, err := exec.Command("postfix", "-c", pf.etc, "check").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("postfix check: %v: %s", err, out)
	}
	// Registered before start, so that a start that half-worked is stopped.
	pf.stop = owned.add(func() {
		_ = exec.Command("postfix", "-c", pf.etc, "stop").Run()
		pf.waitStopped(10 * time.Second)
	})
	if out, err := exec.Command("postfix", "-c", pf.etc, "start").CombinedOutput(); err != nil {
		pf.stop()
		return nil, fmt.Errorf("postfix start: %v: %s", err, out)
	}
	if err := waitListening(nil, port, 15*time.Second); err != nil {
		pf.stop()
		return nil, fmt.Errorf("postfix relay: %w; its log:\n%s", err, indent(pf.logTail()))
	}
	return pf, nil
}

// waitStopped waits until the master process is gone, killing it if it
// outlives timeout.
func (pf *postfixRelay) waitStopped(timeout time.Duration) {
	pidFile := filepath.Join(pf.dir, "spool", "pid", "master.pid")
	deadline := time.Now().Add(timeout)
	for {
		b, err := os.ReadFile(pidFile)
		if err != nil {
			return
		}
		pid := strings.TrimSpace(string(b))
		if _, err := os.Stat("/proc/" + pid); err != nil {
			return
		}
		if time.Now().After(deadline) {
			_ = exec.Command("kill", "-9", pid).Run()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitQueueEmpty waits until no message is left in the queue folders.
func (pf *postfixRelay) waitQueueEmpty(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		n := 0
		for _, q := range []string{"maildrop", "incoming", "active", "deferred", "hold"} {
			_ = filepath.WalkDir(filepath.Join(pf.dir, "spool", q), func(_ string, d os.DirEntry, err error) error {
				if err == nil && !d.IsDir() {
					n++
				}
				return nil
			})
		}
		if n == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("postfix relay: %d messages still queued after %v", n, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (pf *postfixRelay) log() string {
	b, _ := os.ReadFile(filepath.Join(pf.dir, "postfix.log"))
	return string(b)
}

func (pf *postfixRelay) logTail() string {
	s := pf.log()
	if len(s) > 4000 {
		s = s[len(s)-4000:]
	}
	return s
}

// logCount counts log lines that contain s.
func (pf *postfixRelay) logCount(s string) int { return strings.Count(pf.log(), s) }
