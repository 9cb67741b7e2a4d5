// Package e2e proves smtppool end to end: it builds the real binary and runs
// it between real third-party SMTP software on loopback, a Postfix smtpd with
// a per-client connection limit or smtp-sink as the upstream, and Go
// goroutines, smtp-source, swaks and Python's smtplib as clients.
//
// The processes, ports and clients come from the harness in
// e2e/internal/peers, which the benchmark in e2e/bench uses too;
// harness_test.go turns its errors into test failures.
//
// The tests carry the build tag e2e, so that "go test ./..." stays fast. Run
// them from the module root with
//
//	go test -tags e2e -count=1 -v ./e2e/
//
// They need root, Postfix (postfix, postconf, postqueue, smtp-sink,
// smtp-source), swaks, python3 and ss, and the shared peer recipes, found at
// ../../shared relative to this directory or at $SMTPPOOL_SHARED_DIR. A
// missing peer fails the run; it is never skipped. Install the peers with
//
//	../shared/peers/postfix-upstream.sh install
package e2e
