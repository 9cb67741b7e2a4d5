package k8s

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	genericapirequest "k8s.io/apiserver/pkg/endpoints/request"
	"k8s.io/apiserver/pkg/registry/rest"
	"k8s.io/apiserver/pkg/warning"
	"k8s.io/kubernetes/pkg/api/legacyscheme"
	_ "k8s.io/kubernetes/pkg/apis/apps/install" // apps/v1 and internal types, conversions and defaults
	_ "k8s.io/kubernetes/pkg/apis/core/install" // core/v1 likewise
	"k8s.io/kubernetes/pkg/capabilities"
	"k8s.io/kubernetes/pkg/registry/apps/deployment"
	"k8s.io/kubernetes/pkg/registry/core/configmap"
	"k8s.io/kubernetes/pkg/registry/core/pod"
	"k8s.io/kubernetes/pkg/registry/core/secret"
	psaapi "k8s.io/pod-security-admission/api"
	"k8s.io/pod-security-admission/policy"
)

// testNamespace is where the objects are created, as far as the API
// server's checks are concerned.
const testNamespace = "mattermost"

func init() {
	// As kube-apiserver --allow-privileged=true, which kubeadm, kind and
	// the managed clusters set: privileged containers are then Pod
	// Security's to refuse, as in the users' clusters.
	capabilities.Setup(true, 0)
}

// createStrategies are the API server's own create strategies, by kind:
// what kube-apiserver runs on `kubectl apply` of a new object.
var createStrategies = map[string]struct {
	strategy rest.RESTCreateStrategy
	resource string
}{
	"Deployment": {deployment.Strategy, "deployments"},
	"Pod":        {pod.Strategy, "pods"},
	"ConfigMap":  {configmap.Strategy, "configmaps"},
	"Secret":     {secret.Strategy, "secrets"},
}

// apiCreate runs on a v1 object what the API server runs when it is
// created: its defaults, the conversion to the internal type, and the
// registry strategy's PrepareForCreate, hand-written and declarative
// validation and metadata checks (rest.BeforeCreate). Warnings count as
// errors: a manifest users copy should give none. obj is not changed.
func apiCreate(obj runtime.Object) error {
	obj = obj.DeepCopyObject()
	gvks, _, err := legacyscheme.Scheme.ObjectKinds(obj)
	if err != nil {
		return err
	}
	gvk := gvks[0]
	s, ok := createStrategies[gvk.Kind]
	if !ok {
		return fmt.Errorf("%s: no API server strategy in this test", gvk.Kind)
	}
	legacyscheme.Scheme.Default(obj)
	internal, err := legacyscheme.Scheme.ConvertToVersion(obj, schema.GroupVersion{Group: gvk.Group, Version: runtime.APIVersionInternal})
	if err != nil {
		return fmt.Errorf("%s: converting to the internal type: %w", gvk.Kind, err)
	}
	m, err := meta.Accessor(internal)
	if err != nil {
		return err
	}
	if m.GetNamespace() == "" {
		m.SetNamespace(testNamespace)
	}
	rest.FillObjectMetaSystemFields(m)
	ctx := genericapirequest.WithNamespace(context.Background(), m.GetNamespace())
	ctx = genericapirequest.WithRequestInfo(ctx, &genericapirequest.RequestInfo{
		IsResourceRequest: true,
		Verb:              "create",
		APIGroup:          gvk.Group,
		APIVersion:        gvk.Version,
		Namespace:         m.GetNamespace(),
		Resource:          s.resource,
		Name:              m.GetName(),
	})
	var warnings warningList
	ctx = warning.WithWarningRecorder(ctx, &warnings)
	if err := rest.BeforeCreate(s.strategy, ctx, internal); err != nil {
		return fmt.Errorf("%s %s: %w", gvk.Kind, m.GetName(), err)
	}
	if len(warnings) > 0 {
		return fmt.Errorf("%s %s: API server warnings: %s", gvk.Kind, m.GetName(), strings.Join(warnings, "; "))
	}
	return nil
}

// warningList collects the warnings the API server would send back.
type warningList []string

// AddWarning implements warning.Recorder.
func (w *warningList) AddWarning(_, text string) { *w = append(*w, text) }

var restrictedEvaluator = sync.OnceValues(func() (policy.Evaluator, error) {
	return policy.NewEvaluator(policy.DefaultChecks(), nil)
})

// podSecurityRestricted evaluates a pod, as its API server would get it
// (defaults applied), against the Pod Security Standards' restricted
// profile at the latest version: what a namespace labelled
// pod-security.kubernetes.io/enforce=restricted admits. For a Deployment,
// the admission plugin checks its pod template the same way (as a warning;
// the pods it creates are refused).
func podSecurityRestricted(what string, md *metav1.ObjectMeta, spec *corev1.PodSpec) error {
	ev, err := restrictedEvaluator()
	if err != nil {
		return err
	}
	p := &corev1.Pod{ObjectMeta: *md.DeepCopy(), Spec: *spec.DeepCopy()}
	legacyscheme.Scheme.Default(p)
	res := policy.AggregateCheckResults(ev.EvaluatePod(psaapi.LevelVersion{Level: psaapi.LevelRestricted, Version: psaapi.LatestVersion()}, &p.ObjectMeta, &p.Spec))
	if !res.Allowed {
		return fmt.Errorf("%s violates PodSecurity \"restricted:latest\": %s", what, res.ForbiddenDetail())
	}
	return nil
}

// validateSet runs the API server's checks on every object of a set and
// on the pods its Deployments would create (or the Operator or Helm chart
// would), and Pod Security restricted on every pod template and pod.
func validateSet(set *manifestSet) error {
	var errs []error
	for _, o := range set.objects {
		errs = append(errs, apiCreate(o))
	}
	for _, d := range set.deployments {
		errs = append(errs, podSecurityRestricted("the pod template of Deployment "+d.Name, &d.Spec.Template.ObjectMeta, &d.Spec.Template.Spec))
	}
	for _, p := range set.pods {
		errs = append(errs, apiCreate(p), podSecurityRestricted("pod "+p.Name, &p.ObjectMeta, &p.Spec))
	}
	return errors.Join(errs...)
}
