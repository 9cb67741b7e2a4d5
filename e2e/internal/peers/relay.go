package peers

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// StartRelay starts a Postfix relay in a new folder in parent, on a free
// port: it accepts mail from loopback and relays all of it to the smtp-sink
// on sinkPort, with destination concurrency n and connection caching. It
// is the full MTA that users put in front of their relay instead of
// smtppool. The owner's cleanup stops it.
//
// Beyond what a relay needs, it is set up to do its best: the destination
// starts at its full concurrency (initial_destination_concurrency = n)
// rather than ramping up from 5, and connections to the sink are cached.
// Everything else, including the disk queue and its fsyncs, is Postfix's
// default.
func StartRelay(o Owner, parent string, sinkPort, n int) (*Postfix, error) {
	sinkDest := fmt.Sprintf("[127.0.0.1]:%d", sinkPort)
	return startPrivate(o, parent, "postfix-relay", fmt.Sprintf(relayMainCF, sinkDest, n))
}

// StartDiscard starts a Postfix instance in a new folder in parent, on a
// free port, that accepts mail from loopback for any recipient and
// discards it once queued: an upstream with what Postfix's smtpd offers
// (PIPELINING, CHUNKING, 8BITMIME, SMTPUTF8) and costs (a queue file per
// message), whose log says when each message was taken ("status=sent").
// The owner's cleanup stops it.
func StartDiscard(o Owner, parent string) (*Postfix, error) {
	return startPrivate(o, parent, "postfix-discard", discardMainCF)
}

// startPrivate sets up a Postfix instance named name in a new folder in
// parent, with the common settings and extra in its main.cf, and starts
// it on a free port.
func startPrivate(o Owner, parent, name, extra string) (*Postfix, error) {
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	p := newPostfix(filepath.Join(parent, fmt.Sprintf("%s-%d", name, port)), port)
	p.Limit = 1000 // smtpd_client_connection_count_limit
	for _, sub := range []string{"etc", "spool", "data"} {
		if err := os.MkdirAll(filepath.Join(p.Dir, sub), 0o755); err != nil {
			return nil, fmt.Errorf("postfix folder: %w", err)
		}
	}
	if err := os.Chmod(p.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("postfix folder: %w", err)
	}
	if out, err := exec.Command("chown", "postfix:postfix", filepath.Join(p.Dir, "data")).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("chown postfix data directory: %w: %s", err, out)
	}
	files := map[string]string{
		"main.cf":   fmt.Sprintf(commonMainCF, p.Dir) + extra,
		"master.cf": fmt.Sprintf(relayMasterCF, port),
	}
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(p.etc, name), []byte(text), 0o644); err != nil {
			return nil, fmt.Errorf("postfix configuration: %w", err)
		}
	}
	if out, err := exec.Command("postfix", "-c", p.etc, "check").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("postfix check: %w: %s", err, out)
	}
	return p, p.startOwned(o)
}

// commonMainCF is the main.cf of every private instance: %[1]s its folder.
const commonMainCF = `compatibility_level = 3.6
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
smtpd_relay_restrictions = permit_mynetworks, reject
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_peername_lookup = no
alias_maps =
alias_database =
local_recipient_maps =
biff = no
maillog_file = %[1]s/postfix.log
maillog_file_prefixes = /var, /dev/stdout, /dev/shm, %[1]s
smtpd_client_connection_count_limit = 1000
smtpd_client_connection_rate_limit = 0
default_process_limit = 200
`

// discardMainCF ends a discarding instance's main.cf.
const discardMainCF = `default_transport = discard:bench
relay_transport = discard:bench
`

// relayMainCF ends a relay's main.cf: %[1]s the sink, %[2]d its
// concurrency.
const relayMainCF = `relayhost = %[1]s
default_destination_concurrency_limit = %[2]d
smtp_destination_concurrency_limit = %[2]d
relay_destination_concurrency_limit = %[2]d
initial_destination_concurrency = %[2]d
smtp_connection_cache_on_demand = yes
smtp_connection_cache_destinations = %[1]s
`

// relayMasterCF is the relay's master.cf: %d its port.
const relayMasterCF = `127.0.0.1:%d inet n - n - 200 smtpd
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
`
