package proxy

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// certCheckInterval is the least time between two looks at the certificate
// files.
const certCheckInterval = 5 * time.Second

// CertReloader serves the listener's certificate from a PEM certificate
// file and a PEM key file, and loads them again when they change (a
// renewal by cert-manager or certbot, a Kubernetes Secret updated in
// place): at a TLS handshake, at most every few seconds, it compares the
// files' size, modification time and identity with those it loaded. If the
// new files do not load (a renewal half written, a key that does not match),
// it keeps serving the last good certificate, and tries again once the
// files change again.
type CertReloader struct {
	certFile, keyFile string
	log               *slog.Logger
	interval          time.Duration

	mu      sync.Mutex
	cert    *tls.Certificate
	loaded  [2]os.FileInfo // the files behind cert
	failed  [2]os.FileInfo // the files that last failed to load, if any
	lastErr string         // the failure last logged
	checked time.Time
}

// NewCertReloader loads the certificate and key from their files; logger
// receives the reloads.
func NewCertReloader(certFile, keyFile string, logger *slog.Logger) (*CertReloader, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	r := &CertReloader{certFile: certFile, keyFile: keyFile, log: logger, interval: certCheckInterval}
	stats, err := r.stat()
	if err != nil {
		return nil, err
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	r.cert, r.loaded, r.checked = &cert, stats, time.Now()
	return r, nil
}

// TLSConfig returns a server configuration that presents the current
// certificate, TLS 1.2 or later.
func (r *CertReloader) TLSConfig() *tls.Config {
	return &tls.Config{GetCertificate: r.GetCertificate, MinVersion: tls.VersionTLS12}
}

// GetCertificate returns the current certificate, for tls.Config.
func (r *CertReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if time.Since(r.checked) >= r.interval {
		r.checked = time.Now()
		r.reloadLocked()
	}
	return r.cert, nil
}

// reloadLocked loads the files again if they changed since they were last
// loaded, or last failed to load. A failure is logged once, until it
// changes.
func (r *CertReloader) reloadLocked() {
	stats, err := r.stat()
	if err == nil && (sameFiles(stats, r.loaded) || sameFiles(stats, r.failed)) {
		return
	}
	var cert tls.Certificate
	if err == nil {
		cert, err = tls.LoadX509KeyPair(r.certFile, r.keyFile)
	}
	if err != nil {
		r.failed = stats
		if msg := err.Error(); msg != r.lastErr {
			r.lastErr = msg
			r.log.Warn("listener certificate files changed but do not load; keeping the current certificate", "err", err)
		}
		return
	}
	r.cert, r.loaded, r.failed, r.lastErr = &cert, stats, [2]os.FileInfo{}, ""
	attrs := []any{"cert_file", r.certFile}
	if leaf := cert.Leaf; leaf != nil {
		attrs = append(attrs, "subject", leaf.Subject.String(), "serial", leaf.SerialNumber.String(),
			"not_after", leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	r.log.Info("listener certificate reloaded", attrs...)
}

// stat looks at the certificate file and the key file.
func (r *CertReloader) stat() ([2]os.FileInfo, error) {
	var stats [2]os.FileInfo
	for i, name := range []string{r.certFile, r.keyFile} {
		fi, err := os.Stat(name)
		if err != nil {
			return stats, err
		}
		if !fi.Mode().IsRegular() {
			return stats, fmt.Errorf("%s is not a regular file", name)
		}
		stats[i] = fi
	}
	return stats, nil
}

// sameFiles reports whether a and b describe the same, unchanged files.
func sameFiles(a, b [2]os.FileInfo) bool {
	for i := range a {
		if a[i] == nil || b[i] == nil || !os.SameFile(a[i], b[i]) ||
			a[i].Size() != b[i].Size() || !a[i].ModTime().Equal(b[i].ModTime()) {
			return false
		}
	}
	return true
}
