package peers

import (
	"context"
	"fmt"
	"strconv"
	"time"
)

// SourceOptions size one run of smtp-source.
type SourceOptions struct {
	Sessions int    // parallel sessions (-s)
	Messages int    // messages in all (-m)
	Bytes    int    // body bytes of each (-l); 0 for smtp-source's default
	Subject  string // -S; empty for none
}

// SourceResult is one finished run of smtp-source.
type SourceResult struct {
	Wall      time.Duration // from its start to its exit
	User, Sys time.Duration // its own CPU time
}

// RunSource runs smtp-source against addr to completion, one connection
// per message as the chat server sends (no -d), with envelope
// chat@client.e2e.test to user@MailDomain. smtp-source stops at the first
// error and exits non-zero, which fails the run, as does passing timeout.
func RunSource(o Owner, addr string, opts SourceOptions, timeout time.Duration) (SourceResult, error) {
	args := []string{"-s", strconv.Itoa(opts.Sessions), "-m", strconv.Itoa(opts.Messages),
		"-M", "chat.e2e.test", "-f", "chat@client.e2e.test", "-t", "user@" + MailDomain}
	if opts.Bytes > 0 {
		args = append(args, "-l", strconv.Itoa(opts.Bytes))
	}
	if opts.Subject != "" {
		args = append(args, "-S", opts.Subject)
	}
	args = append(args, addr)
	what := fmt.Sprintf("smtp-source -s %d -m %d to %s", opts.Sessions, opts.Messages, addr)
	start := time.Now()
	p, err := Start(o, Command{Name: "smtp-source", Path: "smtp-source", Args: args})
	if err != nil {
		return SourceResult{}, err
	}
	defer p.Stop()
	select {
	case <-p.done:
	case <-time.After(timeout):
		return SourceResult{}, fmt.Errorf("%s: not done after %v; its output:\n%s", what, timeout, indent(Tail(p.Log()+p.Stdout(), 30)))
	case <-o.Context().Done():
		return SourceResult{}, fmt.Errorf("%s: %w", what, context.Cause(o.Context()))
	}
	wall := time.Since(start)
	if err := p.Err(); err != nil {
		return SourceResult{}, fmt.Errorf("%s: %w; its output:\n%s", what, err, indent(Tail(p.Log()+p.Stdout(), 30)))
	}
	st := p.cmd.ProcessState
	return SourceResult{Wall: wall, User: st.UserTime(), Sys: st.SystemTime()}, nil
}
