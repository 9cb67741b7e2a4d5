package k8s

import (
	"fmt"
	"maps"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// The examples for where Mattermost users are: the Mattermost Operator and
// the Mattermost Helm chart.
const (
	operatorFile = "operator/mattermost.yaml"
	helmFile     = "helm/values.yaml"
)

// mattermostResource is the part of the Mattermost Operator's Mattermost
// resource (installation.mattermost.com/v1beta1) that the example may
// use, with the Operator's field names. The Operator's Go module is not at
// hand, so strict decoding into this stands in for its CRD's schema: a
// misspelt or misplaced field fails.
type mattermostResource struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              struct {
		Image         string               `json:"image,omitempty"`
		Version       string               `json:"version,omitempty"`
		Replicas      *int32               `json:"replicas,omitempty"`
		MattermostEnv []corev1.EnvVar      `json:"mattermostEnv,omitempty"`
		LicenseSecret string               `json:"licenseSecret,omitempty"`
		Volumes       []corev1.Volume      `json:"volumes,omitempty"`
		VolumeMounts  []corev1.VolumeMount `json:"volumeMounts,omitempty"`
		Database      struct {
			External *struct {
				Secret string `json:"secret,omitempty"`
			} `json:"external,omitempty"`
		} `json:"database,omitempty"`
		FileStore struct {
			Local *struct {
				Enabled     bool   `json:"enabled"`
				StorageSize string `json:"storageSize,omitempty"`
			} `json:"local,omitempty"`
		} `json:"fileStore,omitempty"`
		Scheduling struct {
			Resources corev1.ResourceRequirements `json:"resources,omitempty"`
		} `json:"scheduling,omitempty"`
		PodTemplate *struct {
			SecurityContext          *corev1.PodSecurityContext `json:"securityContext,omitempty"`
			ContainerSecurityContext *corev1.SecurityContext    `json:"containerSecurityContext,omitempty"`
			ExtraAnnotations         map[string]string          `json:"extraAnnotations,omitempty"`
			ExtraLabels              map[string]string          `json:"extraLabels,omitempty"`
		} `json:"podTemplate,omitempty"`
		PodExtensions struct {
			InitContainers    []corev1.Container     `json:"initContainers,omitempty"`
			SidecarContainers []corev1.Container     `json:"sidecarContainers,omitempty"`
			ContainerPorts    []corev1.ContainerPort `json:"containerPorts,omitempty"`
		} `json:"podExtensions,omitempty"`
	} `json:"spec"`
}

// helmValues is the part of the Mattermost Helm chart's values
// (mattermost/mattermost-team-edition) that the example may set.
type helmValues struct {
	ExtraInitContainers []corev1.Container   `json:"extraInitContainers,omitempty"`
	ExtraVolumes        []corev1.Volume      `json:"extraVolumes,omitempty"`
	ExtraVolumeMounts   []corev1.VolumeMount `json:"extraVolumeMounts,omitempty"`
	ExtraEnvVars        []corev1.EnvVar      `json:"extraEnvVars,omitempty"`
	ExtraPodAnnotations map[string]string    `json:"extraPodAnnotations,omitempty"`
}

func decodeMattermostResource(tr *tree) (*mattermostResource, error) {
	b, err := tr.readFile(operatorFile)
	if err != nil {
		return nil, err
	}
	objs, err := decodeDocs(operatorFile, b)
	if err != nil {
		return nil, err
	}
	mm, ok := objs[0].(*mattermostResource)
	if !ok || len(objs) != 1 {
		return nil, fmt.Errorf("%s: want one Mattermost resource", operatorFile)
	}
	return mm, nil
}

func decodeHelmValues(tr *tree) (*helmValues, error) {
	b, err := tr.readFile(helmFile)
	if err != nil {
		return nil, err
	}
	var v helmValues
	if err := yaml.UnmarshalStrict(b, &v); err != nil {
		return nil, fmt.Errorf("%s: %w", helmFile, err)
	}
	return &v, nil
}

// operatorPodLabels are the labels the Mattermost Operator gives the pods
// of a Mattermost resource.
func operatorPodLabels(name string) map[string]string {
	return map[string]string{
		"app": "mattermost",
		"installation.mattermost.com/installation": name,
		"installation.mattermost.com/resource":     name,
	}
}

// operatorPod adds the pod the Mattermost Operator makes of
// operator/mattermost.yaml, as far as the example defines it: the init
// containers of spec.podExtensions (after the Operator's own, which it adds
// only for a database check or a managed file store), the volumes of
// spec.volumes, and Mattermost's container ("mattermost", ports app 8065
// and metrics 8067) with spec.mattermostEnv, spec.volumeMounts and the
// security contexts of spec.podTemplate. The Operator sets no
// terminationGracePeriodSeconds: Kubernetes' default, 30 s.
func operatorPod(tr *tree, set *manifestSet) error {
	mm, err := decodeMattermostResource(tr)
	if err != nil {
		return err
	}
	s := &mm.Spec
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: mm.Name + "-7d9f8c6b5-x2k4p", Labels: operatorPodLabels(mm.Name)},
		Spec: corev1.PodSpec{
			InitContainers: s.PodExtensions.InitContainers,
			Containers: append([]corev1.Container{{
				Name:                     "mattermost",
				Image:                    s.Image + ":" + s.Version,
				Command:                  []string{"mattermost"},
				TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
				Env:                      s.MattermostEnv,
				Ports:                    append([]corev1.ContainerPort{{Name: "app", ContainerPort: 8065}, {Name: "metrics", ContainerPort: 8067}}, s.PodExtensions.ContainerPorts...),
				VolumeMounts:             s.VolumeMounts,
				Resources:                s.Scheduling.Resources,
			}}, s.PodExtensions.SidecarContainers...),
			Volumes: s.Volumes,
		},
	}
	if pt := s.PodTemplate; pt != nil {
		p.Annotations = maps.Clone(pt.ExtraAnnotations)
		p.Spec.SecurityContext = pt.SecurityContext
		p.Spec.Containers[0].SecurityContext = pt.ContainerSecurityContext
		for k, v := range pt.ExtraLabels {
			if _, ok := p.Labels[k]; !ok {
				p.Labels[k] = v
			}
		}
	}
	set.pods = append(set.pods, p)
	set.appName = "mattermost"
	set.ownsApp = false
	return nil
}

// helmPod adds the pod the Mattermost Helm chart
// (mattermost/mattermost-team-edition, release "mattermost", external
// database) makes with helm/values.yaml, as far as the values define it:
// extraInitContainers after the chart's own (none with an external
// database), extraVolumes before the chart's, extraEnvVars in its
// container, extraPodAnnotations. The chart's own container and volumes
// are modelled as it renders them, with a restricted security context
// standing in for whatever the chart sets, so that a Pod Security failure
// here is the example's. The chart has no terminationGracePeriodSeconds
// setting: Kubernetes' default, 30 s.
func helmPod(tr *tree, set *manifestSet) error {
	v, err := decodeHelmValues(tr)
	if err != nil {
		return err
	}
	const fullname = "mattermost-mattermost-team-edition"
	ann := map[string]string{"checksum/config": "0123456789abcdef"}
	maps.Copy(ann, v.ExtraPodAnnotations)
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: fullname + "-6c8d7f9b5-x2k4p",
			Labels: map[string]string{
				"app.kubernetes.io/name":       "mattermost-team-edition",
				"app.kubernetes.io/instance":   "mattermost",
				"app.kubernetes.io/managed-by": "Helm",
			},
			Annotations: ann,
		},
		Spec: corev1.PodSpec{
			InitContainers: v.ExtraInitContainers,
			Containers: []corev1.Container{{
				Name:  "mattermost-team-edition",
				Image: "mattermost/mattermost-team-edition:10.11.0",
				Env:   v.ExtraEnvVars,
				Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8065, Protocol: corev1.ProtocolTCP}},
				VolumeMounts: append([]corev1.VolumeMount{
					{Name: "config-json", MountPath: "/mattermost/config/config.json", SubPath: "config.json"},
					{Name: "mattermost-data", MountPath: "/mattermost/data"},
					{Name: "mattermost-plugins", MountPath: "/mattermost/plugins"},
				}, v.ExtraVolumeMounts...),
				SecurityContext: restrictedStandIn(),
			}},
			Volumes: append(v.ExtraVolumes,
				corev1.Volume{Name: "config-json", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: fullname + "-config-json"}}},
				corev1.Volume{Name: "mattermost-data", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
				corev1.Volume{Name: "mattermost-plugins", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
			),
		},
	}
	set.pods = append(set.pods, p)
	// The chart's own Secret, not the user's.
	set.secrets[fullname+"-config-json"] = &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: fullname + "-config-json"}, Data: map[string][]byte{"config.json": nil}}
	set.appName = "mattermost-team-edition"
	set.ownsApp = false
	return nil
}

// restrictedStandIn is a container security context that Pod Security's
// restricted profile admits.
func restrictedStandIn() *corev1.SecurityContext {
	yes, no, uid := true, false, int64(2000)
	return &corev1.SecurityContext{
		RunAsNonRoot:             &yes,
		RunAsUser:                &uid,
		AllowPrivilegeEscalation: &no,
		Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
	}
}

// TestOperatorAndHelmSidecarsMatchTheExample checks that the smtppool
// container of the Operator and Helm examples is the example Deployment's,
// except for SMTPPOOL_SHUTDOWN_TIMEOUT, which they lower to fit the 30 s
// grace period of their pods; and that their volumes and Mattermost's
// SMTP settings are the example's too. So the four copies cannot drift
// apart.
func TestOperatorAndHelmSidecarsMatchTheExample(t *testing.T) {
	native, tr := buildVariant(t, findVariant(t, "example"))
	np := native.pods[0]
	want := findContainer(np.Spec.InitContainers, sidecarName).DeepCopy()
	want.Env = append(want.Env, corev1.EnvVar{Name: "SMTPPOOL_SHUTDOWN_TIMEOUT", Value: "10s"})
	var wantVol *corev1.Volume
	for i := range np.Spec.Volumes {
		if np.Spec.Volumes[i].Name == sidecarSecret {
			wantVol = &np.Spec.Volumes[i]
		}
	}
	if wantVol == nil {
		t.Fatalf("example: no volume %s", sidecarSecret)
	}
	var wantEnv []corev1.EnvVar
	for _, e := range findContainer(np.Spec.Containers, appName).Env {
		if strings.HasPrefix(e.Name, "MM_EMAILSETTINGS_") {
			wantEnv = append(wantEnv, e)
		}
	}

	mm, err := decodeMattermostResource(tr)
	if err != nil {
		t.Fatal(err)
	}
	hv, err := decodeHelmValues(tr)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		init []corev1.Container
		vols []corev1.Volume
		env  []corev1.EnvVar
	}{
		{operatorFile, mm.Spec.PodExtensions.InitContainers, mm.Spec.Volumes, mm.Spec.MattermostEnv},
		{helmFile, hv.ExtraInitContainers, hv.ExtraVolumes, hv.ExtraEnvVars},
	} {
		if len(c.init) != 1 || !equality.Semantic.DeepEqual(&c.init[0], want) {
			got, _ := yaml.Marshal(c.init)
			exp, _ := yaml.Marshal(want)
			t.Errorf("%s: the smtppool init container differs from deployment.yaml's beyond SMTPPOOL_SHUTDOWN_TIMEOUT=10s:\nwant:\n%s\ngot:\n%s", c.name, exp, got)
		}
		if len(c.vols) != 1 || !equality.Semantic.DeepEqual(&c.vols[0], wantVol) {
			t.Errorf("%s: volumes %+v, want deployment.yaml's %+v alone", c.name, c.vols, *wantVol)
		}
		if !equality.Semantic.DeepEqual(c.env, wantEnv) {
			t.Errorf("%s: Mattermost's environment %+v, want deployment.yaml's SMTP settings %+v", c.name, c.env, wantEnv)
		}
	}
}
