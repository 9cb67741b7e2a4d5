package monitoring

import (
	"bytes"
	"fmt"
	"strings"
)

// Paths, relative to this module's directory, of the files the generator
// writes and the tests read.
const (
	RulesFile          = "prometheus/smtppool-rules.yaml"
	RulesTestFile      = "prometheus/smtppool-rules.test.yaml"
	DashboardFile      = "grafana/smtppool-dashboard.json"
	PrometheusRuleFile = "../k8s/monitoring/prometheusrule.yaml"
)

const prometheusRuleHeader = `# Generated from monitoring/prometheus/smtppool-rules.yaml by make generate:
# edit that file, not this one (a test checks that they agree).
#
# smtppool's alerting rules for the Prometheus Operator. Not part of any
# kustomization, since it needs the operator's CRDs; apply it on its own:
#   kubectl apply -f k8s/monitoring/prometheusrule.yaml
# Your Prometheus selects PrometheusRules by label (ruleSelector; with
# kube-prometheus-stack, typically release: <its release name>): add that
# label below.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: smtppool
  labels:
    app.kubernetes.io/name: smtppool
spec:
`

// PrometheusRule wraps the plain rule file's groups in a PrometheusRule
// for the Prometheus Operator: the file's text from its "groups:" line on,
// comments included, becomes the spec, so the two cannot differ in more
// than indentation.
func PrometheusRule(rules []byte) ([]byte, error) {
	i := bytes.Index(rules, []byte("\ngroups:\n"))
	if i < 0 {
		return nil, fmt.Errorf("%s: no top-level groups: line", RulesFile)
	}
	var out bytes.Buffer
	out.WriteString(prometheusRuleHeader)
	for _, line := range strings.SplitAfter(string(rules[i+1:]), "\n") {
		if strings.TrimSpace(line) != "" {
			out.WriteString("  ")
		}
		out.WriteString(line)
	}
	return out.Bytes(), nil
}
