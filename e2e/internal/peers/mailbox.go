package peers

import (
	"context"
	"errors"
	"fmt"
	"net/mail"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// StoredMessage is one delivered copy of a message.
type StoredMessage struct {
	Path   string
	Header mail.Header
	// QueueID is the queue id that a Postfix upstream gave the message
	// when it received it, read from the Received header its smtpd added
	// ("by upstream.test (Postfix) with ESMTP id 4FxyZ1ABC"); "" when no
	// such header is there (smtp-sink adds none). One SMTP transaction,
	// one queue id: copies with different queue ids were sent to Postfix
	// more than once; copies with one queue id are one message that
	// Postfix delivered more than once.
	QueueID string
}

// postfixReceived matches the Received header of a Postfix smtpd and
// captures its queue id.
var postfixReceived = regexp.MustCompile(`\(Postfix\) with [A-Z]+ id ([0-9A-Za-z]+)`)

// queueID is the queue id in the first Received header that a Postfix
// smtpd added, the topmost: Postfix's own, not one the message came with.
func queueID(h mail.Header) string {
	for _, r := range h["Received"] {
		if m := postfixReceived.FindStringSubmatch(r); m != nil {
			return m[1]
		}
	}
	return ""
}

// Mailbox is the delivered copies of messages, by Message-ID ("<...>").
type Mailbox map[string][]StoredMessage

// add reads every message file in dir (one message per file, as in a
// maildir or smtp-sink's -d dumps) into box. A folder that does not exist
// holds nothing.
func (box Mailbox) add(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read mailbox: %w", err)
	}
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		path := filepath.Join(dir, e.Name())
		m, err := readHeader(path)
		if err != nil {
			return err
		}
		id := strings.TrimSpace(m.Get("Message-Id"))
		box[id] = append(box[id], StoredMessage{Path: path, Header: m, QueueID: queueID(m)})
	}
	return nil
}

func readHeader(path string) (mail.Header, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read delivered message: %w", err)
	}
	defer f.Close()
	m, err := mail.ReadMessage(f)
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", path, err)
	}
	return m.Header, nil
}

// Copies counts, for each message of msgs, its copies in box, and returns
// how many have exactly one, none, and more than one.
func Copies(box Mailbox, msgs []Message) (once, missing, duplicated int) {
	for _, m := range msgs {
		switch len(box[m.ID]) {
		case 0:
			missing++
		case 1:
			once++
		default:
			duplicated++
		}
	}
	return once, missing, duplicated
}

// ByQueueID groups copies by their QueueID.
func ByQueueID(copies []StoredMessage) map[string][]StoredMessage {
	by := map[string][]StoredMessage{}
	for _, c := range copies {
		by[c.QueueID] = append(by[c.QueueID], c)
	}
	return by
}

// Mailbox indexes what a Postfix upstream has delivered: every recipient
// at its domain lands in one maildir.
func (p *Postfix) Mailbox() (Mailbox, error) {
	box := Mailbox{}
	for _, sub := range []string{"new", "cur"} {
		if err := box.add(filepath.Join(p.Dir, "mail", "sink", sub)); err != nil {
			return nil, err
		}
	}
	return box, nil
}

// WaitDelivered waits until a Postfix upstream has delivered every message
// of want and its queue is empty, flushing the queue every 2 s, and returns
// its mailbox.
func (p *Postfix) WaitDelivered(ctx context.Context, want []Message, timeout time.Duration) (Mailbox, error) {
	return p.waitDelivered(ctx, want, timeout, p.queueLen)
}

// WaitDeliveredAfterStop is WaitDelivered for an instance that was stopped
// while it received mail: an incoming queue file that a process killed by
// the stop left unfinished does not count as queued. Postfix marks a
// finished queue file with its owner-execute bit and never delivers an
// unfinished one.
func (p *Postfix) WaitDeliveredAfterStop(ctx context.Context, want []Message, timeout time.Duration) (Mailbox, error) {
	return p.waitDelivered(ctx, want, timeout, p.finishedQueueLen)
}

// waitDelivered waits until every message of want is in the mailbox and
// queued reports 0.
func (p *Postfix) waitDelivered(ctx context.Context, want []Message, timeout time.Duration, queued func() int) (Mailbox, error) {
	var box Mailbox
	var err error
	lastFlush := time.Now()
	pollErr := Poll(ctx, timeout, fmt.Sprintf("%d messages in the upstream's mailbox", len(want)), func() (bool, string) {
		if box, err = p.Mailbox(); err != nil {
			return true, ""
		}
		got := 0
		for _, m := range want {
			if len(box[m.ID]) > 0 {
				got++
			}
		}
		n := queued()
		if got == len(want) && n == 0 {
			return true, ""
		}
		if time.Since(lastFlush) > 2*time.Second {
			p.flush()
			lastFlush = time.Now()
		}
		return false, fmt.Sprintf("%d/%d delivered, %d in Postfix's queue", got, len(want), n)
	})
	if err != nil {
		return nil, err
	}
	return box, pollErr
}
