//! The downstream relay (issue 14): a batch of ready upstream frames is attributed (ledger,
//! terminal inspection, no-output holding), written to the client and flushed once; runs of
//! plain parts (deltas, ...) a socket read left buffered go to a WebSocket client as raw bytes
//! (to a server-sent event stream as one event per payload), without a decode per frame.
//! A terminal that arrives once the turn has shown output is relayed first (ending a raw run
//! if it is in one) and inspected and attributed after the batch's flush. A read that holds
//! a turn's whole answer is relayed before any frame of it is decoded: the run may open with
//! the turn's `response.created`, whose attribution waits for the flush too.

use std::borrow::Cow;
use std::sync::Arc;

use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::RunFilter;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tracing::{debug, info};

use super::failover::{carries_no_output, type_carries_no_output};
use super::{ClientGone, Downstream, Engine, Flow};
use crate::event;
use crate::gateway::Shared;
use crate::pool::Pooled;
use crate::pump::{PumpEvent, RawRun};
use crate::turn::Attribution;

impl Engine {
    pub async fn upstream_event<D: Downstream>(
        &mut self,
        d: &mut D,
        ev: Option<PumpEvent>,
    ) -> Flow {
        let mut next = ev;
        let mut sent = 0usize;
        // Frames relayed per client flush at most (`relay.buffer_frames`).
        let max_batch = self.gw.config().relay.buffer_frames;
        self.last_upstream = Instant::now();
        // Counted once per batch, whichever way the batch ends.
        let mut counted = BatchCount {
            gw: self.gw.clone(),
            frames: 0,
            bytes: 0,
            raw: 0,
            first: None,
        };
        // The task's waker, for reads of frames that are already there.
        let waker = std::future::poll_fn(|cx| std::task::Poll::Ready(cx.waker().clone())).await;
        // The turn's terminal, once relayed: its bookkeeping waits until the batch is out.
        let mut ended = None;
        // Frames written out by a flush inside the batch (a terminal's, below) and its result.
        let (mut flushed_at, mut early) = (0, Ok(()));
        // Relay a batch of ready frames, flushing once.
        loop {
            // A terminal already queued for the client but not yet accounted for.
            let mut unaccounted = None;
            // The turn's `response.created`, relayed raw and not yet attributed.
            let mut opened = None;
            match next {
                Some(PumpEvent::Run(run)) => {
                    let terminal = run.text(run.payloads.len().saturating_sub(1), |t| {
                        event::is_terminal_type(t)
                    });
                    opened = run.text(0, |t| t == b"response.created");
                    if self
                        .relay_taken(d, &mut counted, &mut sent, run)
                        .await
                        .is_err()
                    {
                        return Flow::Stop;
                    }
                    unaccounted = terminal;
                }
                Some(PumpEvent::Frame(Message::Text(text))) => {
                    let ty = event::sniff_type(&text);
                    if self.shown_output() && ty.as_deref().is_some_and(event::is_terminal) {
                        // Relay first, account after: once the turn has shown output, a
                        // terminal cannot move it to another account and reaches the client
                        // whatever the ledger makes of it, so it leaves with the batch before
                        // it is inspected (the upstream echoes the whole response in it) and
                        // the inspection delays no event.
                        if self
                            .relay_down(d, &mut counted, &mut sent, Some(text.clone()))
                            .await
                            .is_err()
                        {
                            return Flow::Stop;
                        }
                        unaccounted = Some(text);
                    } else {
                        let (terminal, quiet) = self.attribute(ty, &text);
                        let unseen = self.turn.as_ref().is_some_and(|t| t.frames == 0);
                        if let Some(t) = terminal.as_ref().filter(|t| t.rate_limited && unseen) {
                            // Nothing of this turn reached the client: it can move.
                            let t = event::Terminal {
                                kind: t.kind.clone(),
                                code: t.code.clone(),
                                retry_after: t.retry_after,
                                rate_limited: true,
                                ..Default::default()
                            };
                            if self.flush_client(d, sent - flushed_at).await.is_err() {
                                return Flow::Stop;
                            }
                            return Box::pin(self.limited_before_output(d, t)).await;
                        }
                        if !(quiet && unseen && self.hold_quiet(&text)) {
                            if self
                                .relay_down(d, &mut counted, &mut sent, Some(text))
                                .await
                                .is_err()
                            {
                                return Flow::Stop;
                            }
                            if terminal.is_some() {
                                ended = terminal;
                                break;
                            }
                        }
                        if d.raw_frames() {
                            match self.relay_run(d, &mut counted, &mut sent, max_batch).await {
                                Ok(t) => unaccounted = t,
                                Err(ClientGone) => return Flow::Stop,
                            }
                        }
                    }
                }
                Some(PumpEvent::Frame(_)) => {
                    let _ = self.flush_client(d, sent - flushed_at).await;
                    return Box::pin(self.upstream_ended(d, None, "upstream sent a binary frame"))
                        .await;
                }
                Some(PumpEvent::Closed(frame)) => {
                    let _ = self.flush_client(d, sent - flushed_at).await;
                    let code = frame.as_ref().map(|f| f.code);
                    // Untrusted text: escaped once here for every log line and message.
                    let reason = frame
                        .map(|f| crate::telemetry::escape(&f.reason, 123))
                        .unwrap_or_default();
                    return Box::pin(self.upstream_ended(d, code, &reason)).await;
                }
                Some(PumpEvent::Failed(e)) => {
                    let _ = self.flush_client(d, sent - flushed_at).await;
                    return Box::pin(self.upstream_ended(d, None, &e)).await;
                }
                None => {
                    let _ = self.flush_client(d, sent - flushed_at).await;
                    return Box::pin(self.upstream_ended(d, None, "upstream connection ended"))
                        .await;
                }
            }
            if unaccounted.is_some() || opened.is_some() {
                // What was queued goes out before the events the ledger reads are read: the
                // turn's `response.created` first, then its terminal.
                early = d.flush().await;
                flushed_at = sent;
                if let Some(created) = opened {
                    self.attribute(Some(Cow::Borrowed("response.created")), &created);
                }
                let terminal =
                    unaccounted.and_then(|text| self.attribute(event::sniff_type(&text), &text).0);
                if terminal.is_some() || early.is_err() {
                    ended = terminal;
                    break;
                }
            }
            if sent >= max_batch {
                break;
            }
            // The next read looks for a run first too: a frame the last read cut in two then
            // opens the next run instead of being decoded alone.
            let scan = d
                .raw_frames()
                .then(|| self.run_scan(sent, max_batch, false))
                .flatten();
            match self.try_next(&waker, scan) {
                Some(ev) => next = Some(ev),
                None => break,
            }
        }
        // The client gets the batch first; the turn's end (ledger already updated by the
        // attribution; usage, metrics, the connection's response record) follows, also when
        // the client has gone meanwhile: the upstream turn did end cleanly.
        let flushed = if sent > flushed_at {
            d.flush().await
        } else {
            early
        };
        if let Some(terminal) = ended {
            self.end_turn(terminal);
        }
        self.sync_reusable();
        if flushed.is_err() {
            return Flow::Stop;
        }
        Flow::Continue
    }

    async fn flush_client<D: Downstream>(
        &mut self,
        d: &mut D,
        sent: usize,
    ) -> Result<(), ClientGone> {
        if sent > 0 {
            d.flush().await?;
        }
        Ok(())
    }

    /// Feeds the held no-output events, then `texts`, to the client (flushed by the caller).
    async fn relay_down<D: Downstream>(
        &mut self,
        d: &mut D,
        counted: &mut BatchCount,
        sent: &mut usize,
        texts: impl IntoIterator<Item = Utf8Bytes> + Send,
    ) -> Result<(), ClientGone> {
        let held = self
            .turn
            .as_mut()
            .map(|t| {
                t.quiet_bytes = 0;
                std::mem::take(&mut t.quiet)
            })
            .unwrap_or_default();
        for text in held.into_iter().chain(texts) {
            let len = text.len();
            if let Err(e) = d.feed(text).await {
                debug!(error = %e, "client write failed");
                return Err(e);
            }
            self.relayed(counted, sent, len);
        }
        Ok(())
    }

    /// Relays the run of plain parts (deltas, items and content parts added and done, ...)
    /// that the last socket read left buffered, as raw frames (one copy into the client's
    /// write buffer instead of a decode and an encode per frame): only while a turn is in
    /// flight and the ledger attributes any part to it, so each frame is handled exactly as
    /// the per-event path would (relayed, counted, no side effects). Before the turn has shown
    /// the client output, a run is taken only if it carries output itself (see [`RunScan`]):
    /// then nothing in it would be held back, and the no-output events already held go out
    /// first, as they would in front of the run's first output event. A terminal ends the run
    /// as its last frame: it is relayed the same way and returned, to be accounted for once
    /// the batch is out (as the per-event path does once output was shown). The run stops
    /// before the first frame that is neither (see [`event::raw_kind`]); that frame is read
    /// the usual way.
    async fn relay_run<D: Downstream>(
        &mut self,
        d: &mut D,
        counted: &mut BatchCount,
        sent: &mut usize,
        max_batch: usize,
    ) -> Result<Option<Utf8Bytes>, ClientGone> {
        let Some((room, mut scan)) = self.run_scan(*sent, max_batch, false) else {
            return Ok(None);
        };
        let Some(conn) = self.upstream.as_mut().and_then(Pooled::conn_mut) else {
            return Ok(None);
        };
        let mut payloads = Vec::new();
        let Some(frames) = conn.take_text_run(room, &mut scan, &mut payloads) else {
            return Ok(None);
        };
        let run = RawRun { frames, payloads };
        let terminal = run.text(run.payloads.len().saturating_sub(1), |_| scan.ends);
        self.relay_taken(d, counted, sent, run).await?;
        Ok(terminal)
    }

    /// Relays a run taken from the upstream's buffer (see [`RunScan`]): what was held goes out
    /// in front of it (the run shows output); then the run verbatim, or frame by frame,
    /// waiting as the per-event path does, when the client's buffer is full.
    async fn relay_taken<D: Downstream>(
        &mut self,
        d: &mut D,
        counted: &mut BatchCount,
        sent: &mut usize,
        run: RawRun,
    ) -> Result<(), ClientGone> {
        if self.turn.as_ref().is_some_and(|t| !t.quiet.is_empty()) {
            Box::pin(self.relay_down(d, counted, sent, std::iter::empty())).await?;
        }
        if d.try_feed_run(&run)? {
            let bytes = run
                .payloads
                .iter()
                .map(ExactSizeIterator::len)
                .sum::<usize>();
            self.relayed_many(counted, sent, run.payloads.len(), bytes);
            counted.raw += run.payloads.len() as u64;
            return Ok(());
        }
        let texts = (0..run.payloads.len()).filter_map(|i| run.text(i, |_| true));
        Box::pin(self.relay_down(d, counted, sent, texts)).await
    }

    /// The room and the filter for a run taken from a read before any of its frames is
    /// decoded (see [`Engine::next_upstream`]): as for [`Engine::relay_run`], only while a
    /// turn is in flight and the ledger attributes any part to it; such a run may also open
    /// with the turn's `response.created` (when the ledger expects it), attributed once the
    /// run is out.
    pub(super) fn read_scan(&self) -> Option<(usize, RunScan)> {
        self.run_scan(0, self.gw.config().relay.buffer_frames, true)
    }

    /// The room (frames) and the filter for a raw run once `sent` frames of a batch of at
    /// most `max_batch` are queued: only while a turn is in flight and the ledger attributes
    /// any part to it; the held events count against the batch too (they go out in front of
    /// the run). With `created`, the run may open with the turn's `response.created` when the
    /// ledger expects it.
    fn run_scan(&self, sent: usize, max_batch: usize, created: bool) -> Option<(usize, RunScan)> {
        let turn = self.turn.as_ref()?;
        let room = max_batch.saturating_sub(sent + turn.quiet.len());
        (room > 0 && self.ledger.expects_parts()).then(|| {
            let scan = RunScan {
                shown: turn.frames > 0,
                created: created && self.ledger.expects_created(),
                ..RunScan::default()
            };
            (room, scan)
        })
    }

    /// The next upstream event if one is ready (read without waiting); with `scan`, a run
    /// that filter takes is looked for first (see [`Engine::run_scan`]).
    fn try_next(
        &mut self,
        waker: &std::task::Waker,
        scan: Option<(usize, RunScan)>,
    ) -> Option<PumpEvent> {
        let conn = self.upstream.as_mut().and_then(Pooled::conn_mut)?;
        match scan {
            Some((room, mut scan)) => conn.try_recv_run(waker, room, &mut scan),
            None => conn.try_recv(waker),
        }
    }

    /// The turn in flight has shown the client output (so it cannot move to another account).
    fn shown_output(&self) -> bool {
        self.turn.as_ref().is_some_and(|t| t.frames > 0)
    }

    /// Counts one frame of `len` payload bytes queued for the client.
    fn relayed(&mut self, counted: &mut BatchCount, sent: &mut usize, len: usize) {
        self.relayed_many(counted, sent, 1, len);
    }

    /// Counts `frames` frames of `bytes` payload bytes in all queued for the client.
    fn relayed_many(
        &mut self,
        counted: &mut BatchCount,
        sent: &mut usize,
        frames: usize,
        bytes: usize,
    ) {
        if frames == 0 {
            return;
        }
        counted.frames += frames as u64;
        counted.bytes += bytes as u64;
        *sent += frames;
        if let Some(t) = self.turn.as_mut() {
            if t.frames == 0 {
                counted.first = Some(t.started.elapsed());
            }
            t.frames += frames as u64;
        }
    }

    /// Attributes an upstream event (see [`Ledger`]); returns the turn's terminal event, if
    /// this is it. Events nobody asked for are still relayed to this session's client (the
    /// connection served no one else), but the connection is never pooled again.
    /// `ty` is the event's type as [`event::sniff_type`] read it.
    fn attribute(
        &mut self,
        ty: Option<Cow<'_, str>>,
        text: &str,
    ) -> (Option<event::Terminal>, bool) {
        let was_tainted = self.ledger.is_tainted();
        // A response's terminal is parsed once, for the ledger and for the turn's end.
        let inspected = ty
            .as_deref()
            .filter(|t| t.starts_with("response.") && event::is_terminal(t))
            .map(|t| event::Terminal::inspect(t, text));
        let verdict = match ty.as_deref() {
            Some(t) => self.ledger.attribute_inspected(t, text, inspected.as_ref()),
            None => {
                self.ledger.taint();
                Attribution::Unattributed
            }
        };
        if !was_tainted && self.ledger.is_tainted() {
            let id = self.upstream.as_ref().map(Pooled::id).unwrap_or_default();
            info!(
                upstream.id = id,
                event = %crate::telemetry::escape(ty.as_deref().unwrap_or("-"), 64),
                "upstream event not attributable with certainty; the connection will not be pooled"
            );
        }
        match (verdict, ty) {
            (Attribution::Terminal, Some(t)) if self.turn.is_some() => (
                Some(inspected.unwrap_or_else(|| event::Terminal::inspect(&t, text))),
                false,
            ),
            (Attribution::Part, Some(t)) => (None, carries_no_output(&t)),
            _ => (None, false),
        }
    }
}

/// Chooses a raw run (see [`Engine::relay_run`]): plain parts, and a terminal as the run's
/// last frame; with `created`, a `response.created` as its first frame. Before the turn has
/// shown output, the run is kept only if one of its parts carries output (comes before the
/// terminal, if any), since until then the per-event path holds no-output events back and a
/// rate-limited terminal moves the turn to another account.
#[derive(Default)]
pub(super) struct RunScan {
    /// The turn has shown the client output already.
    shown: bool,
    /// The run may open with the turn's `response.created`.
    created: bool,
    /// A part that carries output was accepted.
    output: bool,
    /// The run ends with a terminal.
    ends: bool,
    /// Frames accepted so far.
    accepted: usize,
}

impl RunFilter for RunScan {
    fn accept(&mut self, payload: &[u8]) -> bool {
        if self.ends {
            return false;
        }
        let take = match event::raw_kind(payload, true) {
            Some(event::RawKind::Part) => {
                if !(self.shown || self.output) {
                    self.output =
                        event::raw_type(payload).is_some_and(|t| !type_carries_no_output(t));
                }
                true
            }
            Some(event::RawKind::Terminal) => {
                self.ends = true;
                true
            }
            Some(event::RawKind::Created) => self.created && self.accepted == 0,
            None => false,
        };
        self.accepted += usize::from(take);
        take
    }

    fn keep(&mut self, accepted: usize) -> usize {
        if self.shown || self.output {
            accepted
        } else {
            // Nothing taken: the filter starts over at the next scan (a read that waits for
            // more bytes scans its buffer again with the same filter).
            self.ends = false;
            self.accepted = 0;
            0
        }
    }
}

/// Adds a batch's frames and bytes to the upstream->client counters, and the turn's time to
/// its first event if the batch had it, when dropped (after the batch's flush).
struct BatchCount {
    gw: Arc<Shared>,
    frames: u64,
    bytes: u64,
    /// Of `frames`, those relayed verbatim.
    raw: u64,
    first: Option<std::time::Duration>,
}

impl Drop for BatchCount {
    fn drop(&mut self) {
        if self.frames > 0 {
            self.gw.relay.frames_down.increment(self.frames);
            self.gw.relay.bytes_down.increment(self.bytes);
        }
        if self.raw > 0 {
            self.gw.relay.raw_down.increment(self.raw);
        }
        if let Some(first) = self.first {
            self.gw.relay.first_event(first);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A filter that kept nothing scans the next read as it scanned the first: the turn's
    /// `response.created` may still open a run (a read that waits for more bytes reuses it).
    #[test]
    fn a_run_scan_that_kept_nothing_starts_over() {
        let created = br#"{"type":"response.created","response":{"id":"resp_1"}}"#;
        let quiet = br#"{"type":"response.in_progress","response":{}}"#;
        let delta = br#"{"type":"response.output_text.delta","delta":"hi"}"#;
        let mut scan = RunScan {
            created: true,
            ..RunScan::default()
        };
        assert!(scan.accept(created) && scan.accept(quiet));
        assert_eq!(scan.keep(2), 0, "no output, nothing kept");
        assert!(scan.accept(created), "the created opens the next scan");
        assert!(scan.accept(quiet) && scan.accept(delta));
        assert_eq!(scan.keep(3), 3, "output: the run is kept");
        assert!(!scan.accept(created), "a created only opens a run");
    }
}
