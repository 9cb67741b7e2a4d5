// Package k8s holds the tests of the Kubernetes manifests beside it. It is
// a module of its own so that the Kubernetes API types it decodes the
// manifests into stay out of smtppool's go.mod.
package k8s
