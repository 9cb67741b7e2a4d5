package proxy

import "github.com/emersion/go-smtp"

// ReservedPeak returns the most of the buffer budget that srv's backend
// has held at once, in bytes.
func ReservedPeak(srv *smtp.Server) int64 {
	return srv.Backend.(*backend).reservedPeak.Load()
}
