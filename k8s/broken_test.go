package k8s

import (
	"fmt"
	"slices"
	"strings"
	"testing"
)

// breakage breaks a copy of a variant's manifests in one way: the first
// old in file becomes new. want is what the rejection (or the checks'
// report) must say.
type breakage struct {
	name     string
	variant  string
	file     string
	old, new string
	want     string
}

// build renders the broken copy of its variant, and validates it by
// Kubernetes' own rules when it renders.
func (b breakage) build(t *testing.T) (variant, *manifestSet, error) {
	t.Helper()
	v := findVariant(t, b.variant)
	tr := newTree(t)
	tr.edit(t, b.file, b.old, b.new)
	set, err := v.build(tr)
	if err == nil {
		err = validateSet(set)
	}
	return v, set, err
}

// TestBrokenCopiesAreRejected proves that the checks of TestVariants can
// fail: each case breaks a copy of the manifests in one way that strict
// decoding lets through, and Kubernetes' own rules (the API server's
// validation, or Pod Security restricted) must reject it, with the reason
// given.
func TestBrokenCopiesAreRejected(t *testing.T) {
	for _, c := range []breakage{
		{
			name: "port name over 15 characters", variant: "example", file: "deployment.yaml",
			old: "            - name: admin\n", new: "            - name: admin-endpoint-9025\n",
			want: "must be no more than 15 characters",
		},
		{
			name: "sidecar with restartPolicy Never", variant: "example", file: "deployment.yaml",
			old: "          restartPolicy: Always\n", new: "          restartPolicy: Never\n",
			want: "livenessProbe: Forbidden: may not be set for init containers without restartPolicy=Always",
		},
		{
			name: "sidecar without restartPolicy keeps its probes", variant: "example", file: "deployment.yaml",
			old: "          restartPolicy: Always\n", new: "",
			want: "may not be set for init containers without restartPolicy=Always",
		},
		{
			name: "privileged container", variant: "example", file: "deployment.yaml",
			old: "            readOnlyRootFilesystem: true\n", new: "            readOnlyRootFilesystem: true\n            privileged: true\n",
			want: "cannot set `allowPrivilegeEscalation` to false and `privileged` to true",
		},
		{
			name: "privileged container, no escalation flag", variant: "example", file: "deployment.yaml",
			old: "            readOnlyRootFilesystem: true\n            allowPrivilegeEscalation: false\n", new: "            readOnlyRootFilesystem: true\n            privileged: true\n",
			want: `violates PodSecurity "restricted:latest": privileged (container "smtppool" must not set securityContext.privileged=true), allowPrivilegeEscalation != false`,
		},
		{
			name: "runs as root", variant: "example", file: "deployment.yaml",
			old: "            runAsNonRoot: true\n            runAsUser: 65532\n", new: "            runAsUser: 0\n",
			want: "runAsUser=0",
		},
		{
			name: "a capability added", variant: "legacy", file: "legacy/deployment.yaml",
			old: "              drop:\n                - ALL\n", new: "              drop:\n                - ALL\n              add:\n                - NET_ADMIN\n",
			want: `unrestricted capabilities (container "smtppool" must not include "NET_ADMIN"`,
		},
		{
			name: "a hostPath volume", variant: "example", file: "deployment.yaml",
			old: "          emptyDir: {}\n", new: "          hostPath:\n            path: /var/lib/mattermost\n",
			want: `restricted volume types (volume "mattermost-data" uses restricted volume type "hostPath")`,
		},
		{
			name: "host network", variant: "example", file: "deployment.yaml",
			old: "      automountServiceAccountToken: false\n", new: "      automountServiceAccountToken: false\n      hostNetwork: true\n",
			want: "hostNetwork=true",
		},
		{
			name: "mount of a missing volume", variant: "example", file: "deployment.yaml",
			old: "            - name: smtppool-upstream\n              mountPath:", new: "            - name: smtppool-upstreem\n              mountPath:",
			want: "volumeMounts[0].name: Not found",
		},
		{
			name: "secret file mode out of range", variant: "example", file: "deployment.yaml",
			old: "defaultMode: 0444", new: "defaultMode: 01444",
			want: "defaultMode: Invalid value",
		},
		{
			name: "selector that misses the pods", variant: "example", file: "deployment.yaml",
			old: "    matchLabels:\n      app.kubernetes.io/name: mattermost\n", new: "    matchLabels:\n      app.kubernetes.io/name: matermost\n",
			want: "`selector` does not match template `labels`",
		},
		{
			name: "memory request above the limit", variant: "example", file: "deployment.yaml",
			old: "              cpu: 50m\n              memory: 320Mi\n", new: "              cpu: 50m\n              memory: 512Mi\n",
			want: "must be less than or equal to memory limit",
		},
		{
			name: "two containers of one name", variant: "example", file: "deployment.yaml",
			old: "        - name: mattermost\n", new: "        - name: smtppool\n",
			want: "Duplicate value: \"smtppool\"",
		},
		{
			name: "ConfigMap key that is no variable name", variant: "existing installation", file: "config/configmap.yaml",
			old: "  SMTPPOOL_HOSTNAME:", new: "  SMTPPOOL HOSTNAME:",
			want: "a valid config key must consist of alphanumeric characters",
		},
		{
			name: "Operator: a privileged sidecar", variant: "Mattermost Operator", file: operatorFile,
			old: "          readOnlyRootFilesystem: true\n          allowPrivilegeEscalation: false\n", new: "          readOnlyRootFilesystem: true\n          privileged: true\n",
			want: `privileged (container "smtppool" must not set securityContext.privileged=true)`,
		},
		{
			name: "Operator: port name over 15 characters", variant: "Mattermost Operator", file: operatorFile,
			old: "          - name: admin\n", new: "          - name: admin-endpoint-9025\n",
			want: "must be no more than 15 characters",
		},
		{
			name: "Operator: the sidecar as an ordinary init container", variant: "Mattermost Operator", file: operatorFile,
			old: "        restartPolicy: Always\n", new: "",
			want: "may not be set for init containers without restartPolicy=Always",
		},
		{
			name: "Helm chart: sidecar with restartPolicy OnFailure", variant: "Mattermost Helm chart", file: helmFile,
			old: "    restartPolicy: Always\n", new: "    restartPolicy: OnFailure\n",
			want: "startupProbe: Forbidden: may not be set for init containers without restartPolicy=Always",
		},
		{
			name: "Helm chart: a hostPath volume", variant: "Mattermost Helm chart", file: helmFile,
			old: "      defaultMode: 0444\n", new: "      defaultMode: 0444\n  - name: host-logs\n    hostPath:\n      path: /var/log\n",
			want: `restricted volume types (volume "host-logs" uses restricted volume type "hostPath")`,
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, _, err := c.build(t)
			switch {
			case err == nil:
				t.Fatalf("%s accepted", c.name)
			case !strings.Contains(err.Error(), c.want):
				t.Fatalf("rejected, but not for %q:\n%v", c.want, err)
			}
			t.Logf("rejected: %v", err)
		})
	}
}

// reporter is the part of *testing.T that the checks of a variant use, so
// that TestBrokenPromisesAreCaught can run them on a broken copy and see
// them fail.
type reporter interface {
	Helper()
	Error(args ...any)
	Errorf(format string, args ...any)
	Fatal(args ...any)
	Fatalf(format string, args ...any)
}

// failures records what checks report; Fatal stops the check like
// testing.T's does, by unwinding to runChecks.
type failures []string

type stopCheck struct{}

func (f *failures) Helper()                           {}
func (f *failures) Error(args ...any)                 { *f = append(*f, fmt.Sprint(args...)) }
func (f *failures) Errorf(format string, args ...any) { *f = append(*f, fmt.Sprintf(format, args...)) }
func (f *failures) Fatal(args ...any)                 { f.Error(args...); panic(stopCheck{}) }
func (f *failures) Fatalf(format string, args ...any) { f.Errorf(format, args...); panic(stopCheck{}) }

// runChecks runs checkVariant and returns what it reported.
func runChecks(v variant, set *manifestSet) (f failures) {
	defer func() {
		if r := recover(); r != nil {
			if _, ok := r.(stopCheck); !ok {
				panic(r)
			}
		}
	}()
	checkVariant(&f, v, set)
	return f
}

// TestBrokenPromisesAreCaught proves that the README's promises, which
// Kubernetes' rules do not cover, are checked: each case breaks a copy in
// a way Kubernetes accepts, and checkVariant must report it.
func TestBrokenPromisesAreCaught(t *testing.T) {
	for _, c := range []breakage{
		{
			name: "legacy sidecar with restartPolicy Always", variant: "legacy", file: "legacy/deployment.yaml",
			old: "          imagePullPolicy: IfNotPresent\n", new: "          imagePullPolicy: IfNotPresent\n          restartPolicy: Always\n",
			want: "restartPolicy set on an app container",
		},
		{
			name: "SMTP open to the network", variant: "example", file: "config/configmap.yaml",
			old: `SMTPPOOL_LISTEN_ADDR: "127.0.0.1:2525"`, new: `SMTPPOOL_LISTEN_ADDR: ":2525"`,
			want: "SMTPPOOL_LISTEN_ADDR",
		},
		{
			name: "admin endpoint on loopback, out of the kubelet's reach", variant: "Mattermost Helm chart", file: "config/configmap.yaml",
			old: `SMTPPOOL_ADMIN_ADDR: ":9025"`, new: `SMTPPOOL_ADMIN_ADDR: "127.0.0.1:9025"`,
			want: "SMTPPOOL_ADMIN_ADDR",
		},
		{
			name: "no SMTPPOOL_HOSTNAME", variant: "example", file: "config/configmap.yaml",
			old: `  SMTPPOOL_HOSTNAME: "mattermost.example.com"` + "\n", new: "",
			want: "SMTPPOOL_HOSTNAME",
		},
		{
			name: "misspelt variable", variant: "Mattermost Operator", file: "config/configmap.yaml",
			old: "SMTPPOOL_MAX_CONNS:", new: "SMTPPOOL_MAX_CONN:",
			want: "variable SMTPPOOL_MAX_CONN is not one of smtppool's",
		},
		{
			name: "password file that the Secret lacks", variant: "example", file: "config/configmap.yaml",
			old: `"/run/secrets/smtppool/password"`, new: `"/run/secrets/smtppool/passwd"`,
			want: "has no key for it",
		},
		{
			name: "drain longer than the Operator's grace period allows", variant: "Mattermost Operator", file: operatorFile,
			old: `value: "10s"`, new: `value: "25s"`,
			want: "leaves less than 10 s",
		},
		{
			name: "Mattermost not pointed at the sidecar", variant: "Mattermost Helm chart", file: helmFile,
			old: "    value: localhost\n", new: "    value: smtp.example.com\n",
			want: "MM_EMAILSETTINGS_SMTPSERVER",
		},
		{
			name: "memory limit that holds fewer clients than smtppool without a limit", variant: "example", file: "deployment.yaml",
			old: "              memory: 320Mi\n            limits:\n              memory: 320Mi\n", new: "              memory: 256Mi\n            limits:\n              memory: 256Mi\n",
			want: "90 % of the memory limit 256Mi (241591910 bytes) holds a derived client cap of 7700 waiting clients",
		},
		{
			name: "a low GOMEMLIMIT, which takes the place of the limit", variant: "Mattermost Helm chart", file: helmFile,
			old: "    env:\n", new: "    env:\n      - name: GOMEMLIMIT\n        value: \"100MiB\"\n",
			want: "GOMEMLIMIT=100MiB (104857600 bytes) holds a derived client cap of 1024 waiting clients",
		},
		{
			name: "GOMEMLIMIT that leaves the kernel's socket buffers too little", variant: "legacy", file: "legacy/deployment.yaml",
			old: "                name: smtppool\n", new: "                name: smtppool\n          env:\n            - name: GOMEMLIMIT\n              value: \"310MiB\"\n",
			want: "GOMEMLIMIT=310MiB (325058560 bytes) is above 90 % of the memory limit 320Mi",
		},
		{
			name: "an AUTOMEMLIMIT ratio that holds too few clients", variant: "Mattermost Operator", file: operatorFile,
			old: "        env:\n", new: "        env:\n          - name: AUTOMEMLIMIT\n            value: \"0.5\"\n",
			want: "AUTOMEMLIMIT=0.5 of the memory limit 320Mi (167772160 bytes) holds a derived client cap of 4096 waiting clients",
		},
		{
			name: "a larger buffer budget without a larger limit", variant: "Mattermost Operator", file: "config/configmap.yaml",
			old: `SMTPPOOL_MAX_BUFFER_BYTES: "67108864"`, new: `SMTPPOOL_MAX_BUFFER_BYTES: "134217728"`,
			want: "holds a derived client cap of 7372 waiting clients after the 128 MiB buffer budget",
		},
		{
			name: "buffer budget left to smtppool's default", variant: "example", file: "config/configmap.yaml",
			old: `  SMTPPOOL_MAX_BUFFER_BYTES: "67108864"` + "\n", new: "",
			want: "SMTPPOOL_MAX_BUFFER_BYTES is not set",
		},
		{
			name: "buffer budget that holds fewer messages than there are sessions", variant: "example", file: "config/configmap.yaml",
			old: `SMTPPOOL_MAX_CONNS: "5"`, new: `SMTPPOOL_MAX_CONNS: "7"`,
			want: "holds 6 messages of SMTPPOOL_MAX_MESSAGE_BYTES=10485760, fewer than the 7 upstream sessions",
		},
		{
			name: "an explicit client cap below smtppool's without a limit", variant: "legacy", file: "config/configmap.yaml",
			old: `  SMTPPOOL_MAX_CONNS: "5"` + "\n", new: `  SMTPPOOL_MAX_CONNS: "5"` + "\n" + `  SMTPPOOL_MAX_CLIENT_CONNS: "1000"` + "\n",
			want: "SMTPPOOL_MAX_CLIENT_CONNS=1000; want between 10000 and the 10649 clients",
		},
		{
			name: "database Secret in smtppool's objects", variant: "existing installation", file: "config/kustomization.yaml",
			old: "  - secret.yaml\n", new: "  - secret.yaml\n  - ../mattermost-db\n",
			want: "which is not smtppool's",
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			v, set, err := c.build(t)
			if err != nil {
				t.Fatalf("Kubernetes' rules reject this already; pick a case they accept:\n%v", err)
			}
			f := runChecks(v, set)
			if !slices.ContainsFunc(f, func(s string) bool { return strings.Contains(s, c.want) }) {
				t.Fatalf("checkVariant did not report %q; it reported %q", c.want, f)
			}
			t.Logf("reported: %q", f)
		})
	}
}
