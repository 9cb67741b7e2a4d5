package k8s

import (
	"fmt"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The docs that tell users what to run: the README's Kubernetes
// paragraph, k8s/README.md, and the comments in the manifests.
func docs(t *testing.T) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, f := range append([]string{filepath.Join("..", "README.md"), "README.md"}, yamlFiles(t)...) {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out[f] = string(b)
	}
	return out
}

var createSecretRE = regexp.MustCompile(`kubectl create secret generic (\S+)((?: --from-(?:file|literal)=[^=\s]+=\S+)+)`)

// kubectlCreatedSecrets are the Secrets that k8s/README.md tells users to
// create with `kubectl create secret generic` instead of applying the
// example's files, with the keys its commands give them.
func kubectlCreatedSecrets() ([]*corev1.Secret, error) {
	b, err := os.ReadFile("README.md")
	if err != nil {
		return nil, err
	}
	return parseCreateSecrets(string(b))
}

func parseCreateSecrets(text string) ([]*corev1.Secret, error) {
	var out []*corev1.Secret
	for _, m := range createSecretRE.FindAllStringSubmatch(text, -1) {
		s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: m[1]}, Type: corev1.SecretTypeOpaque, Data: map[string][]byte{}}
		for _, arg := range strings.Fields(m[2]) {
			_, kv, _ := strings.Cut(arg, "=")
			key, _, _ := strings.Cut(kv, "=")
			s.Data[key] = []byte("from kubectl")
		}
		if slices.ContainsFunc(out, func(o *corev1.Secret) bool { return o.Name == s.Name }) {
			return nil, fmt.Errorf("k8s/README.md creates Secret %s twice", s.Name)
		}
		out = append(out, s)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("k8s/README.md has no `kubectl create secret generic` command")
	}
	return out, nil
}

// TestDocsCommandsMatchTheLayout checks the commands the docs give against
// the files: every `kubectl apply -k` names a kustomization that a variant
// of TestVariants renders, every `kubectl apply -f` or `helm ... -f` a
// stand-alone example that a test checks, and every `kubectl create
// secret` in a manifest's comment is one of k8s/README.md's.
func TestDocsCommandsMatchTheLayout(t *testing.T) {
	rendered := map[string]bool{}
	for _, v := range variants() {
		rendered[path.Clean(path.Join("k8s", v.dir))] = true
	}
	readmeSecrets, err := kubectlCreatedSecrets()
	if err != nil {
		t.Fatal(err)
	}
	applyK := regexp.MustCompile(`kubectl apply -k (\S+)`)
	applyF := regexp.MustCompile(`(?:kubectl apply|helm [^\n]*?) -f (k8s/\S+)`)
	seen := 0
	for f, text := range docs(t) {
		for _, m := range applyK.FindAllStringSubmatch(text, -1) {
			seen++
			if dir := path.Clean(strings.TrimRight(strings.Trim(m[1], "`"), "`).,;:")); !rendered[dir] {
				t.Errorf("%s: `kubectl apply -k %s`, which no variant of TestVariants renders", f, m[1])
			}
		}
		for _, m := range applyF.FindAllStringSubmatch(text, -1) {
			seen++
			file := strings.TrimPrefix(path.Clean(strings.TrimRight(strings.Trim(m[1], "`"), "`).,;:")), "k8s/")
			if standalone[file] == "" {
				t.Errorf("%s: `-f %s`, which is no stand-alone example a test checks", f, m[1])
			}
		}
		if f == "README.md" {
			continue
		}
		secrets, err := parseCreateSecrets(text)
		if err != nil {
			continue // none here
		}
		for _, s := range secrets {
			i := slices.IndexFunc(readmeSecrets, func(r *corev1.Secret) bool { return r.Name == s.Name })
			if i < 0 || !slices.Equal(sortedKeys(s.Data), sortedKeys(readmeSecrets[i].Data)) {
				t.Errorf("%s: `kubectl create secret generic %s` with keys %v, unlike k8s/README.md's", f, s.Name, sortedKeys(s.Data))
			}
		}
	}
	if seen < 5 {
		t.Errorf("found only %d kubectl apply commands in the docs; is this test still reading them?", seen)
	}
}

func sortedKeys(m map[string][]byte) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}
