package monitoring

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// TestCommittedFilesAreGenerated: the dashboard's JSON, its layout
// picture and the PrometheusRule are what `make generate` writes from
// dashboard.go and the plain rule file, so none can drift from its source.
func TestCommittedFilesAreGenerated(t *testing.T) {
	files, err := Generated()
	if err != nil {
		t.Fatal(err)
	}
	for path, want := range files {
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s is not what make generate writes from its source: run make generate and commit the result", path)
		}
	}
}

// ruleFile is the part of Prometheus's rule file format the rules use.
// Decoding is strict: a misspelt field fails the test instead of being
// dropped.
type ruleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Record      string            `yaml:"record"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

func decodeStrict(t *testing.T, data []byte, v any) {
	t.Helper()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil {
		t.Fatal(err)
	}
}

// TestPrometheusRuleHoldsThePlainRules decodes both files and compares the
// rules themselves, beyond the text: the PrometheusRule's spec is the
// plain file's groups, and it is a PrometheusRule.
func TestPrometheusRuleHoldsThePlainRules(t *testing.T) {
	plainData, err := os.ReadFile(RulesFile)
	if err != nil {
		t.Fatal(err)
	}
	crData, err := os.ReadFile(PrometheusRuleFile)
	if err != nil {
		t.Fatal(err)
	}
	var plain ruleFile
	decodeStrict(t, plainData, &plain)
	var cr struct {
		APIVersion string `yaml:"apiVersion"`
		Kind       string `yaml:"kind"`
		Metadata   struct {
			Name   string            `yaml:"name"`
			Labels map[string]string `yaml:"labels"`
		} `yaml:"metadata"`
		Spec ruleFile `yaml:"spec"`
	}
	decodeStrict(t, crData, &cr)
	if cr.APIVersion != "monitoring.coreos.com/v1" || cr.Kind != "PrometheusRule" || cr.Metadata.Name == "" {
		t.Errorf("%s: apiVersion %q kind %q name %q, want a named monitoring.coreos.com/v1 PrometheusRule", PrometheusRuleFile, cr.APIVersion, cr.Kind, cr.Metadata.Name)
	}
	p, _ := json.Marshal(plain)
	c, _ := json.Marshal(cr.Spec)
	if !bytes.Equal(p, c) {
		t.Errorf("the PrometheusRule's groups differ from %s:\nplain: %s\nPrometheusRule: %s", RulesFile, p, c)
	}
	var alerts []string
	for _, g := range plain.Groups {
		for _, r := range g.Rules {
			alerts = append(alerts, r.Alert)
			if r.Labels["severity"] == "" || r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("alert %s needs a severity label and summary and description annotations", r.Alert)
			}
		}
	}
	t.Logf("alerts: %s", strings.Join(alerts, ", "))
}

func promtool(t *testing.T, dir string, args ...string) (string, error) {
	t.Helper()
	if _, err := exec.LookPath("promtool"); err != nil {
		t.Fatalf("promtool is needed (Debian's prometheus package; .ci/run installs it): %v", err)
	}
	cmd := exec.Command("promtool", args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestRulesPassPromtool runs promtool's own checks of the rule file and
// the rules' unit tests (prometheus/smtppool-rules.test.yaml).
func TestRulesPassPromtool(t *testing.T) {
	dir, file := filepath.Split(RulesFile)
	if out, err := promtool(t, dir, "check", "rules", file); err != nil {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}
	_, testFile := filepath.Split(RulesTestFile)
	out, err := promtool(t, dir, "test", "rules", testFile)
	if err != nil {
		t.Fatalf("promtool test rules: %v\n%s", err, out)
	}
	t.Logf("promtool test rules:\n%s", out)
}

// TestRuleTestsCatchBrokenRules runs the rules' unit tests against broken
// copies of the rules: each must fail, or the unit tests prove nothing.
func TestRuleTestsCatchBrokenRules(t *testing.T) {
	rules, err := os.ReadFile(RulesFile)
	if err != nil {
		t.Fatal(err)
	}
	tests, err := os.ReadFile(RulesTestFile)
	if err != nil {
		t.Fatal(err)
	}
	for name, mutation := range map[string][2]string{
		"upstream down without the failed set-ups (a failover entry never tried would alert)": {
			"smtppool_upstream_up == 0\n          and on (job, instance)\n          increase(smtppool_upstream_connect_failures_total[5m]) > 0\n",
			"smtppool_upstream_up == 0\n"},
		"upstream down after 1 minute instead of 5": {"        for: 5m\n        labels:\n          severity: critical", "        for: 1m\n        labels:\n          severity: critical"},
		"delivered transactions counted as failed":  {`result="failed"`, `result=~"failed|delivered"`},
		"a queue that empties now and then alerts":  {"min_over_time(smtppool_transactions_waiting[10m]) > 0", "max_over_time(smtppool_transactions_waiting[10m]) > 0"},
		"acquire timeouts ignored":                  {"increase(smtppool_acquire_timeouts_total[10m]) > 0", "increase(smtppool_acquire_timeouts_total[10m]) > 5"},
		"a cap that climbs back alerts":             {"        for: 15m\n", "        for: 2m\n"},
	} {
		t.Run(name, func(t *testing.T) {
			broken := strings.Replace(string(rules), mutation[0], mutation[1], 1)
			if broken == string(rules) {
				t.Fatalf("the mutation did not apply; update this test")
			}
			dir := t.TempDir()
			_, file := filepath.Split(RulesFile)
			_, testFile := filepath.Split(RulesTestFile)
			if err := os.WriteFile(filepath.Join(dir, file), []byte(broken), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, testFile), tests, 0o644); err != nil {
				t.Fatal(err)
			}
			if out, err := promtool(t, dir, "test", "rules", testFile); err == nil {
				t.Errorf("promtool test rules passed with the broken rules:\n%s", out)
			}
		})
	}
}
