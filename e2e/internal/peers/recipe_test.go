package peers

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestSharedRecipeCopyIsCurrent checks that the repository's copy of the
// shared Postfix recipe (e2e/shared, used where the shared folder is not
// beside the repository, as on GitHub's runners) is the shared one, byte
// for byte, wherever the shared folder is there to compare with.
func TestSharedRecipeCopyIsCurrent(t *testing.T) {
	moduleRoot, err := filepath.Abs(filepath.Join("..", "..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	const recipe = "peers/postfix-upstream.sh"
	copied, err := os.ReadFile(filepath.Join(moduleRoot, "e2e", "shared", recipe))
	if err != nil {
		t.Fatalf("the repository's copy of the recipe: %v", err)
	}
	shared := filepath.Join(moduleRoot, "..", "shared")
	original, err := os.ReadFile(filepath.Join(shared, recipe))
	if os.IsNotExist(err) {
		t.Skipf("no shared folder at %s to compare the copy with", shared)
	}
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(copied, original) {
		t.Errorf("e2e/shared/%s differs from %s/%s: copy it again", recipe, shared, recipe)
	}
}
