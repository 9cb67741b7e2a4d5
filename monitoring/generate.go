package monitoring

import (
	"encoding/json"
	"fmt"
	"os"
)

// Generated returns every file that make generate writes, by path
// relative to this module's directory: the dashboard's JSON and its layout
// picture, from Dashboard, and the PrometheusRule, from the plain rule
// file.
func Generated() (map[string][]byte, error) {
	d, err := Dashboard()
	if err != nil {
		return nil, fmt.Errorf("build the dashboard: %w", err)
	}
	dash, err := json.MarshalIndent(d, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("marshal the dashboard: %w", err)
	}
	rules, err := os.ReadFile(RulesFile)
	if err != nil {
		return nil, err
	}
	rule, err := PrometheusRule(rules)
	if err != nil {
		return nil, err
	}
	return map[string][]byte{
		DashboardFile:      append(dash, '\n'),
		LayoutFile:         LayoutSVG(d),
		PrometheusRuleFile: rule,
	}, nil
}
