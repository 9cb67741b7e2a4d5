package k8s

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
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
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// The example's names, which the README and the manifests' comments use.
const (
	sidecarName     = "smtppool"
	appName         = "mattermost"
	adminPortName   = "admin"
	adminPort       = 9025
	smtpPort        = "2525"
	defaultGraceSec = 30 // Kubernetes' default terminationGracePeriodSeconds
)

// standalone lists the manifests that no kustomization includes, on
// purpose: the PodMonitor needs the Prometheus Operator's CRDs.
var standalone = []string{"podmonitor.yaml"}

// kustomization is the part of kustomize's Kustomization that the example
// uses. Strict decoding into it rejects any other field, so a field added
// here must be one kustomize knows.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Resources  []string `json:"resources,omitempty"`
	Images     []struct {
		Name    string `json:"name"`
		NewName string `json:"newName,omitempty"`
		NewTag  string `json:"newTag,omitempty"`
	} `json:"images,omitempty"`
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
	case "kustomize.config.k8s.io/v1beta1 Kustomization":
		return &kustomization{}, nil
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

// decodeFile decodes every document of a YAML file.
func decodeFile(name string) ([]any, error) {
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
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

// manifestSet is what one kustomization applies.
type manifestSet struct {
	root        string
	files       []string
	deployments []*appsv1.Deployment
	configMaps  map[string]*corev1.ConfigMap
	secrets     map[string]*corev1.Secret
	images      map[string]bool // kustomize images entries, by name
}

// loadKustomization follows a kustomization's resources, recursively, and
// checks that each exists.
func loadKustomization(t *testing.T, dir string) *manifestSet {
	t.Helper()
	set := &manifestSet{root: dir, configMaps: map[string]*corev1.ConfigMap{}, secrets: map[string]*corev1.Secret{}, images: map[string]bool{}}
	var visit func(dir string)
	visit = func(dir string) {
		kf := path.Join(dir, "kustomization.yaml")
		objs, err := decodeFile(kf)
		if err != nil {
			t.Fatal(err)
		}
		k, ok := objs[0].(*kustomization)
		if !ok || len(objs) != 1 {
			t.Fatalf("%s: want one Kustomization document", kf)
		}
		if len(k.Resources) == 0 {
			t.Errorf("%s lists no resources", kf)
		}
		for _, img := range k.Images {
			set.images[img.Name] = true
		}
		for _, r := range k.Resources {
			p := path.Join(dir, r)
			fi, err := os.Stat(p)
			if err != nil {
				t.Errorf("%s lists %q: %v", kf, r, err)
				continue
			}
			if fi.IsDir() {
				visit(p)
				continue
			}
			set.files = append(set.files, p)
			objs, err := decodeFile(p)
			if err != nil {
				t.Error(err)
				continue
			}
			for _, o := range objs {
				switch o := o.(type) {
				case *appsv1.Deployment:
					set.deployments = append(set.deployments, o)
				case *corev1.ConfigMap:
					if set.configMaps[o.Name] != nil {
						t.Errorf("%s: ConfigMap %q twice", dir, o.Name)
					}
					set.configMaps[o.Name] = o
				case *corev1.Secret:
					if set.secrets[o.Name] != nil {
						t.Errorf("%s: Secret %q twice", dir, o.Name)
					}
					set.secrets[o.Name] = o
				default:
					t.Errorf("%s: %s holds a %T, which the example does not apply", kf, p, o)
				}
			}
		}
	}
	visit(dir)
	if len(set.deployments) != 1 {
		t.Fatalf("kustomization %s: %d Deployments, want 1", dir, len(set.deployments))
	}
	return set
}

// TestKustomizationsListExistingFilesAndNoneIsForgotten checks both
// kustomizations (k8s/ and k8s/legacy/): each listed file exists, and every
// manifest in the tree is applied by one of them or is a documented
// stand-alone example.
func TestKustomizationsListExistingFilesAndNoneIsForgotten(t *testing.T) {
	listed := map[string]bool{}
	for _, root := range []string{".", "legacy"} {
		set := loadKustomization(t, root)
		for _, f := range set.files {
			listed[f] = true
		}
		for _, c := range allContainers(&set.deployments[0].Spec.Template.Spec) {
			if name, _, _ := strings.Cut(c.Image, ":"); name == sidecarName && !set.images[name] {
				t.Errorf("kustomization %s has no images entry for %q, where users point it at their registry", root, name)
			}
		}
	}
	for _, f := range yamlFiles(t) {
		if path.Base(f) == "kustomization.yaml" || listed[f] || slices.Contains(standalone, f) {
			continue
		}
		t.Errorf("%s is in no kustomization and not a known stand-alone example", f)
	}
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

// TestNativeSidecar checks the main example: smtppool is a native sidecar
// that Mattermost waits for, with the probes, configuration, secret and
// security settings the README describes.
func TestNativeSidecar(t *testing.T) {
	set := loadKustomization(t, ".")
	d := set.deployments[0]
	spec := &d.Spec.Template.Spec

	sc := findContainer(spec.InitContainers, sidecarName)
	if sc == nil {
		t.Fatalf("no init container %q", sidecarName)
	}
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
	if findContainer(spec.Containers, appName) == nil {
		t.Errorf("no app container %q", appName)
	}
	// Only restartable init containers may have probes; an ordinary init
	// container before the sidecar would also delay it.
	for _, c := range spec.InitContainers {
		if c.RestartPolicy == nil && (c.StartupProbe != nil || c.ReadinessProbe != nil || c.LivenessProbe != nil) {
			t.Errorf("init container %s has probes but is not a sidecar", c.Name)
		}
	}
	checkPod(t, set, d, sc)

	grace := int64(defaultGraceSec)
	if spec.TerminationGracePeriodSeconds != nil {
		grace = *spec.TerminationGracePeriodSeconds
	}
	drain := mustDuration(t, set.configMaps[sidecarName].Data, "SMTPPOOL_SHUTDOWN_TIMEOUT")
	// The chat server stops first, within the same grace period: leave it
	// at least 10 s.
	if time.Duration(grace)*time.Second < drain+10*time.Second {
		t.Errorf("terminationGracePeriodSeconds %d leaves less than 10 s to Mattermost before smtppool's %v drain", grace, drain)
	}
}

// TestLegacyVariant checks the two-container variant: smtppool is an
// ordinary container, and apart from that the Deployment is exactly the
// native-sidecar one, so the two cannot drift apart.
func TestLegacyVariant(t *testing.T) {
	native := loadKustomization(t, ".").deployments[0]
	set := loadKustomization(t, "legacy")
	legacy := set.deployments[0]
	spec := &legacy.Spec.Template.Spec
	if len(spec.InitContainers) != 0 {
		t.Errorf("legacy variant has init containers %v; clusters before 1.29 would run them to completion first", spec.InitContainers)
	}
	if len(spec.Containers) != 2 || findContainer(spec.Containers, sidecarName) == nil || findContainer(spec.Containers, appName) == nil {
		t.Fatalf("legacy variant: want containers %s and %s, got %d containers", sidecarName, appName, len(spec.Containers))
	}
	sc := findContainer(spec.Containers, sidecarName)
	if sc.RestartPolicy != nil {
		t.Errorf("legacy %s: restartPolicy set on an app container", sc.Name)
	}
	checkPod(t, set, legacy, sc)

	want := native.DeepCopy()
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

// checkPod checks what both variants share.
func checkPod(t *testing.T, set *manifestSet, d *appsv1.Deployment, sc *corev1.Container) {
	t.Helper()
	spec := &d.Spec.Template.Spec

	sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
	if err != nil || sel.Empty() || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
		t.Errorf("Deployment selector %v does not select its pod template's labels %v (%v)", d.Spec.Selector, d.Spec.Template.Labels, err)
	}

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

	// Configuration: from the ConfigMap, with the admin endpoint on the pod
	// IP (where the kubelet probes) and SMTP on loopback.
	if len(sc.EnvFrom) != 1 || sc.EnvFrom[0].ConfigMapRef == nil {
		t.Fatalf("%s: want envFrom one ConfigMap, got %+v", sc.Name, sc.EnvFrom)
	}
	cm := set.configMaps[sc.EnvFrom[0].ConfigMapRef.Name]
	if cm == nil {
		t.Fatalf("%s: envFrom ConfigMap %q is not in the kustomization", sc.Name, sc.EnvFrom[0].ConfigMapRef.Name)
	}
	env := map[string]string{}
	for k, v := range cm.Data {
		env[k] = v
	}
	for _, e := range sc.Env {
		if e.ValueFrom != nil {
			t.Errorf("%s: env %s comes from %+v; smtppool's settings come from the ConfigMap, its secret from a file", sc.Name, e.Name, e.ValueFrom)
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
	for k := range env {
		if !strings.HasPrefix(k, "SMTPPOOL_") && k != "GOMEMLIMIT" {
			t.Errorf("%s: unexpected variable %s", sc.Name, k)
		}
	}
	checkPasswordFile(t, set, spec, sc, env)

	// Mattermost sends to the sidecar.
	app := findContainer(spec.Containers, appName)
	if app == nil {
		t.Fatalf("no container %s", appName)
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
			t.Errorf("%s: %s=%q (set: %v), want %q", appName, k, got, ok, want)
		}
	}
	for _, e := range app.Env {
		if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
			ref := e.ValueFrom.SecretKeyRef
			if s := set.secrets[ref.Name]; s == nil || !secretHasKey(s, ref.Key) {
				t.Errorf("%s: env %s refers to secret %s key %s, which the kustomization lacks", appName, e.Name, ref.Name, ref.Key)
			}
		}
	}

	// Security and resources, for every container shipped.
	for _, c := range allContainers(spec) {
		checkSecurity(t, spec, c, c.Name == sidecarName)
		checkResources(t, c)
	}
	wantUser := dockerfileUser(t)
	if sc.SecurityContext == nil || sc.SecurityContext.RunAsUser == nil || *sc.SecurityContext.RunAsUser != wantUser {
		t.Errorf("%s: runAsUser should be %d, the image's USER", sc.Name, wantUser)
	}
	if limit, ok := sc.Resources.Limits[corev1.ResourceMemory]; ok {
		gml := goMemLimit(t, env["GOMEMLIMIT"])
		if gml <= 0 || gml >= limit.Value() {
			t.Errorf("%s: GOMEMLIMIT %q should be set below the memory limit %s", sc.Name, env["GOMEMLIMIT"], limit.String())
		}
		budget := mustInt(t, env, "SMTPPOOL_MAX_BUFFER_BYTES")
		// 24 MiB measured with 1,000 idle clients, plus the buffers.
		if base := int64(24 << 20); gml < base+budget {
			t.Errorf("GOMEMLIMIT %d is below the measured base (24 MiB) plus SMTPPOOL_MAX_BUFFER_BYTES (%d)", gml, budget)
		}
	}

	// Prometheus annotations point at the admin port.
	ann := d.Spec.Template.Annotations
	if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/port"] != strconv.Itoa(adminPort) || ann["prometheus.io/path"] != "/metrics" {
		t.Errorf("pod template annotations %v: want prometheus.io/scrape, port %d and path /metrics", ann, adminPort)
	}

	// Every volume mounted exists, and every ConfigMap or Secret a volume
	// names is in the kustomization.
	vols := map[string]*corev1.Volume{}
	for i := range spec.Volumes {
		vols[spec.Volumes[i].Name] = &spec.Volumes[i]
	}
	for _, c := range allContainers(spec) {
		for _, m := range c.VolumeMounts {
			if vols[m.Name] == nil {
				t.Errorf("%s mounts volume %s, which the pod lacks", c.Name, m.Name)
			}
		}
	}
	for _, v := range spec.Volumes {
		if v.Secret != nil && set.secrets[v.Secret.SecretName] == nil {
			t.Errorf("volume %s: Secret %s is not in the kustomization", v.Name, v.Secret.SecretName)
		}
	}
}

func findPort(c *corev1.Container, name string) *corev1.ContainerPort {
	for i := range c.Ports {
		if c.Ports[i].Name == name {
			return &c.Ports[i]
		}
	}
	return nil
}

func checkProbe(t *testing.T, c *corev1.Container, kind string, p *corev1.Probe, wantPath string) {
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

// checkPasswordFile: the upstream password reaches smtppool only as a file
// from a mounted Secret, never as an environment value.
func checkPasswordFile(t *testing.T, set *manifestSet, spec *corev1.PodSpec, sc *corev1.Container, env map[string]string) {
	t.Helper()
	if _, ok := env["SMTPPOOL_UPSTREAM_PASSWORD"]; ok {
		t.Error("SMTPPOOL_UPSTREAM_PASSWORD is set in the environment; use SMTPPOOL_UPSTREAM_PASSWORD_FILE")
	}
	for _, c := range allContainers(spec) {
		for _, e := range c.EnvFrom {
			if e.SecretRef != nil {
				t.Errorf("%s: envFrom Secret %s puts secrets in the environment", c.Name, e.SecretRef.Name)
			}
		}
		if c.Name == sidecarName {
			for _, e := range c.Env {
				if strings.Contains(e.Name, "PASSWORD") && !strings.HasSuffix(e.Name, "_FILE") {
					t.Errorf("%s: env %s", c.Name, e.Name)
				}
			}
		}
	}
	file := env["SMTPPOOL_UPSTREAM_PASSWORD_FILE"]
	if file == "" {
		t.Fatal("SMTPPOOL_UPSTREAM_PASSWORD_FILE is not set")
	}
	var mount *corev1.VolumeMount
	for i, m := range sc.VolumeMounts {
		if path.Dir(file) == path.Clean(m.MountPath) {
			mount = &sc.VolumeMounts[i]
		}
	}
	if mount == nil {
		t.Fatalf("%s: nothing is mounted at %s, where SMTPPOOL_UPSTREAM_PASSWORD_FILE=%s points", sc.Name, path.Dir(file), file)
	}
	if !mount.ReadOnly {
		t.Errorf("%s: the secret mount %s is not readOnly", sc.Name, mount.MountPath)
	}
	var vol *corev1.Volume
	for i := range spec.Volumes {
		if spec.Volumes[i].Name == mount.Name {
			vol = &spec.Volumes[i]
		}
	}
	if vol == nil || vol.Secret == nil {
		t.Fatalf("%s: the volume mounted at %s is not a Secret", sc.Name, mount.MountPath)
	}
	key := path.Base(file)
	for _, it := range vol.Secret.Items {
		if it.Path == key {
			key = it.Key
		}
	}
	s := set.secrets[vol.Secret.SecretName]
	if s == nil || !secretHasKey(s, key) {
		t.Errorf("Secret %s has no key %q for %s", vol.Secret.SecretName, key, file)
	}
	// smtppool runs as a non-root user and the Secret's files belong to
	// root: they must be readable by others (only this container mounts it).
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
}

func secretHasKey(s *corev1.Secret, key string) bool {
	_, a := s.Data[key]
	_, b := s.StringData[key]
	return a || b
}

// checkSecurity: non-root, no privilege escalation, no capabilities, the
// runtime's seccomp profile; a read-only root filesystem for smtppool
// (Mattermost writes under its install directory).
func checkSecurity(t *testing.T, spec *corev1.PodSpec, c *corev1.Container, readOnlyRoot bool) {
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
	if nonRoot == nil {
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
	if psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("pod: seccompProfile %+v, want RuntimeDefault", psc.SeccompProfile)
	}
	if readOnlyRoot && (sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem) {
		t.Errorf("%s: readOnlyRootFilesystem is not true", c.Name)
	}
}

// checkResources: CPU and memory requests, a memory limit at least the
// request. No CPU limit is required (see k8s/README.md).
func checkResources(t *testing.T, c *corev1.Container) {
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
func dockerfileUser(t *testing.T) int64 {
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
func goMemLimit(t *testing.T, s string) int64 {
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

func mustDuration(t *testing.T, env map[string]string, key string) time.Duration {
	t.Helper()
	d, err := time.ParseDuration(env[key])
	if err != nil {
		t.Fatalf("%s=%q: %v", key, env[key], err)
	}
	return d
}

func mustInt(t *testing.T, env map[string]string, key string) int64 {
	t.Helper()
	n, err := strconv.ParseInt(env[key], 10, 64)
	if err != nil {
		t.Fatalf("%s=%q: %v", key, env[key], err)
	}
	return n
}

// TestPodMonitor checks the Prometheus Operator example: it selects the
// example's pods and scrapes the sidecar's admin port.
func TestPodMonitor(t *testing.T) {
	objs, err := decodeFile("podmonitor.yaml")
	if err != nil {
		t.Fatal(err)
	}
	pm, ok := objs[0].(*monitoringv1.PodMonitor)
	if !ok || len(objs) != 1 {
		t.Fatalf("podmonitor.yaml: want one PodMonitor, got %T", objs[0])
	}
	d := loadKustomization(t, ".").deployments[0]
	sel, err := metav1.LabelSelectorAsSelector(&pm.Spec.Selector)
	if err != nil || sel.Empty() || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
		t.Errorf("PodMonitor selector %v does not select the pods %v (%v)", pm.Spec.Selector, d.Spec.Template.Labels, err)
	}
	sc := findContainer(d.Spec.Template.Spec.InitContainers, sidecarName)
	if len(pm.Spec.PodMetricsEndpoints) != 1 {
		t.Fatalf("want one endpoint, got %d", len(pm.Spec.PodMetricsEndpoints))
	}
	ep := pm.Spec.PodMetricsEndpoints[0]
	if ep.Port == nil || *ep.Port != adminPortName || sc == nil || findPort(sc, adminPortName) == nil {
		t.Errorf("PodMonitor endpoint port %v: want %q, declared by the %s container", ep.Port, adminPortName, sidecarName)
	}
	if ep.Path != "/metrics" {
		t.Errorf("PodMonitor path %q, want /metrics", ep.Path)
	}
}

// TestMemoryArithmetic checks the figures k8s/README.md derives the
// resources from, so that a change to the ConfigMap or the limits cannot
// leave the explanation wrong.
func TestMemoryArithmetic(t *testing.T) {
	set := loadKustomization(t, ".")
	cm := set.configMaps[sidecarName].Data
	if got := mustInt(t, cm, "SMTPPOOL_MAX_MESSAGE_BYTES"); got != 10<<20 {
		t.Errorf("SMTPPOOL_MAX_MESSAGE_BYTES=%d; k8s/README.md explains 10 MiB", got)
	}
	if got := mustInt(t, cm, "SMTPPOOL_MAX_BUFFER_BYTES"); got != 64<<20 {
		t.Errorf("SMTPPOOL_MAX_BUFFER_BYTES=%d; k8s/README.md explains 64 MiB", got)
	}
	sc := findContainer(set.deployments[0].Spec.Template.Spec.InitContainers, sidecarName)
	for name, want := range map[string]resource.Quantity{
		"requests.cpu":    resource.MustParse("50m"),
		"requests.memory": resource.MustParse("64Mi"),
		"limits.memory":   resource.MustParse("128Mi"),
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
}
