// Command generate writes the files that monitoring/ derives from its
// sources: the Grafana dashboard's JSON and a picture of its layout, from
// dashboard.go, and the PrometheusRule in k8s/monitoring/, from the plain
// rule file. Run it in
// the monitoring directory (make generate does); the tests check that the
// committed files equal what it writes.
package main

import (
	"fmt"
	"os"

	"github.com/smtppool/smtppool/monitoring"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "generate:", err)
		os.Exit(1)
	}
}

func run() error {
	files, err := monitoring.Generated()
	if err != nil {
		return err
	}
	for path, data := range files {
		if err := os.WriteFile(path, data, 0o644); err != nil {
			return err
		}
		fmt.Println("wrote", path)
	}
	return nil
}
