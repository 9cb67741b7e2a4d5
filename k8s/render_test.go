package k8s

import (
	"errors"
	"fmt"
	"os"
	"path"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// treeRoot is where a tree keeps its copy of k8s/.
const treeRoot = "/repo/k8s"

// tree is an in-memory copy of the manifests under k8s/, as in a user's
// checkout: a test edits it as the docs tell users to, or breaks it on
// purpose, and renders it as `kubectl kustomize` does (kustomize's own
// library, krusty, in-process: no kubectl needed).
type tree struct {
	fs   filesys.FileSystem
	read map[string]bool // files kustomize read, relative to k8s/
}

func newTree(t *testing.T) *tree {
	t.Helper()
	fs := filesys.MakeFsInMemory()
	for _, f := range yamlFiles(t) {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := fs.WriteFile(path.Join(treeRoot, f), b); err != nil {
			t.Fatal(err)
		}
	}
	return &tree{fs: fs, read: map[string]bool{}}
}

func (tr *tree) readFile(name string) ([]byte, error) {
	return tr.fs.ReadFile(path.Join(treeRoot, name))
}

// edit replaces the first old in a file with new; the test fails if the
// file lacks old, so that a test never silently checks an unedited copy.
func (tr *tree) edit(t *testing.T, name, old, new string) {
	t.Helper()
	b, err := tr.readFile(name)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), old) {
		t.Fatalf("%s has no %q; update this test", name, old)
	}
	if err := tr.fs.WriteFile(path.Join(treeRoot, name), []byte(strings.Replace(string(b), old, new, 1))); err != nil {
		t.Fatal(err)
	}
}

// uncomment removes "# " from every line of a file that, with it, starts
// with indent + "# " + prefix.
func (tr *tree) uncomment(t *testing.T, name, indent, prefix string) {
	t.Helper()
	b, err := tr.readFile(name)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	n := 0
	for i, l := range lines {
		if rest, ok := strings.CutPrefix(l, indent+"# "+prefix); ok {
			lines[i] = indent + prefix + rest
			n++
		}
	}
	if n == 0 {
		t.Fatalf("%s has no commented-out %q lines; update this test", name, prefix)
	}
	if err := tr.fs.WriteFile(path.Join(treeRoot, name), []byte(strings.Join(lines, "\n"))); err != nil {
		t.Fatal(err)
	}
}

// recordingFS notes which files kustomize reads.
type recordingFS struct {
	filesys.FileSystem
	read map[string]bool
}

func (r recordingFS) ReadFile(p string) ([]byte, error) {
	if rel, ok := strings.CutPrefix(p, treeRoot+"/"); ok {
		r.read[rel] = true
	}
	return r.FileSystem.ReadFile(p)
}

// render runs kustomize on a directory of the tree and decodes its output
// strictly into the API types.
func (tr *tree) render(dir string) ([]any, error) {
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	m, err := k.Run(recordingFS{tr.fs, tr.read}, path.Join(treeRoot, dir))
	if err != nil {
		return nil, fmt.Errorf("kustomize build k8s/%s: %w", dir, err)
	}
	y, err := m.AsYaml()
	if err != nil {
		return nil, err
	}
	return decodeDocs("kustomize build k8s/"+dir, y)
}

// manifestSet is what a user applies in one variant, and the pods that
// result.
type manifestSet struct {
	name        string
	objects     []runtime.Object // applied by the user: checked with the API server's rules
	deployments []*appsv1.Deployment
	pods        []*corev1.Pod // as the Deployment's ReplicaSet, the Operator or the Helm chart creates them
	configMaps  map[string]*corev1.ConfigMap
	secrets     map[string]*corev1.Secret // applied, created with kubectl, or made by the Operator or chart
	kubectl     map[string]bool           // Secrets created with kubectl create secret
	appName     string                    // the chat server's container
	ownsApp     bool                      // whether this example defines the chat server's container and pod (not the Operator's or chart's)
}

func newSet(name string) *manifestSet {
	return &manifestSet{name: name, configMaps: map[string]*corev1.ConfigMap{}, secrets: map[string]*corev1.Secret{}, kubectl: map[string]bool{}, appName: appName, ownsApp: true}
}

// add takes one object applied by the user.
func (s *manifestSet) add(o any) error {
	switch o := o.(type) {
	case *appsv1.Deployment:
		s.deployments = append(s.deployments, o)
		s.objects = append(s.objects, o)
		s.pods = append(s.pods, podFromTemplate(o))
	case *corev1.ConfigMap:
		if s.configMaps[o.Name] != nil {
			return fmt.Errorf("ConfigMap %q twice", o.Name)
		}
		s.configMaps[o.Name] = o
		s.objects = append(s.objects, o)
	case *corev1.Secret:
		if s.secrets[o.Name] != nil {
			return fmt.Errorf("Secret %q twice", o.Name)
		}
		s.secrets[o.Name] = o
		s.objects = append(s.objects, o)
	default:
		return fmt.Errorf("%T: not a kind the examples apply", o)
	}
	return nil
}

// podFromTemplate is a pod as a Deployment's ReplicaSet creates it.
func podFromTemplate(d *appsv1.Deployment) *corev1.Pod {
	p := &corev1.Pod{ObjectMeta: *d.Spec.Template.ObjectMeta.DeepCopy(), Spec: *d.Spec.Template.Spec.DeepCopy()}
	p.Name = d.Name + "-5f7c9d8b6d-x2k4p"
	if p.Labels == nil {
		p.Labels = map[string]string{}
	}
	p.Labels["pod-template-hash"] = "5f7c9d8b6d"
	return p
}

// variant is one way the docs tell users to apply the manifests.
type variant struct {
	name string
	dir  string // the kustomization applied with kubectl apply -k
	// edit makes the change the docs tell users to make, if any.
	edit func(t *testing.T, tr *tree)
	// kubectlSecrets: the user creates the Secrets with the docs'
	// `kubectl create secret` commands instead of applying files.
	kubectlSecrets bool
	// chatServer adds the chat server's pod made by the Mattermost
	// Operator or Helm chart, from the example's file in the tree.
	chatServer func(tr *tree, set *manifestSet) error
	// sidecar: how smtppool runs in the pod: "init" (native sidecar),
	// "container" (an ordinary container), or "" (no pod: smtppool's
	// objects alone).
	sidecar string
}

// keepSecretsOutOfFiles is what k8s/README.md and the secret files tell
// users who create their Secrets with kubectl.
func keepSecretsOutOfFiles(t *testing.T, tr *tree) {
	tr.edit(t, "config/kustomization.yaml", "  - secret.yaml\n", "")
	tr.edit(t, "kustomization.yaml", "  - mattermost-db\n", "")
	tr.edit(t, "legacy/kustomization.yaml", "  - ../mattermost-db\n", "")
}

// useMicrosoftOAuth2 is what config/configmap.yaml, config/secret.yaml and
// k8s/README.md tell Microsoft 365 users to do.
func useMicrosoftOAuth2(t *testing.T, tr *tree) {
	tr.edit(t, "config/configmap.yaml", "  SMTPPOOL_UPSTREAM_PASSWORD_FILE: \"/run/secrets/smtppool/password\"\n", "")
	tr.uncomment(t, "config/configmap.yaml", "  ", "SMTPPOOL_")
	tr.edit(t, "config/secret.yaml", "  password: \"replace-me\"\n", "")
	tr.uncomment(t, "config/secret.yaml", "  ", "oauth2-client-secret:")
}

func variants() []variant {
	return []variant{
		{name: "example", dir: ".", sidecar: "init"},
		{name: "legacy", dir: "legacy", sidecar: "container"},
		{name: "example, secrets created with kubectl", dir: ".", edit: keepSecretsOutOfFiles, kubectlSecrets: true, sidecar: "init"},
		{name: "legacy, secrets created with kubectl", dir: "legacy", edit: keepSecretsOutOfFiles, kubectlSecrets: true, sidecar: "container"},
		{name: "example, Microsoft 365 with OAuth2", dir: ".", edit: useMicrosoftOAuth2, sidecar: "init"},
		{name: "existing installation", dir: "config"},
		{name: "existing installation, secret created with kubectl", dir: "config", edit: keepSecretsOutOfFiles, kubectlSecrets: true},
		{name: "Mattermost Operator", dir: "config", chatServer: operatorPod, sidecar: "init"},
		{name: "Mattermost Operator, secret created with kubectl", dir: "config", edit: keepSecretsOutOfFiles, kubectlSecrets: true, chatServer: operatorPod, sidecar: "init"},
		{name: "Mattermost Helm chart", dir: "config", chatServer: helmPod, sidecar: "init"},
	}
}

func findVariant(t *testing.T, name string) variant {
	t.Helper()
	for _, v := range variants() {
		if v.name == name {
			return v
		}
	}
	t.Fatalf("no variant %q", name)
	return variant{}
}

// build renders a variant from a tree (already edited) into what the user
// applies, plus the Secrets the docs create with kubectl and the pods
// that result.
func (v variant) build(tr *tree) (*manifestSet, error) {
	set := newSet(v.name)
	objs, err := tr.render(v.dir)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, o := range objs {
		errs = append(errs, set.add(o))
	}
	if v.kubectlSecrets {
		secrets, err := kubectlCreatedSecrets()
		if err != nil {
			return nil, err
		}
		for _, s := range secrets {
			// With smtppool's objects alone (k8s/config/), the chat
			// server's database Secret is not the user's to create.
			if set.secrets[s.Name] == nil && (s.Name == sidecarSecret || v.dir != "config") {
				errs = append(errs, set.add(s))
				set.kubectl[s.Name] = true
			}
		}
	}
	if v.chatServer != nil {
		errs = append(errs, v.chatServer(tr, set))
	}
	return set, errors.Join(errs...)
}

// buildVariant builds a variant from a fresh copy of the tree, with the
// docs' edit made.
func buildVariant(t *testing.T, v variant) (*manifestSet, *tree) {
	t.Helper()
	tr := newTree(t)
	if v.edit != nil {
		v.edit(t, tr)
	}
	set, err := v.build(tr)
	if err != nil {
		t.Fatal(err)
	}
	return set, tr
}
