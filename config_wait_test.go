package main

import (
	"strings"
	"testing"
)

// TestWaitWarnings: the start-up log warns when SMTPPOOL_RATE_LIMIT cannot
// let the clients smtppool holds through within SMTPPOOL_ACQUIRE_TIMEOUT
// (the docs once set "Exchange Online allows 30 per mailbox" beside it:
// with 30, a 260 burst loses most of its mail), and when the acquire and
// retry timeouts add up to more than RFC 5321's 5 minutes for the reply
// to MAIL; not with the defaults.
func TestWaitWarnings(t *testing.T) {
	tests := []struct {
		name    string
		env     []string
		clients int // SMTPPOOL_MAX_CLIENT_CONNS, as start-up settles it
		want    []string
	}{
		{"defaults", nil, 10000, nil},
		{"Exchange Online's 30 a minute", []string{"SMTPPOOL_RATE_LIMIT=30"}, 10000,
			[]string{"SMTPPOOL_RATE_LIMIT (30 a minute) lets 91 messages through in SMTPPOOL_ACQUIRE_TIMEOUT (3m0s), fewer than the 10000 clients", "Exchange Online needs no rate limit"}},
		{"a rate that holds the clients", []string{"SMTPPOOL_RATE_LIMIT=6000"}, 10000, nil},
		{"a burst allowance counts", []string{"SMTPPOOL_RATE_LIMIT=60", "SMTPPOOL_RATE_BURST=100", "SMTPPOOL_ACQUIRE_TIMEOUT=1m"}, 160, nil},
		{"waits beyond RFC 5321's", []string{"SMTPPOOL_ACQUIRE_TIMEOUT=4m"}, 10000,
			[]string{"SMTPPOOL_ACQUIRE_TIMEOUT (4m0s) and SMTPPOOL_RETRY_TIMEOUT (2m0s) add up to more than the 5m0s RFC 5321 gives a client for the reply to MAIL"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := loadConfig(append([]string{"SMTPPOOL_UPSTREAM_ADDR=a.example:25"}, tt.env...), false)
			if err != nil {
				t.Fatal(err)
			}
			cfg.MaxClientConns = tt.clients
			got := strings.Join(cfg.waitWarnings(), "\n")
			if len(tt.want) == 0 && got != "" {
				t.Errorf("warnings %q, want none", got)
			}
			for _, w := range tt.want {
				if !strings.Contains(got, w) {
					t.Errorf("warnings %q, want one with %q", got, w)
				}
			}
		})
	}
}
