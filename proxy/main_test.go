package proxy_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine outlives them, such
// as a watch, a BDAT Data or a pool session left behind by a test's
// clients. FuzzClientStream also checks each of its inputs on its own.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
