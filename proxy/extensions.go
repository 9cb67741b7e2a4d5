package proxy

import (
	"errors"
	"strings"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/pool"
)

// The checks below fit a transaction to the upstream's extensions. They
// refuse only what cannot be relayed faithfully: a parameter the client
// declared (SMTPUTF8, BODY=8BITMIME, SIZE) that the upstream lacks, where
// leaving it out would change what the message means. Where it changes
// nothing (SMTPUTF8 on an all-ASCII transaction, BODY=8BITMIME on a 7-bit
// message) the parameter is left out. What the client did not declare
// (8-bit data without BODY=8BITMIME, a UTF-8 header or address without
// SMTPUTF8) goes through as on a direct connection, and the upstream
// decides. The message is never altered.

// upstreamMailOptions returns the MAIL parameters to send upstream for a
// transaction from from with opts, or the client's error.
func upstreamMailOptions(c *pool.Conn, from string, opts smtp.MailOptions) (*smtp.MailOptions, error) {
	if opts.UTF8 && !hasExtension(c, "SMTPUTF8") {
		if !isASCII(from) {
			return nil, replyNoSMTPUTF8Address
		}
		opts.UTF8 = false
	}
	if max, ok := c.MaxMessageSize(); ok && opts.Size > max {
		return nil, replyTooBigUpstream
	}
	// The pool's client declares BODY=8BITMIME itself whenever the
	// upstream offers it; checkMessage refuses 8-bit data the client
	// declared when it does not.
	opts.Body = ""
	return &opts, nil
}

// checkRecipient refuses a non-ASCII address, in a transaction whose
// client declared SMTPUTF8 (opts), that the upstream cannot take.
func checkRecipient(c *pool.Conn, opts *smtp.MailOptions, to string) error {
	if opts.UTF8 && !isASCII(to) && !hasExtension(c, "SMTPUTF8") {
		return replyNoSMTPUTF8Address
	}
	return nil
}

// checkMessage refuses 8-bit data that the client declared with
// BODY=8BITMIME (opts) for an upstream without 8BITMIME, and non-ASCII
// headers, in a transaction the client declared SMTPUTF8 for, for one
// without SMTPUTF8.
func checkMessage(c *pool.Conn, opts *smtp.MailOptions, msg *messageBuffer) error {
	if msg.isASCII() {
		return nil
	}
	if opts.Body == smtp.Body8BitMIME && !hasExtension(c, "8BITMIME") {
		return replyNo8BitMIME
	}
	if opts.UTF8 && !hasExtension(c, "SMTPUTF8") && !msg.headerIsASCII() {
		return replyNoSMTPUTF8Header
	}
	return nil
}

// offered is what upstream sessions offered between them: with several
// upstream entries, one may lack what another has.
type offered struct {
	utf8, eightBit bool
	maxSize        int64 // the largest SIZE limit seen; unlimitedSize if one had none
	unlimitedSize  bool
}

// add records what c offers.
func (o *offered) add(c *pool.Conn) {
	o.utf8 = o.utf8 || hasExtension(c, "SMTPUTF8")
	o.eightBit = o.eightBit || hasExtension(c, "8BITMIME")
	if limit, ok := c.MaxMessageSize(); ok {
		o.maxSize = max(o.maxSize, limit)
	} else {
		o.unlimitedSize = true
	}
}

// couldTake reports whether err is smtppool's own refusal of something
// the current session cannot carry (see isExtensionRefusal) that a
// session recorded in o could have carried, for a message of declared
// size.
func (o *offered) couldTake(err error, size int64) bool {
	switch {
	case errors.Is(err, replyNoSMTPUTF8Address), errors.Is(err, replyNoSMTPUTF8Header):
		return o.utf8
	case errors.Is(err, replyNo8BitMIME):
		return o.eightBit
	case errors.Is(err, replyTooBigUpstream):
		return o.unlimitedSize || size <= o.maxSize
	}
	return false
}

// isExtensionRefusal reports whether err is smtppool's own refusal of
// something the upstream session's extensions cannot carry.
func isExtensionRefusal(err error) bool {
	for _, r := range []*smtp.SMTPError{replyNoSMTPUTF8Address, replyNoSMTPUTF8Header, replyNo8BitMIME, replyTooBigUpstream} {
		if errors.Is(err, r) {
			return true
		}
	}
	return false
}

func hasExtension(c *pool.Conn, name string) bool {
	ok, _ := c.Extension(name)
	return ok
}

func isASCII[T string | []byte](s T) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

// upstreamPath writes an address as it goes between the angle brackets of
// MAIL or RCPT. go-smtp's server removes the quotes of a quoted local part
// ("john doe"@example.com arrives as john doe@example.com) and its client
// writes the address as given, so a local part that is not a dot-string is
// quoted again here.
func upstreamPath(addr string) string {
	at := strings.LastIndexByte(addr, '@')
	if at < 0 {
		return addr // the null sender, or a bare postmaster
	}
	local := addr[:at]
	if isDotString(local) {
		return addr
	}
	var b strings.Builder
	b.Grow(len(addr) + 4)
	b.WriteByte('"')
	for i := 0; i < len(local); i++ {
		if local[i] == '"' || local[i] == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(local[i])
	}
	b.WriteByte('"')
	b.WriteString(addr[at:])
	return b.String()
}

// isDotString reports whether s is an RFC 5321 Dot-string: atoms of atext
// (and, with SMTPUTF8, non-ASCII bytes) joined by single dots.
func isDotString(s string) bool {
	if s == "" || s[0] == '.' || s[len(s)-1] == '.' || strings.Contains(s, "..") {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 0x80, c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case strings.IndexByte("!#$%&'*+-/=?^_`{|}~.", c) >= 0:
		default:
			return false
		}
	}
	return true
}
