package smtpclient

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-smtp"
)

// MailLine returns the MAIL FROM command for from with opts, with the
// parameters go-smtp's client sends: BODY=8BITMIME whenever the server
// offers 8BITMIME, SIZE when it offers SIZE, REQUIRETLS and SMTPUTF8 (an
// error when not offered), RET and ENVID when it offers DSN, AUTH= when
// it offers AUTH.
func (c *Client) MailLine(from string, opts *smtp.MailOptions) (string, error) {
	if err := checkLine(from); err != nil {
		return "", err
	}
	if opts == nil {
		opts = &smtp.MailOptions{}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "MAIL FROM:<%s>", from)
	if ok, _ := c.Extension("8BITMIME"); ok {
		b.WriteString(" BODY=8BITMIME")
	}
	if ok, _ := c.Extension("SIZE"); ok && opts.Size != 0 {
		fmt.Fprintf(&b, " SIZE=%d", opts.Size)
	}
	if opts.RequireTLS {
		if ok, _ := c.Extension("REQUIRETLS"); !ok {
			return "", errors.New("server does not support REQUIRETLS")
		}
		b.WriteString(" REQUIRETLS")
	}
	if opts.UTF8 {
		if ok, _ := c.Extension("SMTPUTF8"); !ok {
			return "", errors.New("server does not support SMTPUTF8")
		}
		b.WriteString(" SMTPUTF8")
	}
	if ok, _ := c.Extension("DSN"); ok {
		switch opts.Return {
		case smtp.DSNReturnFull, smtp.DSNReturnHeaders:
			fmt.Fprintf(&b, " RET=%s", opts.Return)
		case "":
		default:
			return "", errors.New("unknown RET parameter value")
		}
		if opts.EnvelopeID != "" {
			if !isPrintableASCII(opts.EnvelopeID) {
				return "", errors.New("malformed ENVID parameter value")
			}
			fmt.Fprintf(&b, " ENVID=%s", xtext(opts.EnvelopeID, '+'))
		}
	}
	if opts.Auth != nil {
		if ok, _ := c.Extension("AUTH"); ok {
			fmt.Fprintf(&b, " AUTH=%s", xtext(*opts.Auth, '+'))
		}
	}
	return b.String(), nil
}

// RcptLine returns the RCPT TO command for to with opts, with the
// parameters go-smtp's client sends: NOTIFY and ORCPT when the server
// offers DSN, RRVS, BY and MT-PRIORITY when it offers them.
func (c *Client) RcptLine(to string, opts *smtp.RcptOptions) (string, error) {
	if err := checkLine(to); err != nil {
		return "", err
	}
	if opts == nil {
		opts = &smtp.RcptOptions{}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "RCPT TO:<%s>", to)
	if ok, _ := c.Extension("DSN"); ok {
		if len(opts.Notify) > 0 {
			var vals []string
			for _, v := range opts.Notify {
				vals = append(vals, string(v))
			}
			fmt.Fprintf(&b, " NOTIFY=%s", strings.Join(vals, ","))
		}
		if opts.OriginalRecipient != "" {
			var enc string
			switch opts.OriginalRecipientType {
			case smtp.DSNAddressTypeRFC822:
				if !isPrintableASCII(opts.OriginalRecipient) {
					return "", errors.New("illegal ORCPT address")
				}
				enc = xtext(opts.OriginalRecipient, '+')
			case smtp.DSNAddressTypeUTF8:
				if ok, _ := c.Extension("SMTPUTF8"); ok {
					enc = unitext(opts.OriginalRecipient)
				} else {
					enc = xtext(opts.OriginalRecipient, '\\')
				}
			default:
				return "", errors.New("unknown ORCPT address type")
			}
			fmt.Fprintf(&b, " ORCPT=%s;%s", opts.OriginalRecipientType, enc)
		}
	}
	if ok, _ := c.Extension("RRVS"); ok && !opts.RequireRecipientValidSince.IsZero() {
		fmt.Fprintf(&b, " RRVS=%s", opts.RequireRecipientValidSince.Format(time.RFC3339))
	}
	if ok, _ := c.Extension("DELIVERBY"); ok && opts.DeliverBy != nil {
		if opts.DeliverBy.Mode == smtp.DeliverByReturn && opts.DeliverBy.Time < 1 {
			return "", errors.New("DELIVERBY time must be positive in return mode")
		}
		fmt.Fprintf(&b, " BY=%d;%s", int(opts.DeliverBy.Time.Seconds()), opts.DeliverBy.Mode)
		if opts.DeliverBy.Trace {
			b.WriteString("T")
		}
	}
	if ok, _ := c.Extension("MT-PRIORITY"); ok && opts.MTPriority != nil {
		if *opts.MTPriority < -9 || *opts.MTPriority > 9 {
			return "", errors.New("MT-PRIORITY must be between -9 and 9")
		}
		fmt.Fprintf(&b, " MT-PRIORITY=%d", *opts.MTPriority)
	}
	return b.String(), nil
}

// xtext encodes s as RFC 3461's xtext (escape '+': "+2B") or RFC 6533's
// utf-8-addr-xtext (escape '\\': "\x{2B}").
func xtext(s string, escape rune) string {
	var b strings.Builder
	for _, r := range s {
		switch {
		case r >= '!' && r <= '~' && r != '+' && r != '=':
			b.WriteRune(r)
		case escape == '+':
			b.WriteString("+" + strings.ToUpper(strconv.FormatInt(int64(r), 16)))
		default:
			b.WriteString(`\x{` + strings.ToUpper(strconv.FormatInt(int64(r), 16)) + "}")
		}
	}
	return b.String()
}

// unitext encodes s as RFC 6533's utf-8-addr-unitext: like
// utf-8-addr-xtext, but non-ASCII characters are kept.
func unitext(s string) string {
	var b strings.Builder
	for _, r := range s {
		if r > 0x7f {
			b.WriteRune(r)
			continue
		}
		b.WriteString(xtext(string(r), '\\'))
	}
	return b.String()
}

func isPrintableASCII(s string) bool {
	for _, r := range s {
		if r < ' ' || r > '~' {
			return false
		}
	}
	return true
}
