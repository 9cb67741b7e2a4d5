package k8s

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"go/ast"
	"go/constant"
	"go/parser"
	"go/token"
	"go/types"
	"io"
	"io/fs"
	"net"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// The example's names, which the README and the manifests' comments use.
const (
	sidecarName     = "smtppool"
	sidecarSecret   = "smtppool-upstream" // smtppool's Secret
	appName         = "mattermost"
	adminPortName   = "admin"
	adminPort       = 9025
	smtpPort        = "2525"
	defaultGraceSec = 30 // Kubernetes' default terminationGracePeriodSeconds
)

// standalone lists the manifests that no kustomization includes, on
// purpose, and the tests that check them: the PodMonitors and the
// PrometheusRule need the Prometheus Operator's CRDs, the Mattermost
// resource is to merge into one's own, and the Helm values are passed to
// helm.
var standalone = map[string]string{
	"podmonitor.yaml":                "TestPodMonitors",
	"operator/podmonitor.yaml":       "TestPodMonitors",
	operatorFile:                     "TestVariants (Mattermost Operator)",
	helmFile:                         "TestVariants (Mattermost Helm chart)",
	"monitoring/prometheusrule.yaml": "TestEveryManifestDecodesStrictly here; its rules by monitoring/'s tests",
}

// kustomization is the part of kustomize's Kustomization that the example
// uses. Strict decoding into it rejects any other field, so a field added
// here must be one kustomize knows.
type kustomization struct {
	APIVersion string           `json:"apiVersion"`
	Kind       string           `json:"kind"`
	Resources  []string         `json:"resources,omitempty"`
	Images     []kustomizeImage `json:"images,omitempty"`
}

// kustomizeImage is an entry of a Kustomization's images.
type kustomizeImage struct {
	Name    string `json:"name"`
	NewName string `json:"newName,omitempty"`
	NewTag  string `json:"newTag,omitempty"`
}

// newObject returns the API type for an apiVersion and kind.
func newObject(apiVersion, kind string) (any, error) {
	switch apiVersion + " " + kind {
	case "apps/v1 Deployment":
		return &appsv1.Deployment{}, nil
	case "v1 ConfigMap":
		return &corev1.ConfigMap{}, nil
	case "v1 Secret":
		return &corev1.Secret{}, nil
	case "monitoring.coreos.com/v1 PodMonitor":
		return &monitoringv1.PodMonitor{}, nil
	case "monitoring.coreos.com/v1 PrometheusRule":
		return &monitoringv1.PrometheusRule{}, nil
	case "kustomize.config.k8s.io/v1beta1 Kustomization":
		return &kustomization{}, nil
	case "installation.mattermost.com/v1beta1 Mattermost":
		return &mattermostResource{}, nil
	}
	return nil, fmt.Errorf("apiVersion %q kind %q: not a type this test knows", apiVersion, kind)
}

// decodeStrict decodes one YAML document into the API type its apiVersion
// and kind name, rejecting unknown and duplicate fields, as the API server
// does with kubectl's --validate=strict.
func decodeStrict(doc []byte) (any, error) {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return nil, err
	}
	obj, err := newObject(tm.APIVersion, tm.Kind)
	if err != nil {
		return nil, err
	}
	if err := yaml.UnmarshalStrict(doc, obj); err != nil {
		return nil, fmt.Errorf("%s: %w", tm.Kind, err)
	}
	return obj, nil
}

// decodeFile decodes every document of a YAML file; the Helm values, which
// are no Kubernetes object, into the values the example may set.
func decodeFile(name string) ([]any, error) {
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	if name == helmFile {
		var v helmValues
		if err := yaml.UnmarshalStrict(b, &v); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		return []any{&v}, nil
	}
	return decodeDocs(name, b)
}

// decodeDocs decodes every document of a YAML stream strictly.
func decodeDocs(name string, b []byte) ([]any, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
	var objs []any
	for i := 1; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		if isEmptyDoc(doc) {
			continue
		}
		obj, err := decodeStrict(doc)
		if err != nil {
			return nil, fmt.Errorf("%s, document %d: %w", name, i, err)
		}
		objs = append(objs, obj)
	}
	if len(objs) == 0 {
		return nil, fmt.Errorf("%s: no document", name)
	}
	return objs, nil
}

// isEmptyDoc reports whether a document holds only comments and blanks.
func isEmptyDoc(doc []byte) bool {
	for _, l := range strings.Split(string(doc), "\n") {
		l = strings.TrimSpace(l)
		if l != "" && l != "---" && !strings.HasPrefix(l, "#") {
			return false
		}
	}
	return true
}

// yamlFiles lists every YAML file under the k8s directory.
func yamlFiles(t *testing.T) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(".", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && (strings.HasSuffix(p, ".yaml") || strings.HasSuffix(p, ".yml")) {
			files = append(files, filepath.ToSlash(p))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no YAML file found")
	}
	return files
}

// TestEveryManifestDecodesStrictly decodes every YAML document under k8s/
// into its official API type (kustomization.yaml into the fields kustomize
// has), with unknown fields rejected: a misspelt or misplaced field fails
// here instead of being dropped silently by a cluster.
func TestEveryManifestDecodesStrictly(t *testing.T) {
	for _, f := range yamlFiles(t) {
		objs, err := decodeFile(f)
		if err != nil {
			t.Error(err)
			continue
		}
		for _, o := range objs {
			t.Logf("%s: %T", f, o)
		}
	}
}

// TestStrictDecodingRejectsMistakes makes sure the decoding above is
// strict: it must refuse a misspelt field and a field at the wrong level.
func TestStrictDecodingRejectsMistakes(t *testing.T) {
	good, err := os.ReadFile("deployment.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := decodeStrict(good); err != nil {
		t.Fatalf("deployment.yaml: %v", err)
	}
	for name, mutate := range map[string]func(string) string{
		"misspelt field": func(s string) string {
			return strings.Replace(s, "\n          restartPolicy: Always", "\n          restartPolicyy: Always", 1)
		},
		"field at the wrong level": func(s string) string {
			return strings.Replace(s, "      terminationGracePeriodSeconds:", "      startupProbe: {}\n      terminationGracePeriodSeconds:", 1)
		},
		"duplicate field": func(s string) string {
			return strings.Replace(s, "  replicas: 1\n", "  replicas: 1\n  replicas: 2\n", 1)
		},
		"unknown kind": func(s string) string {
			return strings.Replace(s, "kind: Deployment", "kind: Deploymnet", 1)
		},
	} {
		bad := mutate(string(good))
		if bad == string(good) {
			t.Fatalf("%s: the mutation did not apply; update this test", name)
		}
		if _, err := decodeStrict([]byte(bad)); err == nil {
			t.Errorf("%s: decoded without error", name)
		}
	}
}

// TestVariants renders every way the docs tell users to apply the
// manifests (see variants) and checks the result: Kubernetes' own rules
// (the API server's validation with defaults applied, and Pod Security
// restricted), then what the README promises (checkPod and the checks per
// variant).
func TestVariants(t *testing.T) {
	for _, v := range variants() {
		t.Run(v.name, func(t *testing.T) {
			set, _ := buildVariant(t, v)
			if err := validateSet(set); err != nil {
				t.Fatalf("rejected by Kubernetes' rules:\n%v", err)
			}
			checkVariant(t, v, set)
		})
	}
}

// checkVariant checks what the README promises of a variant.
func checkVariant(t reporter, v variant, set *manifestSet) {
	t.Helper()
	if cm := set.configMaps[sidecarName]; cm == nil {
		t.Fatalf("no ConfigMap %q", sidecarName)
	}
	if v.sidecar == "" {
		// smtppool's own objects alone, for an existing installation:
		// nothing of the chat server's, which would overwrite a real one.
		if len(set.deployments) != 0 || len(set.pods) != 0 {
			t.Errorf("k8s/%s applies a workload; it must hold smtppool's objects alone", v.dir)
		}
		for _, o := range set.objects {
			m, _ := meta.Accessor(o)
			if set.kubectl[m.GetName()] {
				continue
			}
			if m.GetLabels()["app.kubernetes.io/name"] != sidecarName {
				t.Errorf("k8s/%s applies %T %s, which is not smtppool's (label app.kubernetes.io/name: %s)", v.dir, o, m.GetName(), sidecarName)
			}
		}
		if set.secrets[sidecarSecret] == nil {
			t.Errorf("no Secret %s", sidecarSecret)
		}
		return
	}
	if len(set.pods) != 1 {
		t.Fatalf("%d pods, want 1", len(set.pods))
	}
	p := set.pods[0]
	var sc *corev1.Container
	switch v.sidecar {
	case "init":
		sc = findContainer(p.Spec.InitContainers, sidecarName)
		if sc == nil {
			t.Fatalf("no init container %q", sidecarName)
		}
		checkNativeSidecar(t, &p.Spec, sc)
	case "container":
		sc = findContainer(p.Spec.Containers, sidecarName)
		if sc == nil {
			t.Fatalf("no container %q", sidecarName)
		}
		if len(p.Spec.InitContainers) != 0 {
			t.Errorf("legacy variant has init containers %v; clusters before 1.29 would run them to completion first", p.Spec.InitContainers)
		}
		if sc.RestartPolicy != nil {
			t.Errorf("%s: restartPolicy set on an app container", sc.Name)
		}
	}
	for _, d := range set.deployments {
		sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
		if err != nil || sel.Empty() || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
			t.Errorf("Deployment selector %v does not select its pod template's labels %v (%v)", d.Spec.Selector, d.Spec.Template.Labels, err)
		}
	}
	checkPod(t, set, p, sc)
}

// checkNativeSidecar: smtppool is an init container with restartPolicy
// Always, which the app containers wait for, and not also an app
// container.
func checkNativeSidecar(t reporter, spec *corev1.PodSpec, sc *corev1.Container) {
	t.Helper()
	if sc.RestartPolicy == nil || *sc.RestartPolicy != corev1.ContainerRestartPolicyAlways {
		got := "unset"
		if sc.RestartPolicy != nil {
			got = string(*sc.RestartPolicy)
		}
		t.Errorf("init container %s: restartPolicy %s, want Always (a native sidecar)", sc.Name, got)
	}
	if findContainer(spec.Containers, sidecarName) != nil {
		t.Errorf("%s is both an init container and an app container", sidecarName)
	}
}

// TestEveryManifestIsUsed checks that every manifest under k8s/ is read by
// a variant's kustomization or is a stand-alone example that a test
// checks, so that no file is left out of the tests (or of the example).
func TestEveryManifestIsUsed(t *testing.T) {
	tr := newTree(t)
	dirs := map[string]bool{}
	for _, v := range variants() {
		if !dirs[v.dir] {
			dirs[v.dir] = true
			if _, err := tr.render(v.dir); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, f := range yamlFiles(t) {
		if tr.read[f] || standalone[f] != "" {
			continue
		}
		t.Errorf("%s is in no kustomization that the tests render, and not a known stand-alone example", f)
	}
}

// TestImages: every smtppool container runs the released image, and each
// kustomization that deploys it has an images entry, where users point it
// at their own registry.
func TestImages(t *testing.T) {
	const want = "ghcr.io/smtppool/smtppool:v0.1.0"
	for _, v := range variants() {
		if v.sidecar == "" {
			continue
		}
		set, tr := buildVariant(t, v)
		sc := findContainer(append(set.pods[0].Spec.InitContainers, set.pods[0].Spec.Containers...), sidecarName)
		if sc == nil || sc.Image != want {
			t.Errorf("%s: smtppool image %v, want %s", v.name, sc, want)
		}
		if v.chatServer != nil {
			continue
		}
		objs, err := decodeDocs(v.dir, must(tr.readFile(path.Join(v.dir, "kustomization.yaml"))))
		if err != nil {
			t.Fatal(err)
		}
		k := objs[0].(*kustomization)
		name, _, _ := strings.Cut(want, ":")
		if !slices.ContainsFunc(k.Images, func(i kustomizeImage) bool { return i.Name == name }) {
			t.Errorf("k8s/%s/kustomization.yaml has no images entry for %s", v.dir, name)
		}
	}
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}

func allContainers(spec *corev1.PodSpec) []*corev1.Container {
	var cs []*corev1.Container
	for i := range spec.InitContainers {
		cs = append(cs, &spec.InitContainers[i])
	}
	for i := range spec.Containers {
		cs = append(cs, &spec.Containers[i])
	}
	return cs
}

func findContainer(cs []corev1.Container, name string) *corev1.Container {
	for i := range cs {
		if cs[i].Name == name {
			return &cs[i]
		}
	}
	return nil
}

// TestLegacyVariant checks that the two-container variant is exactly the
// native-sidecar one, but for smtppool being an ordinary container, so
// that the two cannot drift apart.
func TestLegacyVariant(t *testing.T) {
	native, _ := buildVariant(t, findVariant(t, "example"))
	set, _ := buildVariant(t, findVariant(t, "legacy"))
	legacy := set.deployments[0]
	want := native.deployments[0].DeepCopy()
	ws := &want.Spec.Template.Spec
	moved := *findContainer(ws.InitContainers, sidecarName)
	moved.RestartPolicy = nil
	ws.InitContainers = nil
	ws.Containers = append([]corev1.Container{moved}, ws.Containers...)
	if !equality.Semantic.DeepEqual(want, legacy) {
		wb, _ := yaml.Marshal(want)
		lb, _ := yaml.Marshal(legacy)
		t.Errorf("legacy/deployment.yaml differs from deployment.yaml beyond moving the sidecar:\nwant (from deployment.yaml):\n%s\ngot:\n%s", wb, lb)
	}
}

// checkPod checks what every variant's pod shares: smtppool's probes,
// configuration, secrets, security and resources; the chat server's SMTP
// settings; the grace period; the metrics annotations.
func checkPod(t reporter, set *manifestSet, pod *corev1.Pod, sc *corev1.Container) {
	t.Helper()
	spec := &pod.Spec

	// The admin port and the probes.
	port := findPort(sc, adminPortName)
	if port == nil || port.ContainerPort != adminPort {
		t.Errorf("%s: want a container port named %q, %d; got %+v", sc.Name, adminPortName, adminPort, sc.Ports)
	}
	checkProbe(t, sc, "startupProbe", sc.StartupProbe, "/healthz")
	checkProbe(t, sc, "readinessProbe", sc.ReadinessProbe, "/readyz")
	checkProbe(t, sc, "livenessProbe", sc.LivenessProbe, "/healthz")
	if p := sc.StartupProbe; p != nil && p.PeriodSeconds*p.FailureThreshold < 10 {
		t.Errorf("startupProbe gives smtppool only %d s to start", p.PeriodSeconds*p.FailureThreshold)
	}
	// Only restartable init containers may have probes; an ordinary init
	// container before the sidecar would also delay it.
	for _, c := range spec.InitContainers {
		if c.RestartPolicy == nil && (c.StartupProbe != nil || c.ReadinessProbe != nil || c.LivenessProbe != nil) {
			t.Errorf("init container %s has probes but is not a sidecar", c.Name)
		}
	}

	// Configuration: from the ConfigMap, with the admin endpoint on the pod
	// IP (where the kubelet probes) and SMTP on loopback.
	if len(sc.EnvFrom) != 1 || sc.EnvFrom[0].ConfigMapRef == nil {
		t.Fatalf("%s: want envFrom one ConfigMap, got %+v", sc.Name, sc.EnvFrom)
	}
	cm := set.configMaps[sc.EnvFrom[0].ConfigMapRef.Name]
	if cm == nil {
		t.Fatalf("%s: envFrom ConfigMap %q is not applied", sc.Name, sc.EnvFrom[0].ConfigMapRef.Name)
	}
	env := map[string]string{}
	for k, v := range cm.Data {
		env[k] = v
	}
	for _, e := range sc.Env {
		if e.ValueFrom != nil {
			t.Errorf("%s: env %s comes from %+v; smtppool's settings come from the ConfigMap, its secrets from files", sc.Name, e.Name, e.ValueFrom)
		}
		env[e.Name] = e.Value
	}
	host, p, err := net.SplitHostPort(env["SMTPPOOL_ADMIN_ADDR"])
	if err != nil || p != strconv.Itoa(adminPort) || (host != "" && host != "0.0.0.0" && host != "::") {
		t.Errorf("SMTPPOOL_ADMIN_ADDR=%q: want :%d, on every interface, so that the kubelet reaches it (%v)", env["SMTPPOOL_ADMIN_ADDR"], adminPort, err)
	}
	host, p, err = net.SplitHostPort(env["SMTPPOOL_LISTEN_ADDR"])
	if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() || p != smtpPort {
		t.Errorf("SMTPPOOL_LISTEN_ADDR=%q: want loopback port %s, reachable only inside the pod", env["SMTPPOOL_LISTEN_ADDR"], smtpPort)
	}
	if _, ok := env["SMTPPOOL_ALLOW_REMOTE_CLIENTS"]; ok {
		t.Errorf("SMTPPOOL_ALLOW_REMOTE_CLIENTS is set; smtppool no longer has it and refuses to start")
	}
	if nets, ok := env["SMTPPOOL_ALLOWED_NETWORKS"]; ok {
		// Unset, only loopback may connect: the sidecar's one client is in the pod.
		for _, n := range strings.Split(nets, ",") {
			ip, _, err := net.ParseCIDR(strings.TrimSpace(n))
			if err != nil || !ip.IsLoopback() {
				t.Errorf("SMTPPOOL_ALLOWED_NETWORKS=%q: want loopback networks only, for the chat server in the pod", nets)
			}
		}
	}
	if env["SMTPPOOL_UPSTREAM_ADDR"] == "" {
		t.Error("SMTPPOOL_UPSTREAM_ADDR is not set")
	}
	// The greeting and EHLO name: unset, it would be the pod's name, which
	// relays that check the EHLO name refuse.
	if h := env["SMTPPOOL_HOSTNAME"]; !isFQDN(h) {
		t.Errorf("SMTPPOOL_HOSTNAME=%q: want a fully qualified domain name, not the pod's name", h)
	}
	known := readmeVariables(t)
	for k := range env {
		if k == "GOMEMLIMIT" || k == "AUTOMEMLIMIT" {
			continue // the Go runtime's and automemlimit's, which smtppool honours (README.md, Client capacity)
		}
		if !known[k] {
			t.Errorf("%s: variable %s is not one of smtppool's (README.md's Configuration)", sc.Name, k)
		}
	}
	checkSecretFiles(t, set, spec, sc, env)

	// The chat server sends to the sidecar.
	app := findContainer(spec.Containers, set.appName)
	if app == nil {
		t.Fatalf("no container %s", set.appName)
	}
	appEnv := map[string]string{}
	for _, e := range app.Env {
		appEnv[e.Name] = e.Value
	}
	for k, want := range map[string]string{
		"MM_EMAILSETTINGS_SMTPSERVER":             "localhost",
		"MM_EMAILSETTINGS_SMTPPORT":               smtpPort,
		"MM_EMAILSETTINGS_CONNECTIONSECURITY":     "",
		"MM_EMAILSETTINGS_ENABLESMTPAUTH":         "false",
		"MM_EMAILSETTINGS_SENDEMAILNOTIFICATIONS": "true",
	} {
		if got, ok := appEnv[k]; !ok || got != want {
			t.Errorf("%s: %s=%q (set: %v), want %q", set.appName, k, got, ok, want)
		}
	}
	for _, e := range app.Env {
		if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
			ref := e.ValueFrom.SecretKeyRef
			if s := set.secrets[ref.Name]; s == nil || !secretHasKey(s, ref.Key) {
				t.Errorf("%s: env %s refers to secret %s key %s, which is not applied", set.appName, e.Name, ref.Name, ref.Key)
			}
		}
	}

	// Security and resources, for every container the example defines.
	for _, c := range allContainers(spec) {
		if c.Name == sidecarName || set.ownsApp {
			checkSecurity(t, spec, c, c.Name == sidecarName, set.ownsApp)
			checkResources(t, c)
		}
	}
	wantUser := dockerfileUser(t)
	if sc.SecurityContext == nil || sc.SecurityContext.RunAsUser == nil || *sc.SecurityContext.RunAsUser != wantUser {
		t.Errorf("%s: runAsUser should be %d, the image's USER", sc.Name, wantUser)
	}
	checkCapacity(t, sc, env)

	// The grace period: the chat server stops first, within the same
	// period, then smtppool drains. Leave the chat server at least 10 s.
	grace := int64(defaultGraceSec)
	if spec.TerminationGracePeriodSeconds != nil {
		grace = *spec.TerminationGracePeriodSeconds
	}
	drain := mustDuration(t, env, "SMTPPOOL_SHUTDOWN_TIMEOUT")
	if time.Duration(grace)*time.Second < drain+10*time.Second {
		t.Errorf("terminationGracePeriodSeconds %d leaves less than 10 s to the chat server before smtppool's %v drain", grace, drain)
	}

	// Prometheus annotations point at the admin port.
	ann := pod.Annotations
	if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/port"] != strconv.Itoa(adminPort) || ann["prometheus.io/path"] != "/metrics" {
		t.Errorf("pod annotations %v: want prometheus.io/scrape, port %d and path /metrics", ann, adminPort)
	}

	// Every Secret a volume names is applied (or made by the user with
	// kubectl, or by the Operator or chart).
	for _, v := range spec.Volumes {
		if v.Secret != nil && set.secrets[v.Secret.SecretName] == nil {
			t.Errorf("volume %s: Secret %s is not applied", v.Name, v.Secret.SecretName)
		}
	}
}

// isFQDN reports whether name is a domain name of at least two labels.
func isFQDN(name string) bool {
	labels := strings.Split(strings.TrimSuffix(name, "."), ".")
	if len(name) > 253 || len(labels) < 2 {
		return false
	}
	for _, l := range labels {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for _, c := range l {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

// readmeVariables lists the SMTPPOOL_ variables that README.md's
// Configuration table names (which a test of the root module ties to
// smtppool -h).
func readmeVariables(t reporter) map[string]bool {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	vars := map[string]bool{}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "| `SMTPPOOL_") {
			cell, _, _ := strings.Cut(line[1:], "|")
			for _, m := range regexp.MustCompile("`(SMTPPOOL_[A-Z0-9_]+)`").FindAllStringSubmatch(cell, -1) {
				vars[m[1]] = true
			}
		}
	}
	if len(vars) < 10 {
		t.Fatalf("README.md: found only %d variables in the Configuration table", len(vars))
	}
	return vars
}

func findPort(c *corev1.Container, name string) *corev1.ContainerPort {
	for i := range c.Ports {
		if c.Ports[i].Name == name {
			return &c.Ports[i]
		}
	}
	return nil
}

func checkProbe(t reporter, c *corev1.Container, kind string, p *corev1.Probe, wantPath string) {
	t.Helper()
	switch {
	case p == nil:
		t.Errorf("%s: no %s", c.Name, kind)
	case p.HTTPGet == nil:
		t.Errorf("%s: %s is not an HTTP GET", c.Name, kind)
	case p.HTTPGet.Path != wantPath:
		t.Errorf("%s: %s path %q, want %q", c.Name, kind, p.HTTPGet.Path, wantPath)
	case p.HTTPGet.Port.String() != adminPortName && p.HTTPGet.Port.IntValue() != adminPort:
		t.Errorf("%s: %s port %s, want %s (%d)", c.Name, kind, p.HTTPGet.Port.String(), adminPortName, adminPort)
	case p.HTTPGet.Host != "":
		t.Errorf("%s: %s host %q; the kubelet must probe the pod IP", c.Name, kind, p.HTTPGet.Host)
	}
}

// checkSecretFiles: smtppool's secrets (the upstream password, or the
// OAuth2 client secret) reach it only as files from a mounted Secret, never
// as environment values, and every SMTPPOOL_*_FILE names a file that the
// mounted Secret (or ConfigMap) holds.
func checkSecretFiles(t reporter, set *manifestSet, spec *corev1.PodSpec, sc *corev1.Container, env map[string]string) {
	t.Helper()
	for _, k := range []string{"SMTPPOOL_UPSTREAM_PASSWORD", "SMTPPOOL_OAUTH2_CLIENT_SECRET", "SMTPPOOL_CLIENT_PASSWORD"} {
		if _, ok := env[k]; ok {
			t.Errorf("%s is set in the environment; use %s_FILE", k, k)
		}
	}
	if env["SMTPPOOL_UPSTREAM_PASSWORD_FILE"] == "" && env["SMTPPOOL_OAUTH2_CLIENT_SECRET_FILE"] == "" {
		t.Error("neither SMTPPOOL_UPSTREAM_PASSWORD_FILE nor SMTPPOOL_OAUTH2_CLIENT_SECRET_FILE is set")
	}
	for _, c := range allContainers(spec) {
		for _, e := range c.EnvFrom {
			if e.SecretRef != nil {
				t.Errorf("%s: envFrom Secret %s puts secrets in the environment", c.Name, e.SecretRef.Name)
			}
		}
	}
	for k, file := range env {
		if !strings.HasSuffix(k, "_FILE") || file == "" {
			continue
		}
		checkMountedFile(t, set, spec, sc, k, file)
	}
}

// checkMountedFile: file, named by variable k, is a key of the Secret or
// ConfigMap mounted read-only at its directory in smtppool's container.
func checkMountedFile(t reporter, set *manifestSet, spec *corev1.PodSpec, sc *corev1.Container, k, file string) {
	t.Helper()
	var mount *corev1.VolumeMount
	for i, m := range sc.VolumeMounts {
		if path.Dir(file) == path.Clean(m.MountPath) {
			mount = &sc.VolumeMounts[i]
		}
	}
	if mount == nil {
		t.Errorf("%s: nothing is mounted at %s, where %s=%s points", sc.Name, path.Dir(file), k, file)
		return
	}
	if !mount.ReadOnly {
		t.Errorf("%s: the mount %s is not readOnly", sc.Name, mount.MountPath)
	}
	var vol *corev1.Volume
	for i := range spec.Volumes {
		if spec.Volumes[i].Name == mount.Name {
			vol = &spec.Volumes[i]
		}
	}
	switch {
	case vol == nil:
		t.Errorf("%s mounts volume %s, which the pod lacks", sc.Name, mount.Name)
	case vol.Secret != nil:
		key := path.Base(file)
		found := len(vol.Secret.Items) == 0
		for _, it := range vol.Secret.Items {
			if it.Path == key {
				key, found = it.Key, true
			}
		}
		s := set.secrets[vol.Secret.SecretName]
		if !found || s == nil || !secretHasKey(s, key) {
			t.Errorf("%s=%s: Secret %s mounted at %s has no key for it", k, file, vol.Secret.SecretName, mount.MountPath)
		}
		// smtppool runs as a non-root user and the Secret's files belong
		// to root: they must be readable by others (only this container
		// mounts it).
		mode := int32(0o644) // Kubernetes' default
		if vol.Secret.DefaultMode != nil {
			mode = *vol.Secret.DefaultMode
		}
		if mode&0o004 == 0 {
			t.Errorf("Secret volume %s: mode %#o is not readable by smtppool's non-root user", vol.Name, mode)
		}
		for _, c := range allContainers(spec) {
			for _, m := range c.VolumeMounts {
				if m.Name == vol.Name && c.Name != sidecarName {
					t.Errorf("%s also mounts smtppool's secret", c.Name)
				}
			}
		}
	case vol.ConfigMap != nil:
		cm := set.configMaps[vol.ConfigMap.Name]
		if _, ok := cm.Data[path.Base(file)]; cm == nil || !ok {
			t.Errorf("%s=%s: ConfigMap %s mounted at %s has no key for it", k, file, vol.ConfigMap.Name, mount.MountPath)
		}
	default:
		t.Errorf("%s=%s: the volume mounted at %s is neither a Secret nor a ConfigMap", k, file, mount.MountPath)
	}
}

func secretHasKey(s *corev1.Secret, key string) bool {
	_, a := s.Data[key]
	_, b := s.StringData[key]
	return a || b
}

// checkSecurity: non-root, no privilege escalation, no capabilities, the
// runtime's seccomp profile; a read-only root filesystem for smtppool
// (Mattermost writes under its install directory).
func checkSecurity(t reporter, spec *corev1.PodSpec, c *corev1.Container, readOnlyRoot, ownsPod bool) {
	t.Helper()
	psc := spec.SecurityContext
	if psc == nil {
		psc = &corev1.PodSecurityContext{}
	}
	sc := c.SecurityContext
	if sc == nil {
		t.Errorf("%s: no securityContext", c.Name)
		return
	}
	nonRoot := sc.RunAsNonRoot
	if nonRoot == nil && ownsPod {
		nonRoot = psc.RunAsNonRoot
	}
	if nonRoot == nil || !*nonRoot {
		t.Errorf("%s: runAsNonRoot is not true", c.Name)
	}
	if u := sc.RunAsUser; u == nil || *u == 0 {
		t.Errorf("%s: want a numeric non-zero runAsUser", c.Name)
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("%s: allowPrivilegeEscalation is not false", c.Name)
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Errorf("%s: privileged", c.Name)
	}
	if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) != 0 {
		t.Errorf("%s: capabilities %+v, want drop [ALL] and no add", c.Name, sc.Capabilities)
	}
	if sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("%s: seccompProfile %+v, want RuntimeDefault", c.Name, sc.SeccompProfile)
	}
	if ownsPod && (psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault) {
		t.Errorf("pod: seccompProfile %+v, want RuntimeDefault", psc.SeccompProfile)
	}
	if readOnlyRoot && (sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem) {
		t.Errorf("%s: readOnlyRootFilesystem is not true", c.Name)
	}
}

// checkResources: CPU and memory requests, a memory limit at least the
// request. No CPU limit is required (see k8s/README.md).
func checkResources(t reporter, c *corev1.Container) {
	t.Helper()
	r := c.Resources
	for _, name := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		if q, ok := r.Requests[name]; !ok || q.Sign() <= 0 {
			t.Errorf("%s: no %s request", c.Name, name)
		}
	}
	limit, ok := r.Limits[corev1.ResourceMemory]
	if !ok {
		t.Errorf("%s: no memory limit", c.Name)
		return
	}
	if req := r.Requests[corev1.ResourceMemory]; limit.Cmp(req) < 0 {
		t.Errorf("%s: memory limit %s below its request %s", c.Name, limit.String(), req.String())
	}
}

// dockerfileUser reads the numeric USER of the image's final stage.
func dockerfileUser(t reporter) int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^USER (\d+)(:\d+)?\s*$`).FindAllStringSubmatch(string(b), -1)
	if len(m) == 0 {
		t.Fatal("Dockerfile has no numeric USER")
	}
	uid, _ := strconv.ParseInt(m[len(m)-1][1], 10, 64)
	return uid
}

// goMemLimit parses GOMEMLIMIT's syntax: a number with an optional B,
// KiB, MiB, GiB or TiB suffix.
func goMemLimit(t reporter, s string) int64 {
	t.Helper()
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"B", 1}, {"", 1}} {
		if num, ok := strings.CutSuffix(s, u.suffix); ok {
			n, err := strconv.ParseInt(num, 10, 64)
			if err != nil {
				t.Errorf("GOMEMLIMIT=%q: %v", s, err)
				return 0
			}
			return n * u.mult
		}
	}
	return 0
}

func mustDuration(t reporter, env map[string]string, key string) time.Duration {
	t.Helper()
	d, err := time.ParseDuration(env[key])
	if err != nil {
		t.Fatalf("%s=%q: %v", key, env[key], err)
	}
	return d
}

func mustInt(t reporter, env map[string]string, key string) int64 {
	t.Helper()
	n, err := strconv.ParseInt(env[key], 10, 64)
	if err != nil {
		t.Fatalf("%s=%q: %v", key, env[key], err)
	}
	return n
}

// TestPodMonitors checks the Prometheus Operator's PodMonitors: each
// selects its example's pods (the Deployment's, or those the Mattermost
// Operator makes) and scrapes /metrics on the port the sidecar declares.
func TestPodMonitors(t *testing.T) {
	for file, variant := range map[string]string{
		"podmonitor.yaml":          "example",
		"operator/podmonitor.yaml": "Mattermost Operator",
	} {
		objs, err := decodeFile(file)
		if err != nil {
			t.Fatal(err)
		}
		pm, ok := objs[0].(*monitoringv1.PodMonitor)
		if !ok || len(objs) != 1 {
			t.Fatalf("%s: want one PodMonitor, got %T", file, objs[0])
		}
		set, _ := buildVariant(t, findVariant(t, variant))
		pod := set.pods[0]
		sel, err := metav1.LabelSelectorAsSelector(&pm.Spec.Selector)
		if err != nil || sel.Empty() || !sel.Matches(labels.Set(pod.Labels)) {
			t.Errorf("%s: selector %v does not select the pods %v (%v)", file, pm.Spec.Selector, pod.Labels, err)
		}
		sc := findContainer(pod.Spec.InitContainers, sidecarName)
		if len(pm.Spec.PodMetricsEndpoints) != 1 {
			t.Fatalf("%s: want one endpoint, got %d", file, len(pm.Spec.PodMetricsEndpoints))
		}
		ep := pm.Spec.PodMetricsEndpoints[0]
		if ep.Port == nil || *ep.Port != adminPortName || sc == nil || findPort(sc, adminPortName) == nil {
			t.Errorf("%s: endpoint port %v: want %q, declared by the %s container", file, ep.Port, adminPortName, sidecarName)
		}
		if ep.Path != "/metrics" {
			t.Errorf("%s: path %q, want /metrics", file, ep.Path)
		}
	}
}

// TestMemoryArithmetic checks the figures k8s/README.md sizes the memory
// from: the example's settings and resources, the client cap they derive
// (by capacity.go's constants) and the benchmark that ran them
// (e2e/bench/results.md, measurement 8), so that a change to the
// ConfigMap, the resources, the derivation or the benchmark cannot leave
// the explanation wrong.
func TestMemoryArithmetic(t *testing.T) {
	set, _ := buildVariant(t, findVariant(t, "example"))
	cm := set.configMaps[sidecarName].Data
	for k, want := range map[string]int64{
		"SMTPPOOL_MAX_MESSAGE_BYTES": 10 << 20,
		"SMTPPOOL_MAX_BUFFER_BYTES":  64 << 20,
		"SMTPPOOL_MAX_CONNS":         5,
	} {
		if got := mustInt(t, cm, k); got != want {
			t.Errorf("%s=%d; k8s/README.md explains %d", k, got, want)
		}
	}
	sc := findContainer(set.deployments[0].Spec.Template.Spec.InitContainers, sidecarName)
	for name, want := range map[string]resource.Quantity{
		"requests.cpu":    resource.MustParse("50m"),
		"requests.memory": resource.MustParse("320Mi"),
		"limits.memory":   resource.MustParse("320Mi"),
	} {
		kind, res, _ := strings.Cut(name, ".")
		list := sc.Resources.Requests
		if kind == "limits" {
			list = sc.Resources.Limits
		}
		if got := list[corev1.ResourceName(res)]; got.Cmp(want) != 0 {
			t.Errorf("%s %s = %s; k8s/README.md explains %s", sc.Name, name, got.String(), want.String())
		}
	}
	if _, ok := sc.Resources.Limits[corev1.ResourceCPU]; ok {
		t.Errorf("%s has a CPU limit; k8s/README.md explains why there is none", sc.Name)
	}
	for _, e := range sc.Env {
		if e.Name == "GOMEMLIMIT" {
			t.Errorf("%s sets GOMEMLIMIT=%s; k8s/README.md explains that smtppool sets it from the memory limit", sc.Name, e.Value)
		}
	}

	// The table of k8s/README.md's Resources, from the derivation.
	rule := readCapacityRule(t)
	limit := sc.Resources.Limits.Memory().Value()
	request := sc.Resources.Requests.Memory().Value()
	budget := mustInt(t, cm, "SMTPPOOL_MAX_BUFFER_BYTES")
	usable := rule.usable(limit)
	clients := rule.clientCap(usable, budget)
	least := int64(1) // the least limit, in MiB, that holds the cap without a limit
	for rule.clientCap(rule.usable(least<<20), budget) < rule.unlimitedClientConns {
		least++
	}
	section := readmeSection(t, "README.md", "## Resources")
	for _, want := range []string{
		fmt.Sprintf("| memory **limit** | **%d Mi** |", limit>>20),
		fmt.Sprintf("| usable by smtppool: %d %% of the limit, which smtppool sets as `GOMEMLIMIT` | %s |", rule.goMemLimitPercent, mib(usable)),
		fmt.Sprintf("base (the Go runtime, the upstream sessions, the metrics) | %s |", mib(rule.baseBytes)),
		fmt.Sprintf("64 MiB of buffers in all) | %s |", mib(budget)),
		fmt.Sprintf("| = room for waiting clients, at %d KiB each | %s: **%s clients** |", rule.clientConnBytes>>10, mib(usable-rule.baseBytes-budget), thousands(clients)),
		fmt.Sprintf("| memory **request** | **%d Mi** |", request>>20),
		fmt.Sprintf("derived the cap %s and set `GOMEMLIMIT` to %s", thousands(clients), mib(usable)),
		fmt.Sprintf("expect `max_client_conns` %d", clients),
		fmt.Sprintf("%d Mi is the least that holds %s clients", least, thousands(rule.unlimitedClientConns)),
		fmt.Sprintf("the cap stays %s", thousands(clients)),
	} {
		if !strings.Contains(section, want) {
			t.Errorf("k8s/README.md, Resources: want %q, from the manifests and capacity.go", want)
		}
	}

	// The benchmark ran the example's settings in a cgroup of the
	// example's limit: its derived cap is this one, the burst was
	// delivered, and the README quotes its peak, which is within the limit.
	b, err := os.ReadFile(filepath.Join("..", "e2e", "bench", "results.md"))
	if err != nil {
		t.Fatal(err)
	}
	results := string(b)
	row := func(id string) []string {
		for _, l := range strings.Split(results, "\n") {
			if strings.HasPrefix(l, "| "+id+" |") {
				return strings.Split(l, "|")
			}
		}
		t.Fatalf("e2e/bench/results.md has no row %s", id)
		return nil
	}
	burst, peak := row("8e"), row("8f")
	for _, want := range []string{
		fmt.Sprintf("a %d MiB memory cgroup", limit>>20),
		fmt.Sprintf("N=%s,", cm["SMTPPOOL_MAX_CONNS"]),
		fmt.Sprintf("%s messages", mib(mustInt(t, cm, "SMTPPOOL_MAX_MESSAGE_BYTES"))),
		fmt.Sprintf("%s of buffers", mib(budget)),
	} {
		if !strings.Contains(burst[2], want) {
			t.Errorf("e2e/bench/results.md, 8e %q: want %q, the example's settings", burst[2], want)
		}
	}
	if n, err := strconv.ParseInt(strings.TrimSpace(burst[3]), 10, 64); err != nil || n < rule.unlimitedClientConns {
		t.Errorf("e2e/bench/results.md, 8e: delivered %q, want at least %d", burst[3], rule.unlimitedClientConns)
	}
	if m := regexp.MustCompile(`its client cap (\d+) \(memory\)`).FindStringSubmatch(results); m == nil || m[1] != strconv.FormatInt(clients, 10) {
		t.Errorf("e2e/bench/results.md: the cap derived in the cgroup %v, want %d as derived here", m, clients)
	}
	charged := strings.TrimSpace(peak[3])
	mibs, err := strconv.ParseFloat(strings.TrimSuffix(charged, " MiB"), 64)
	if err != nil || mibs*(1<<20) > float64(limit) {
		t.Errorf("e2e/bench/results.md, 8f: peak charged %q, want within the limit of %d MiB", charged, limit>>20)
	}
	if !strings.Contains(section, "**"+charged+"**") {
		t.Errorf("k8s/README.md, Resources: want the benchmark's peak, **%s** (e2e/bench/results.md, 8f)", charged)
	}
}

// readmeSection returns the section of a Markdown file that starts with
// heading, up to the next heading of its level.
func readmeSection(t reporter, file, heading string) string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.Index(s, "\n"+heading+"\n")
	if i < 0 {
		t.Fatalf("%s has no section %q", file, heading)
	}
	s = s[i+1:]
	level, _, _ := strings.Cut(heading, " ")
	if j := strings.Index(s[len(heading):], "\n"+level+" "); j >= 0 {
		s = s[:len(heading)+j]
	}
	return s
}

// mib writes a size in MiB, to a tenth, as capacity.go's formatBytes does.
func mib(n int64) string {
	return strings.TrimSuffix(strconv.FormatFloat(float64(n)/(1<<20), 'f', 1, 64), ".0") + " MiB"
}

// thousands writes n with commas between groups of three digits.
func thousands(n int64) string {
	s := strconv.FormatInt(n, 10)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// capacityRule is how smtppool derives its client cap from the memory it
// may use (planCapacity in capacity.go), with the constants read from
// capacity.go, so that a change there is checked against the example.
type capacityRule struct {
	clientConnBytes      int64 // per waiting client
	baseBytes            int64 // smtppool with no client and no message
	goMemLimitPercent    int64 // the share of the container's limit that smtppool uses, and sets as GOMEMLIMIT
	unlimitedClientConns int64 // the cap without a memory limit
}

// readCapacityRule reads the constants of the derivation from ../capacity.go.
func readCapacityRule(t reporter) capacityRule {
	t.Helper()
	file := filepath.Join("..", "capacity.go")
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, file, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	consts := map[string]int64{}
	for _, d := range f.Decls {
		gd, ok := d.(*ast.GenDecl)
		if !ok || gd.Tok != token.CONST {
			continue
		}
		for _, spec := range gd.Specs {
			vs := spec.(*ast.ValueSpec)
			for i, name := range vs.Names {
				if i >= len(vs.Values) {
					continue
				}
				// Constant expressions of literals only (20 << 10, 10_000),
				// evaluated in the universe scope.
				tv, err := types.Eval(fset, nil, token.NoPos, types.ExprString(vs.Values[i]))
				if err != nil || tv.Value == nil {
					continue
				}
				if v, ok := constant.Int64Val(constant.ToInt(tv.Value)); ok {
					consts[name.Name] = v
				}
			}
		}
	}
	get := func(name string) int64 {
		v, ok := consts[name]
		if !ok || v <= 0 {
			t.Fatalf("%s: no positive constant %s; the capacity check follows capacity.go's derivation, update it", file, name)
		}
		return v
	}
	return capacityRule{
		clientConnBytes:      get("clientConnBytes"),
		baseBytes:            get("baseBytes"),
		goMemLimitPercent:    get("goMemLimitPercent"),
		unlimitedClientConns: get("unlimitedClientConns"),
	}
}

// usable is the memory smtppool uses in a container with this memory
// limit and no GOMEMLIMIT of the operator's: the GOMEMLIMIT it sets, as
// automemlimit computes it.
func (r capacityRule) usable(limit int64) int64 {
	return r.share(limit, float64(r.goMemLimitPercent)/100)
}

// share is automemlimit's GOMEMLIMIT for a limit and a ratio.
func (r capacityRule) share(limit int64, ratio float64) int64 {
	return int64(uint64(float64(limit) * ratio))
}

// clientCap is the cap derived from the usable memory and the message
// buffer budget (at least zero).
func (r capacityRule) clientCap(usable, budget int64) int64 {
	return max(0, (usable-r.baseBytes-budget)/r.clientConnBytes)
}

// checkCapacity: the client cap that smtppool derives in the sidecar (from
// its memory limit, or from a GOMEMLIMIT or AUTOMEMLIMIT in its
// environment, after the ConfigMap's buffer budget) holds at least as many
// clients as smtppool holds without a memory limit, so that the example's
// limit refuses no client of a burst that an unlimited smtppool would
// take; the memory smtppool counts on is at most 90 % of the limit. The
// buffer budget is set explicitly, and holds a message per upstream
// session.
func checkCapacity(t reporter, sc *corev1.Container, env map[string]string) {
	t.Helper()
	rule := readCapacityRule(t)
	// The settings the limit is sized from, each set (smtppool's defaults
	// are not the ones k8s/README.md sizes the limit from) and a number.
	num := func(k string) (int64, bool) {
		v, ok := env[k]
		if !ok || v == "" {
			t.Errorf("%s: %s is not set; the memory limit is sized from it (k8s/README.md, Resources), so the ConfigMap sets it rather than leaving it to smtppool's default", sc.Name, k)
			return 0, false
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			t.Errorf("%s: %s=%q is not a positive number", sc.Name, k, v)
			return 0, false
		}
		return n, true
	}
	msg, ok1 := num("SMTPPOOL_MAX_MESSAGE_BYTES")
	budget, ok2 := num("SMTPPOOL_MAX_BUFFER_BYTES")
	conns, ok3 := num("SMTPPOOL_MAX_CONNS")
	if !ok1 || !ok2 {
		return
	}
	budget = max(budget, msg) // as smtppool applies it
	if ok3 && budget/msg < conns {
		t.Errorf("SMTPPOOL_MAX_BUFFER_BYTES=%d holds %d messages of SMTPPOOL_MAX_MESSAGE_BYTES=%d, fewer than the %d upstream sessions: no more transactions than that use sessions at once, the others stay idle and a burst drains slower",
			budget, budget/msg, msg, conns)
	}
	limit, ok := sc.Resources.Limits[corev1.ResourceMemory]
	if !ok {
		return // checkResources reports it
	}
	// As smtppool derives it: the operator's GOMEMLIMIT; else the
	// GOMEMLIMIT smtppool sets, 90 % of the limit or automemlimit's
	// AUTOMEMLIMIT ratio; with either off, 90 % of the limit.
	share := rule.usable(limit.Value())
	usable, from := share, fmt.Sprintf("%d %% of the memory limit %s", rule.goMemLimitPercent, limit.String())
	switch gml, auto := env["GOMEMLIMIT"], env["AUTOMEMLIMIT"]; {
	case gml != "" && gml != "off":
		usable, from = goMemLimit(t, gml), "GOMEMLIMIT="+gml
	case gml == "" && auto != "" && auto != "off":
		ratio, err := strconv.ParseFloat(auto, 64)
		if err != nil || !(ratio > 0 && ratio <= 1) {
			t.Errorf("%s: AUTOMEMLIMIT=%q is not a ratio in (0, 1]; smtppool would not start", sc.Name, auto)
			return
		}
		usable, from = rule.share(limit.Value(), ratio), fmt.Sprintf("AUTOMEMLIMIT=%s of the memory limit %s", auto, limit.String())
	}
	if usable > share {
		t.Errorf("%s: %s (%d bytes) is above %d %% of the memory limit %s (%d bytes), which leaves the kernel's socket buffers too little room before the kernel kills smtppool",
			sc.Name, from, usable, rule.goMemLimitPercent, limit.String(), share)
	}
	memCap := rule.clientCap(usable, budget)
	if memCap < rule.unlimitedClientConns {
		t.Errorf("%s: %s (%d bytes) holds a derived client cap of %d waiting clients after the %d MiB buffer budget and the %d MiB base, at %d KiB each; want at least %d, the cap without a memory limit (k8s/README.md, Resources)",
			sc.Name, from, usable, memCap, budget>>20, rule.baseBytes>>20, rule.clientConnBytes>>10, rule.unlimitedClientConns)
	}
	if _, ok := env["SMTPPOOL_MAX_CLIENT_CONNS"]; ok {
		if n, ok := num("SMTPPOOL_MAX_CLIENT_CONNS"); ok && (n < rule.unlimitedClientConns || n > memCap) {
			t.Errorf("%s: SMTPPOOL_MAX_CLIENT_CONNS=%d; want between %d and the %d clients that %s holds", sc.Name, n, rule.unlimitedClientConns, memCap, from)
		}
	}
}
