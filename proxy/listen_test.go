package proxy_test

import (
	"net"
	"strings"
	"testing"
)

// TestMultiLineReplyLeavesInOneWrite: the EHLO reply's lines reach the
// client together, not one system call each.
func TestMultiLineReplyLeavesInOneWrite(t *testing.T) {
	e := newEnv(t, options{})
	conn, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	buf := make([]byte, 4096)
	n, err := conn.Read(buf)
	if err != nil || !strings.HasPrefix(string(buf[:n]), "220 ") {
		t.Fatalf("greeting: %q, %v", buf[:n], err)
	}
	if _, err := conn.Write([]byte("EHLO client.test\r\n")); err != nil {
		t.Fatal(err)
	}
	n, err = conn.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(string(buf[:n]), "\r\n"), "\r\n")
	if len(lines) < 5 || !strings.HasPrefix(lines[len(lines)-1], "250 ") {
		t.Errorf("one read returned %d lines %q, want the whole EHLO reply", len(lines), lines)
	}
	if _, err := conn.Write([]byte("QUIT\r\n")); err != nil {
		t.Fatal(err)
	}
	n, _ = conn.Read(buf)
	if !strings.HasPrefix(string(buf[:n]), "221 ") {
		t.Errorf("QUIT reply %q, want 221 before the close", buf[:n])
	}
}
