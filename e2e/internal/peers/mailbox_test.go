package peers

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// A copy's queue id is the one in the Received header of Postfix's smtpd
// (the topmost), whatever Received headers the message came with; copies
// group by it.
func TestMailboxReadsPostfixQueueIDs(t *testing.T) {
	dir := t.TempDir()
	files := map[string]string{
		// As Postfix's virtual delivery agent writes it (taken from one).
		"1": "Return-Path: <chat@client.e2e.test>\r\nDelivered-To: user1@test.example\r\n" +
			"Received: from smtppool.e2e.test (unknown [127.0.0.1])\r\n\tby upstream.test (Postfix) with ESMTP id C4B8D986A01\r\n" +
			"\tfor <user1@test.example>; Fri,  4 Dec 2026 19:37:30 +0000 (UTC)\r\n" +
			"Received: from relay.example (relay.example [192.0.2.1])\r\n\tby other.example (Postfix) with ESMTP id 0000000000A\r\n\tfor <x@y>; Fri,  4 Dec 2026 19:37:29 +0000 (UTC)\r\n" +
			"Message-ID: <m1@test>\r\n\r\nbody\r\n",
		// The same queue file delivered again.
		"2": "Received: from smtppool.e2e.test (unknown [127.0.0.1])\r\n\tby upstream.test (Postfix) with ESMTP id C4B8D986A01\r\n\tfor <user1@test.example>; Fri,  4 Dec 2026 19:37:35 +0000 (UTC)\r\n" +
			"Message-ID: <m1@test>\r\n\r\nbody\r\n",
		// Sent again, over TLS.
		"3": "Received: from smtppool.e2e.test (unknown [127.0.0.1])\r\n\tby upstream.test (Postfix) with ESMTPS id 4FzQ1x2Yb3\r\n\tfor <user1@test.example>; Fri,  4 Dec 2026 19:37:40 +0000 (UTC)\r\n" +
			"Message-ID: <m1@test>\r\n\r\nbody\r\n",
		// smtp-sink adds no Received header.
		"4": "Message-ID: <m2@test>\r\n\r\nbody\r\n",
	}
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	box := Mailbox{}
	if err := box.add(dir); err != nil {
		t.Fatal(err)
	}
	by := ByQueueID(box["<m1@test>"])
	if len(by) != 2 || len(by["C4B8D986A01"]) != 2 || len(by["4FzQ1x2Yb3"]) != 1 {
		t.Errorf("copies of <m1@test> by queue id: %v; want 2 with C4B8D986A01 and 1 with 4FzQ1x2Yb3", by)
	}
	if m2 := box["<m2@test>"]; len(m2) != 1 || m2[0].QueueID != "" {
		t.Errorf("copies of <m2@test>: %+v; want one without a queue id", m2)
	}
}

// After a stop, a queue file that a killed cleanup left unfinished (mode
// 0600, as it creates them; an empty incoming/582332.22886 in one run of
// TestUpstreamRestartMidBurst) is never delivered: WaitDeliveredAfterStop
// does not wait for it, while WaitDelivered, which counts every queue file,
// does. A finished queue file (owner-execute set) is waited for by both.
func TestWaitDeliveredAfterStopSkipsUnfinishedQueueFiles(t *testing.T) {
	dir := t.TempDir()
	p := newPostfix(dir, 0)
	maildir := filepath.Join(dir, "mail", "sink", "new")
	incoming := filepath.Join(dir, "spool", "incoming")
	for _, d := range []string{maildir, incoming} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	want := NewMessages("afterstop", 2)
	for i, m := range want {
		if err := os.WriteFile(filepath.Join(maildir, fmt.Sprint(i)), m.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	unfinished := filepath.Join(incoming, "582332.22886")
	if err := os.WriteFile(unfinished, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	box, err := p.WaitDeliveredAfterStop(ctx, want, 2*time.Second)
	if err != nil {
		t.Fatalf("WaitDeliveredAfterStop with an unfinished queue file: %v", err)
	}
	if len(box) != len(want) {
		t.Errorf("mailbox holds %d messages, want %d", len(box), len(want))
	}
	if _, err := p.WaitDelivered(ctx, want, 300*time.Millisecond); err == nil {
		t.Errorf("WaitDelivered returned with a queue file in incoming/; it counts every queue file")
	}
	if err := os.Chmod(unfinished, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := p.WaitDeliveredAfterStop(ctx, want, 300*time.Millisecond); err == nil {
		t.Errorf("WaitDeliveredAfterStop returned with a finished queue file in incoming/")
	}
}
