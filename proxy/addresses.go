package proxy

import (
	"context"
	"log/slog"
	"regexp"
)

// Envelope addresses are personal data: the log carries them only at
// debug, or with AccessConfig.LogAddresses.

// logsAddresses reports whether log lines may carry envelope addresses.
func (b *backend) logsAddresses() bool {
	return b.cfg.Access.LogAddresses || b.log.Enabled(context.Background(), slog.LevelDebug)
}

// addressAttrs returns the transaction's envelope for its log line, or
// nothing if the log may not carry addresses.
func (tx *transaction) addressAttrs() []slog.Attr {
	if !tx.s.b.logsAddresses() {
		return nil
	}
	to := make([]string, len(tx.rcpts))
	for i, r := range tx.rcpts {
		to[i] = r.to
	}
	return []slog.Attr{slog.String("from", tx.from), slog.Any("to", to)}
}

// addressPattern finds what looks like an email address in a reply text,
// such as Postfix's "<bob@example.com>: Recipient address rejected".
var addressPattern = regexp.MustCompile(`[^\s<>]*@[^\s<>]*`)

// masked returns an upstream's reply text, or an error quoting one, for a
// log line: as it is if the log may carry addresses, otherwise with every
// address replaced by "[address]".
func (b *backend) masked(text string) string {
	if b.logsAddresses() {
		return text
	}
	return addressPattern.ReplaceAllString(text, "[address]")
}
