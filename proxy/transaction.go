package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/smtppool/smtppool/pool"
)

// command names the client command a relay step serves.
type command string

const (
	cmdMail command = "MAIL"
	cmdRcpt command = "RCPT"
	cmdData command = "DATA"
)

// transaction is what the client has said in the current transaction, kept
// to replay it on a fresh upstream session, and the upstream session that
// carries it.
type transaction struct {
	s   *session
	ctx context.Context // ends with the transaction, its timeout, the client or the relay
	// cancel ends ctx with a cause: errClientGone, errTransactionTimeout,
	// errTransactionEnded.
	cancel context.CancelCauseFunc
	timer  *time.Timer // the transaction timeout, from the first upstream session

	// deadline is when the timer fires; upstreamDone is when the session
	// held last finished working for the transaction (its borrowing, or
	// the last command relayed): from then on until the session is given
	// back, it waits for the client. Guarded by mu.
	deadline, upstreamDone time.Time

	// mu is held while a command of the transaction runs, and guards all
	// that follows.
	mu    sync.Mutex
	ended bool
	up    *pool.Conn // upstream session carrying the transaction, or nil

	from  string
	opts  smtp.MailOptions
	rcpts []recipient // recipients the client was told 250 for
	// envelopeSent says MAIL and the accepted recipients were sent on up.
	// On an upstream that offers PIPELINING they are held back until the
	// next RCPT, which goes with them in one write.
	envelopeSent bool
	// mailAccepted says the upstream accepted MAIL once: after that, its
	// refusal of MAIL on a replay is not the message's fault.
	mailAccepted bool
	msg          messageBuffer
	reserved     int64 // bytes of the buffer budget held for msg, from MAIL
	// reading says Data is reading the client's message into msg without
	// holding mu: until it has taken mu again, only Data touches msg.
	reading bool
	// waitStart is when MAIL began to wait for buffer space and an upstream
	// session, which it gets within one AcquireTimeout; zero once MAIL has
	// its session.
	waitStart time.Time

	start    time.Time
	attempts int    // upstream sessions tried
	failures int    // transient failures so far, for MaxAttempts
	bytes    int    // size of the message read
	upID     uint64 // the last upstream session used, for the log
	upAddr   string // and its upstream entry
	// offered is what the upstream sessions the transaction has used
	// offered between them, for a refusal on one that lacks it.
	offered offered
	// sentUnanswered says a try sent the whole message and lost the reply
	// (pool.ErrNoReply), or got a 4xx for it (pool.ErrAfterMessage): the
	// upstream may already hold a copy.
	sentUnanswered bool
	// lostReply says a try sent the whole message and got no readable
	// reply (pool.ErrNoReply): the message is sent at most once more.
	lostReply    bool
	finalReply   *smtp.SMTPError // set when the transaction cannot succeed: every later command gets it
	outcome      string          // for the log: delivered, rejected, failed, abandoned, ...
	lastCode     int             // the client's last reply code, for the log
	upstreamText string          // the upstream's reply to the message, with its queue id
}

type recipient struct {
	to   string
	opts *smtp.RcptOptions
}

func (b *backend) newTransaction(s *session, from string, opts *smtp.MailOptions) *transaction {
	ctx, cancel := context.WithCancelCause(b.ctx)
	tx := &transaction{s: s, ctx: ctx, cancel: cancel, from: from, start: time.Now(), outcome: "abandoned"}
	if opts != nil {
		tx.opts = *opts
	}
	// The client did not authenticate, so it must not choose the identity
	// the upstream sees in MAIL's AUTH= parameter.
	tx.opts.Auth = nil
	return tx
}

// relay runs step, the part of cmd that talks to the upstream, on an
// upstream session that carries the transaction so far. A transient
// failure discards that session (unless it is healthy and only this step
// was refused), waits a jittered backoff and tries again on a fresh one,
// replaying MAIL and the accepted recipients, until RetryTimeout has passed
// since this command's first failure (or the transaction has had
// MaxAttempts tries). The window is the command's, as RFC 5321's timeouts
// are: a failure long after an earlier one was overcome gets a window of
// its own. It returns nil or a bare *smtp.SMTPError for the client.
func (tx *transaction) relay(cmd command, step func(context.Context, *pool.Conn) error) error {
	if tx.finalReply != nil {
		return tx.finalReply
	}
	if tx.ended {
		return replyNoTransaction
	}
	b := tx.s.b
	var w retryWindow
	for {
		// Taken before the try: an upstream that comes back while this
		// try fails, or while it waits out its pause, ends the pause.
		back := b.pool.Reachable()
		where, err := tx.try(cmd, step)
		tx.upstreamDone = time.Now()
		if err == nil {
			return nil
		}
		v := tx.judge(cmd, where, err)
		if v.retry {
			b.cfg.Observer.Retried(retryReason(err))
		}
		if v.free {
			tx.discardUpstream()
			continue
		}
		if v.retry {
			tx.failures++
			w.failed()
		}
		if !v.retry {
			// A permanent refusal says nothing against the session: it
			// goes back to the pool (reset with RSET if needed, closed if
			// broken) unless the transaction goes on with it.
			if !v.sameSession {
				tx.releaseUpstream()
			}
			tx.lastCode = v.reply.Code
			tx.logFailure(cmd, err, v.reply)
			return v.reply
		}
		if w.left(b.cfg.RetryTimeout) <= 0 || (b.cfg.MaxAttempts > 0 && tx.failures >= b.cfg.MaxAttempts) {
			if !v.sameSession {
				tx.discardUpstream()
			}
			tx.lastCode = v.reply.Code
			tx.logFailure(cmd, err, v.reply)
			return v.reply
		}
		if !v.sameSession {
			tx.discardUpstream()
		}
		if v.now {
			continue
		}
		delay := backoff(w.failures, b.cfg.RetryBackoff, b.cfg.RetryBackoffMax)
		if errors.Is(err, pool.ErrTooFast) {
			delay = b.cfg.RetryBackoffMax // the upstream asked to slow down
		}
		delay = min(delay, w.left(b.cfg.RetryTimeout))
		tx.logRetry(cmd, err, delay, v.sameSession)
		if where != stageAcquire {
			back = nil // a session was had: the pause is not for the upstream to come back
		}
		if !sleep(tx.ctx, delay, back) {
			return tx.stopped()
		}
	}
}

// logRetry logs a transient failure about to be retried. Like logWaited,
// it is never inlined, so that its frame is not on every relay's stack.
//
//go:noinline
func (tx *transaction) logRetry(cmd command, err error, delay time.Duration, sameSession bool) {
	b := tx.s.b
	if errors.Is(err, pool.ErrNoReply) {
		b.log.Warn("upstream lost its reply to a whole message; sending it again, which may deliver it twice",
			"client", tx.s.client, "upstream_conn", tx.upID, "ambiguous", true)
	}
	b.log.Debug("transient upstream failure, retrying", "client", tx.s.client,
		"command", string(cmd), "failures", tx.failures, "delay", delay.String(),
		"same_session", sameSession, "err", err, "ambiguous", errors.Is(err, pool.ErrNoReply))
}

// Where a try failed.
type stage int

const (
	stageAcquire stage = iota // borrowing an upstream session
	// stageMail is MAIL before the upstream ever accepted it: its verdict
	// is the client's, at MAIL, or at the RCPT that carried a held MAIL.
	stageMail
	stageReplay // replaying what the client was already told was accepted
	stageStep   // the command itself
)

// stagedError is a step's failure that is not the step's own command's:
// the MAIL or the recipients sent with it.
type stagedError struct {
	where stage
	err   error
}

func (e *stagedError) Error() string { return e.err.Error() }
func (e *stagedError) Unwrap() error { return e.err }

// try runs step, first borrowing an upstream session if none is held, and
// sending the envelope so far (MAIL and the accepted recipients) on it
// unless the step carries it.
func (tx *transaction) try(cmd command, step func(context.Context, *pool.Conn) error) (stage, error) {
	if tx.up == nil {
		c, err := tx.acquire()
		if err != nil {
			return stageAcquire, err
		}
		tx.adopt(c)
	}
	if !tx.envelopeSent && !tx.holdsEnvelope(cmd) {
		if err := tx.sendEnvelope(nil); err != nil {
			return splitStage(err)
		}
	}
	if step == nil {
		return stageStep, nil
	}
	return splitStage(step(tx.s.b.ctx, tx.up))
}

// splitStage tells where err, a step's failure, happened.
func splitStage(err error) (stage, error) {
	var se *stagedError
	if errors.As(err, &se) {
		return se.where, se.err
	}
	return stageStep, err
}

// holdsEnvelope says whether cmd leaves the envelope to the next RCPT:
// on an upstream that offers PIPELINING, MAIL is answered once its
// parameters pass, and sent with the first RCPT in one write; a RCPT
// carries the envelope itself.
func (tx *transaction) holdsEnvelope(cmd command) bool {
	return (cmd == cmdMail || cmd == cmdRcpt) && tx.up.Pipelining()
}

// mailStage is where a failure of MAIL counts: the client's own MAIL
// until the upstream accepted it once, a replay after.
func (tx *transaction) mailStage() stage {
	if tx.mailAccepted {
		return stageReplay
	}
	return stageMail
}

// adopt makes c, just borrowed, the session that carries the transaction.
func (tx *transaction) adopt(c *pool.Conn) {
	tx.up = c
	tx.upID, tx.upAddr = c.ID(), c.Upstream()
	tx.offered.add(c)
	tx.envelopeSent = false
	tx.attempts++
	tx.upstreamDone = time.Now()
	if tx.timer == nil {
		tx.deadline = tx.upstreamDone.Add(tx.s.b.cfg.TransactionTimeout)
		tx.timer = time.AfterFunc(tx.s.b.cfg.TransactionTimeout, tx.expire)
	}
}

// tryAcquire borrows an idle upstream session if one is free now, without
// waiting, and reports whether it did.
func (tx *transaction) tryAcquire() bool {
	b := tx.s.b
	c := b.pool.TryAcquire()
	if c == nil {
		return false
	}
	b.cfg.Observer.AcquireWaited(0)
	tx.adopt(c)
	return true
}

// acquire borrows an upstream session, waiting at most AcquireTimeout (at
// MAIL, from when MAIL began to wait for buffer space).
func (tx *transaction) acquire() (*pool.Conn, error) {
	b := tx.s.b
	start := tx.waitStart
	tx.waitStart = time.Time{}
	if start.IsZero() {
		start = time.Now()
	}
	ctx, cancel := context.WithDeadline(tx.ctx, start.Add(b.cfg.AcquireTimeout))
	defer cancel()
	c, err := b.pool.Acquire(ctx)
	switch {
	case err == nil:
		waited := time.Since(start)
		b.cfg.Observer.AcquireWaited(waited)
		if waited > time.Second {
			tx.logWaited(waited)
		}
		return c, nil
	case tx.ctx.Err() != nil:
		return nil, context.Cause(tx.ctx)
	case ctx.Err() != nil:
		b.cfg.Observer.AcquireTimedOut()
		return nil, errBusy
	}
	return nil, fmt.Errorf("%w: %w", errSetup, err)
}

// logWaited logs a long wait for an upstream session, at debug. It is a
// function of its own, never inlined, so that its frame (the log
// attributes, the pool's Stat) is not part of the stack of every
// transaction that waits: a waiting client's stack then stays small.
//
//go:noinline
func (tx *transaction) logWaited(waited time.Duration) {
	b := tx.s.b
	if b.log.Enabled(context.Background(), slog.LevelDebug) {
		b.log.Debug("waited for an upstream session", "client", tx.s.client,
			"waited", waited.Round(time.Millisecond).String(), "pool", b.pool.Stat())
	}
}

// sendEnvelope sends the transaction so far, MAIL and the accepted
// recipients, and next, the recipient of the RCPT being relayed, if any,
// on the session held: one write on an upstream that offers PIPELINING.
// It returns next's verdict as it is, and a failure of MAIL or of an
// accepted recipient as a *stagedError.
func (tx *transaction) sendEnvelope(next *recipient) error {
	c := tx.up
	opts, err := upstreamMailOptions(c, tx.from, tx.opts)
	if err != nil {
		return &stagedError{where: tx.mailStage(), err: err}
	}
	rcpts := make([]pool.Recipient, 0, len(tx.rcpts)+1)
	for _, r := range tx.rcpts {
		rcpts = append(rcpts, pool.Recipient{Addr: upstreamPath(r.to), Opts: r.opts})
	}
	if next != nil {
		rcpts = append(rcpts, pool.Recipient{Addr: upstreamPath(next.to), Opts: next.opts})
	}
	verdicts, err := c.Envelope(tx.s.b.ctx, upstreamPath(tx.from), opts, rcpts)
	if err != nil {
		return &stagedError{where: tx.mailStage(), err: err}
	}
	tx.mailAccepted, tx.envelopeSent = true, true
	for _, err := range verdicts[:len(tx.rcpts)] {
		if err != nil {
			return &stagedError{where: stageReplay, err: err}
		}
	}
	if next != nil {
		return verdicts[len(tx.rcpts)]
	}
	return nil
}

// judge decides what a failed try means for the transaction, and records
// it when the transaction can no longer succeed.
func (tx *transaction) judge(cmd command, where stage, err error) verdict {
	judged := cmd
	if where == stageMail {
		judged = cmdMail // a held MAIL's verdict, reported at RCPT
	}
	wholeSent := errors.Is(err, pool.ErrNoReply) || errors.Is(err, pool.ErrAfterMessage)
	if wholeSent && tx.lostReply {
		// This try was the one resend after a lost reply, and it did not
		// deliver: the upstream may hold the first copy, and never gets
		// a third. A refusal must not tell the client that nothing was
		// delivered.
		tx.finalReply = replyMaybeDelivered
		if errors.Is(err, pool.ErrNoReply) {
			tx.finalReply = replyLostTwice
		}
		return verdict{reply: tx.finalReply}
	}
	if errors.Is(err, pool.ErrNoReply) {
		tx.lostReply = true
	}
	if tx.offered.couldTake(err, tx.opts.Size) {
		// This session's entry (a failover entry, say) lacks an extension
		// the transaction needs and another session of it offered: not
		// the message's fault, and that entry may serve the next try.
		return verdict{reply: replyUnavailable, retry: true}
	}
	v := classify(judged, err)
	if where == stageReplay {
		// The session lacks what the client was told was accepted: a
		// retry must replay it on a fresh one.
		v.sameSession = false
	}
	var smtpErr *smtp.SMTPError
	isReply := errors.As(err, &smtpErr)
	switch {
	case isReply && smtpErr.Code == 530 && (judged == cmdMail || where == stageReplay):
		// Authentication required at MAIL: a pooled session that lost its
		// AUTH (some upstreams drop it on a repeated EHLO) is retired and
		// the transaction retried; a fresh one means the set-up is wrong.
		if tx.up != nil && tx.up.Reused() {
			return verdict{reply: replyUnavailable, retry: true, now: true}
		}
		return verdict{reply: replyMisconfigured}
	case where == stageReplay && isReply && smtpErr.Code >= 500:
		// The upstream refused on replay what the client was already told
		// had been accepted: the client must not get a permanent failure
		// for it, and this transaction cannot succeed.
		tx.finalReply = replyReplayRefused
		return verdict{reply: replyReplayRefused}
	case tx.sentUnanswered && !v.retry && v.reply.Code >= 500:
		// An earlier try sent the whole message and lost the reply, or
		// was told 4xx for it: the upstream may hold it. A permanent
		// refusal now must not tell the client that nothing was delivered.
		tx.finalReply = replyMaybeDelivered
		return verdict{reply: replyMaybeDelivered}
	}
	if errors.Is(err, pool.ErrNoReply) || errors.Is(err, pool.ErrAfterMessage) && v.retry {
		tx.sentUnanswered = true
	}
	if where == stageMail && cmd != cmdMail && !v.retry {
		// The upstream refused the MAIL the client was told 250 for: the
		// client hears it at this RCPT, and at every command after.
		tx.finalReply = v.reply
	}
	return v
}

// retryWindow is one command's retry window: it opens at the command's
// first transient failure.
type retryWindow struct {
	since    time.Time // the first failure
	failures int       // transient failures, for the backoff
}

func (w *retryWindow) failed() {
	if w.since.IsZero() {
		w.since = time.Now()
	}
	w.failures++
}

// left is the time left of a window of length d.
func (w *retryWindow) left(d time.Duration) time.Duration {
	return d - time.Since(w.since)
}

// stopped returns the reply for a transaction whose context ended.
func (tx *transaction) stopped() error {
	v := classify("", context.Cause(tx.ctx))
	tx.lastCode = v.reply.Code
	return v.reply
}

// envelopeReady reports whether the transaction holds an upstream session
// that has its whole envelope, so that the message can be relayed
// without waiting for anything else.
func (tx *transaction) envelopeReady() bool {
	return tx.finalReply == nil && !tx.ended && tx.up != nil && tx.envelopeSent
}

// tryReserveBuffer takes the message's share of the buffer budget if it
// is free now, and reports whether it did.
func (tx *transaction) tryReserveBuffer() bool {
	n := tx.s.b.cfg.MaxMessageBytes
	if !tx.s.b.buffers.TryAcquire(n) {
		return false
	}
	tx.reserve(n)
	return true
}

// reserveBuffer takes the message's share of the buffer budget, unless
// the transaction holds it already, waiting while the budget is spent, at
// most until AcquireTimeout has passed since MAIL began to wait. Mail calls
// it before it borrows an upstream session: a transaction that waits for
// buffer space holds no session, and one that holds a session has its
// buffer space, so the sessions always carry transactions that can finish
// (and a transaction that holds buffer space and waits for a session, to
// retry, waits only for transactions that have theirs).
func (tx *transaction) reserveBuffer() error {
	b := tx.s.b
	n := b.cfg.MaxMessageBytes
	if tx.reserved > 0 || tx.tryReserveBuffer() {
		return nil
	}
	start := tx.waitStart
	if start.IsZero() {
		start = time.Now()
	}
	ctx, cancel := context.WithDeadline(tx.ctx, start.Add(b.cfg.AcquireTimeout))
	defer cancel()
	// It counts among the transactions waiting for a session: the pool's
	// queue and its drain estimate are all the transactions waiting.
	done := b.pool.Waiting()
	err := b.buffers.Acquire(ctx, n)
	done()
	if err != nil {
		if tx.ctx.Err() != nil {
			return tx.stopped()
		}
		b.cfg.Observer.AcquireTimedOut()
		tx.lastCode = replyBusy.Code
		return replyBusy
	}
	tx.reserve(n)
	return nil
}

// reserve records n bytes of the budget as the transaction's.
func (tx *transaction) reserve(n int64) {
	b := tx.s.b
	tx.reserved = n
	now := b.reservedBytes.Add(n)
	for peak := b.reservedPeak.Load(); now > peak && !b.reservedPeak.CompareAndSwap(peak, now); peak = b.reservedPeak.Load() {
	}
}

// releaseBuffer frees the message's buffer and its share of the budget,
// unless Data is reading the message (Data frees them when it is done).
func (tx *transaction) releaseBuffer() {
	if tx.reading {
		return
	}
	tx.msg.release()
	if tx.reserved > 0 {
		tx.s.b.reservedBytes.Add(-tx.reserved)
		tx.s.b.buffers.Release(tx.reserved)
		tx.reserved = 0
	}
}

// readMessage reads the client's message into the buffer, normalising
// bare CR and LF line ends to CRLF. It touches nothing of tx but the
// buffer, which only Data uses: Data calls it without holding mu, so that
// a client slow to send its message does not keep expire from taking the
// upstream session back.
func (tx *transaction) readMessage(r io.Reader) error {
	_, err := tx.msg.ReadFrom(&crlfReader{r: r})
	if err == nil && int64(tx.msg.Len()) > tx.s.b.cfg.MaxMessageBytes {
		return smtp.ErrDataTooLarge
	}
	return err
}

// unread turns a failure to read the client's message, or a transaction
// that ended while it was read, into the client's reply; mu must be held.
func (tx *transaction) unread(err error) error {
	tx.outcome = "unread"
	var smtpErr *smtp.SMTPError
	switch {
	case tx.ctx.Err() != nil:
		// The transaction timeout, the client's RSET or leaving, or a
		// shutdown, while the client was sending: nothing is relayed.
		return tx.stopped()
	case errors.As(err, &smtpErr):
		return smtpErr // 552 5.3.4 from go-smtp's size limit
	case errors.Is(err, smtp.ErrTooLongLine):
		return replyLineTooLong
	}
	return replyClientRead
}

// clientBody reads the client's message for a transaction, counting the
// bytes, and fails with the cause of the transaction's end once its
// context has ended: a read that the end interrupted (see
// session.interruptOnEnd) fails with that cause too.
type clientBody struct {
	r   io.Reader
	ctx context.Context
	n   int64
}

func (b *clientBody) Read(p []byte) (int, error) {
	if b.ctx.Err() != nil {
		return 0, context.Cause(b.ctx)
	}
	n, err := b.r.Read(p)
	b.n += int64(n)
	if err != nil && b.ctx.Err() != nil {
		err = context.Cause(b.ctx)
	}
	return n, err
}

// delivered records the upstream's acceptance of the message.
func (tx *transaction) delivered(upstreamReply string) {
	tx.outcome, tx.lastCode, tx.upstreamText = "delivered", 250, upstreamReply
}

// discardUpstream closes the held session rather than reusing it, so that a
// retry starts on a fresh one.
func (tx *transaction) discardUpstream() {
	if tx.up != nil {
		tx.noteGivingBack()
		tx.up.Discard()
		tx.up = nil
	}
}

// releaseUpstream gives the held session back to the pool.
func (tx *transaction) releaseUpstream() {
	if tx.up != nil {
		tx.noteGivingBack()
		tx.up.Release()
		tx.up = nil
	}
}

// noteGivingBack tells the backend's heldPastTimeout hook, if any, how long
// the session being given back was held past the transaction timeout while
// it waited for the client: the time since the later of the deadline and
// the end of its last work for the transaction.
func (tx *transaction) noteGivingBack() {
	hook := tx.s.b.heldPastTimeout.Load()
	if hook == nil || tx.deadline.IsZero() {
		return
	}
	if over := time.Since(tx.deadline); over > 0 {
		(*hook)(min(over, time.Since(tx.upstreamDone)))
	}
}

// expire ends a transaction that has lasted TransactionTimeout: a client
// that holds an upstream session (with NOOPs, say) cannot pin it for ever.
func (tx *transaction) expire() {
	tx.cancel(errTransactionTimeout)
	tx.mu.Lock()
	defer tx.mu.Unlock()
	if tx.ended {
		return
	}
	if tx.finalReply == nil {
		tx.finalReply = replyTransactionTimeout
	}
	tx.releaseUpstream()
	tx.releaseBuffer()
}

// end ends the transaction from outside a command: it stops any wait of a
// command still running, then releases the upstream session.
func (tx *transaction) end() {
	tx.cancel(errTransactionEnded)
	tx.mu.Lock()
	defer tx.mu.Unlock()
	tx.finishLocked()
}

// finishLocked releases what the transaction holds and logs it, once.
func (tx *transaction) finishLocked() {
	if tx.ended {
		return
	}
	tx.ended = true
	if tx.timer != nil {
		tx.timer.Stop()
	}
	tx.cancel(errTransactionEnded)
	tx.releaseUpstream()
	tx.releaseBuffer()
	tx.logEnd()
}

// logEnd writes the transaction's one info line.
func (tx *transaction) logEnd() {
	outcome := tx.outcome
	switch {
	case outcome != "abandoned" && outcome != "delivered":
	case tx.lastCode >= 500:
		outcome = "rejected"
	case tx.lastCode >= 400:
		outcome = "failed"
	}
	duration := time.Since(tx.start)
	tx.s.b.cfg.Observer.TransactionEnded(resultOf(outcome, tx.lastCode), tx.upAddr, duration, tx.bytes)
	log := tx.s.b.log
	attrs := []slog.Attr{
		slog.String("client", tx.s.client),
		slog.String("outcome", outcome),
		slog.Int("attempts", tx.attempts),
		slog.Int("rcpts", len(tx.rcpts)),
		slog.Int("bytes", tx.bytes),
		slog.String("duration", duration.Round(time.Microsecond).String()),
	}
	if tx.upID != 0 {
		attrs = append(attrs, slog.String("upstream", tx.upAddr), slog.Uint64("upstream_conn", tx.upID))
	}
	if tx.lastCode != 0 {
		attrs = append(attrs, slog.Int("reply", tx.lastCode))
	}
	if tx.upstreamText != "" {
		attrs = append(attrs, slog.String("upstream_reply", tx.s.b.masked(tx.upstreamText)))
	}
	attrs = append(attrs, tx.addressAttrs()...)
	log.LogAttrs(context.Background(), slog.LevelInfo, "transaction", attrs...)
}

// resultOf names a transaction's outcome for metrics: delivered,
// rejected, failed or abandoned.
func resultOf(outcome string, lastCode int) string {
	switch {
	case outcome == "delivered" || outcome == "rejected" || outcome == "failed":
		return outcome
	case lastCode >= 500:
		return "rejected"
	case lastCode >= 400:
		return "failed"
	}
	return "abandoned"
}

// logFailure logs the failure the client is told of. ambiguous says the
// upstream may hold a copy of the message whose reply it lost.
func (tx *transaction) logFailure(cmd command, err error, reply *smtp.SMTPError) {
	tx.s.b.log.Warn("upstream failure, client told", "client", tx.s.client, "command", string(cmd),
		"attempts", tx.attempts, "reply", reply.Code, "err", tx.s.b.masked(err.Error()),
		"ambiguous", tx.lostReply)
}
