// Package monitoring holds smtppool's Grafana dashboard, built with
// Grafana's foundation SDK, and the tests of it and of the Prometheus
// alerting rules beside it: promtool checks and unit tests, and a check
// that every metric they name is in the real binary's /metrics.
//
// It is a module of its own, so that the SDK stays out of smtppool's
// go.mod. `make generate` (go run ./cmd/generate) writes the dashboard's
// JSON and the PrometheusRule in k8s/monitoring/ from the sources here.
package monitoring
