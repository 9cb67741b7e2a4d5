package proxy

import "testing"

// TestChunkCounterFindsGoSMTPsCount: the declared size of BDAT chunks is
// read from go-smtp's unexported count. A go-smtp that renames it turns
// BDAT off (502, clients use DATA); this test says so at the upgrade.
func TestChunkCounterFindsGoSMTPsCount(t *testing.T) {
	if newChunkCounter().field == nil {
		t.Fatal("go-smtp's Conn has no int64 bytesReceived any more: BDAT is refused until chunks.go reads the declared sizes another way")
	}
}
