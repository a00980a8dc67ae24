//! The turn engine: one client conversation's turns over one upstream connection at a time,
//! independent of the ingress that carries them (a WebSocket session, an HTTP request).
//!
//! The engine owns the route (client, lane, affinity), the account assignment, the pooled
//! upstream connection and its [`Ledger`], and the turn in flight: checkout or owner routing
//! of `previous_response_id`, send, relay until the turn's own terminal event, stale-reuse
//! retry, rate-limit failover, accounting and metrics. What reaches the client goes through a
//! [`Downstream`], which each ingress implements (WebSocket frames, SSE events, one JSON body).
//!
//! The rate-limit failover (holding no-output events, replaying on another account) is in
//! `failover`; the downstream relay of a batch of upstream frames (attribution, raw runs of
//! deltas, one flush) in `relay`.
//!
//! Invariants:
//! - At most one turn in flight per engine (the ingress holds or refuses a second request).
//! - The upstream connection is reusable only between turns and while the ledger is clean;
//!   if the engine ends mid-turn, the upstream fails, or an event could not be attributed,
//!   it is discarded and never pooled.
//! - Rotation (max-age, account change) happens only at the start of a turn, and only for full
//!   requests: a continuation (`previous_response_id`) stays on the connection that owns it.
//! - Upstream frames are relayed verbatim and in order, read from the upstream socket by this
//!   task (no hop through another task): up to `relay.buffer_frames` ready frames are fed to
//!   the downstream and flushed once. The downstream is the back-pressure point: while its
//!   write waits, the upstream is not read.

use std::future::Future;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tracing::{Instrument, Span, debug, info, info_span};

use crate::close::{self, Disposition};
use crate::error::AcquireError;
use crate::event;
use crate::gateway::Shared;
use crate::headers::{ForwardHeaders, HeaderIds};
use crate::ids::{ConversationId, Ingress, Route};
use crate::pool::{EvictReason, NewReason, PoolKey, Pooled};
use crate::pump::{PumpEvent, RawRun};
use crate::turn::{Ledger, Sent};
use crate::upstream::UpstreamConn;

mod failover;
mod relay;

/// Whether the ingress goes on.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Flow {
    Continue,
    Stop,
}

/// The client went away (a write failed, or it hung up).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the client went away")]
pub(crate) struct ClientGone;

/// Where the engine's output goes: implemented by each ingress.
pub(crate) trait Downstream: Send {
    /// Queues one upstream frame, verbatim (written out by [`Downstream::flush`]).
    fn feed(&mut self, text: Utf8Bytes) -> impl Future<Output = Result<(), ClientGone>> + Send;
    /// Whether runs of frames taken from the upstream's buffer undecoded can be queued
    /// ([`Downstream::try_feed_run`]): a WebSocket client (the frames verbatim) and a
    /// server-sent event stream (each frame's payload as an event).
    fn raw_frames(&self) -> bool {
        false
    }
    /// Queues a run of upstream frames (see [`RawRun`]) if that needs no waiting; `false`
    /// when they have to go one by one through [`Downstream::feed`].
    fn try_feed_run(&mut self, _run: &RawRun) -> Result<bool, ClientGone> {
        Ok(false)
    }
    /// Writes out what was queued.
    fn flush(&mut self) -> impl Future<Output = Result<(), ClientGone>> + Send;
    /// An `error` event of the gateway's own (WebSocket shape: top-level `status`, nested
    /// `error`).
    fn error(
        &mut self,
        event: serde_json::Value,
    ) -> impl Future<Output = Result<(), ClientGone>> + Send;
    /// The upstream closed with `code` (1012/1013) mid-turn; the ingress ends.
    fn closed(&mut self, code: u16, reason: &str) -> impl Future<Output = ()> + Send;
    /// The upstream connection that will serve the turn (its 101 headers; `reused`: the
    /// turn-state token belongs to the turn that opened it).
    fn connected(&mut self, _headers: &[(HeaderName, HeaderValue)], _reused: bool) {}
}

/// The turn in flight.
struct Turn {
    seq: u64,
    span: Span,
    started: Instant,
    /// Frames relayed to the client so far (visible output).
    frames: u64,
    /// The request, kept for one retry on a fresh connection while nothing has reached the
    /// client: only for full requests on a connection that was used before (stale reuse).
    retry: Option<Utf8Bytes>,
    /// The full request (`None` for a continuation), replayed on another account when this
    /// one hits a rate limit before anything reached the client.
    request: Option<Utf8Bytes>,
    /// No-output events held back while nothing was shown (bounded by `HOLD_*`).
    quiet: Vec<Utf8Bytes>,
    quiet_bytes: usize,
    /// Accounts this turn already left because of a rate limit (one failover per account).
    failed_over: Vec<crate::ids::AccountId>,
}

/// What the ingress resolved before the first turn.
pub(crate) struct EngineStart {
    pub id: u64,
    pub span: Span,
    /// The ids the headers carried (the body fills the gaps at the first request).
    pub ids: HeaderIds,
    pub route: Route,
    pub headers: ForwardHeaders,
    pub upstream: Option<Pooled<UpstreamConn>>,
    pub ingress: Ingress,
}

pub(crate) struct Engine {
    gw: Arc<Shared>,
    id: u64,
    span: Span,
    ids: HeaderIds,
    route: Route,
    /// True once the route can no longer change (first turn started).
    keyed: bool,
    headers: ForwardHeaders,
    upstream: Option<Pooled<UpstreamConn>>,
    /// What the upstream connection in `upstream` owes us (reset with the connection).
    ledger: Ledger,
    turn: Option<Turn>,
    turn_seq: u64,
    /// Turns completed on the current upstream.
    conn_turns: u64,
    /// When the upstream last sent something.
    last_upstream: Instant,
    ingress: Ingress,
}

impl Engine {
    pub fn new(gw: Arc<Shared>, start: EngineStart) -> Engine {
        Engine {
            id: start.id,
            span: start.span,
            keyed: start.upstream.is_some(),
            ids: start.ids,
            route: start.route,
            headers: start.headers,
            upstream: start.upstream,
            ledger: Ledger::default(),
            turn: None,
            turn_seq: 0,
            conn_turns: 0,
            last_upstream: Instant::now(),
            ingress: start.ingress,
            gw,
        }
    }

    /// A turn is in flight.
    pub fn in_turn(&self) -> bool {
        self.turn.is_some()
    }

    /// Turns started so far.
    pub fn turns(&self) -> u64 {
        self.turn_seq
    }

    /// Side events sent and not yet answered by the upstream.
    pub fn outstanding(&self) -> usize {
        self.ledger.outstanding()
    }

    /// The next event of the held upstream connection (pending forever without one). With
    /// `raw` (a client that takes raw frames, see [`Downstream::raw_frames`]) and a turn in
    /// flight, a run of the turn's frames is looked for first in each read, before any of its
    /// frames is decoded (see [`Engine::read_scan`]).
    pub async fn next_upstream(&mut self, raw: bool) -> Option<PumpEvent> {
        let scan = raw.then(|| self.read_scan()).flatten();
        match self.upstream.as_mut().and_then(Pooled::conn_mut) {
            Some(conn) => match scan {
                Some((room, scan)) => Some(conn.recv_run(room, scan).await),
                None => conn.recv().await,
            },
            None => std::future::pending().await,
        }
    }

    /// When the turn in flight times out if the upstream stays silent
    /// (`limits.turn_idle_timeout`); `None` between turns.
    pub fn idle_deadline(&self) -> Option<Instant> {
        let turn = self.turn.as_ref()?;
        Some(self.last_upstream.max(turn.started) + self.gw.config().limits.turn_idle_timeout)
    }

    /// The idle deadline passed (the caller checked [`Engine::idle_deadline`]): the upstream
    /// went quiet mid-turn, give up on this connection.
    pub async fn turn_idle_expired<D: Downstream>(&mut self, d: &mut D) -> Flow {
        let Some(turn) = self.turn.take() else {
            return Flow::Continue;
        };
        let timeout = self.gw.config().limits.turn_idle_timeout;
        crate::metrics::error("turn_idle_timeout");
        self.gw
            .relay
            .turn("upstream_failed", self.ingress, turn.started.elapsed());
        if let Some(up) = self.upstream.take() {
            info!(upstream.id = up.id(), "upstream silent mid-turn; discarded");
            self.evict(up, EvictReason::Dead);
        }
        let msg = format!(
            "no upstream event for {timeout:?} (limits.turn_idle_timeout); the upstream connection was discarded"
        );
        Box::pin(self.send_error(d, 504, "upstream_timeout", &msg)).await
    }

    /// Ends the engine: the upstream goes back to the pool only if no turn was in flight and
    /// its ledger is clean.
    pub fn finish(&mut self) {
        if let Some(turn) = self.turn.take() {
            if let Some(up) = &self.upstream {
                info!(parent: &turn.span, upstream.id = up.id(), "client left mid-turn; upstream discarded");
            }
            self.gw
                .relay
                .turn("aborted", self.ingress, turn.started.elapsed());
            crate::metrics::error("client_left_mid_turn");
        }
        self.sync_reusable();
        drop(self.upstream.take());
    }

    /// A client event that does not start a turn (`response.steer`, `response.inject`,
    /// `response.processed`): sent at once, and its answer awaited by the ledger.
    pub async fn forward_side<D: Downstream>(
        &mut self,
        d: &mut D,
        kind: Sent,
        text: Utf8Bytes,
    ) -> Flow {
        if self.upstream.as_ref().and_then(Pooled::conn).is_none() {
            return Box::pin(self.send_error(
                d,
                400,
                "no_active_connection",
                "send response.create before other events on this connection",
            ))
            .await;
        }
        self.ledger.sent(kind);
        self.sync_reusable();
        if let Err(e) = self.send_upstream(text).await {
            debug!(error = %e, "upstream send failed");
            return Box::pin(self.upstream_ended(d, None, &e.to_string())).await;
        }
        Flow::Continue
    }

    /// The held connection may go back to the pool only between turns with a clean ledger.
    fn sync_reusable(&mut self) {
        let clean = self.turn.is_none() && self.ledger.is_clean();
        if let Some(up) = self.upstream.as_mut() {
            up.set_reusable(clean);
        }
    }

    /// Sends a client frame to the current upstream, counted. A failed send also surfaces as
    /// the pump's end event, which the loop handles like any upstream failure.
    async fn send_upstream(&mut self, text: Utf8Bytes) -> Result<(), tungstenite::Error> {
        count_frame(
            &self.gw.relay.frames_up,
            &self.gw.relay.bytes_up,
            text.len(),
        );
        match self.upstream.as_mut().and_then(Pooled::conn_mut) {
            Some(conn) => conn.send(Message::Text(text)).await,
            None => Err(tungstenite::Error::AlreadyClosed),
        }
    }

    pub async fn start_turn<D: Downstream>(
        &mut self,
        d: &mut D,
        text: Utf8Bytes,
        previous: Option<String>,
        cache_key: Option<String>,
    ) -> Flow {
        if !self.keyed {
            self.keyed = true;
            if self.route.lane.is_none()
                && let Some(key) = cache_key
            {
                match ConversationId::parse(&key) {
                    Ok(c) => {
                        self.span
                            .record("conversation", tracing::field::display(&c));
                        self.route = self.ids.route(self.route.client.clone(), Some(c));
                    }
                    Err(e) => {
                        self.keyed = false;
                        return Box::pin(self.send_error(
                            d,
                            400,
                            "invalid_prompt_cache_key",
                            &format!("prompt_cache_key {e}"),
                        ))
                        .await;
                    }
                }
            }
        }
        self.rotate_if_needed(previous.is_some());
        if previous.is_some() && self.ingress == Ingress::Http {
            Box::pin(self.wait_for_owner()).await;
        }
        if let Some(prev) = &previous
            && !self.route_to_owner(prev)
        {
            Box::pin(self.log_owner(prev)).await;
            return Box::pin(self
                .send_error(d,
                    400,
                    "previous_response_not_found",
                    &format!(
                        "previous_response_id `{prev}` is not held by a live upstream connection of this conversation; \
                         resend the full context without previous_response_id"
                    ),
                ))
                .await;
        }
        if self.upstream.is_none() {
            match Box::pin(self.acquire(None)).await {
                Ok(p) => self.set_upstream(p),
                Err(e) => return Box::pin(self.acquire_failed(d, e)).await,
            }
        }
        let Some(up) = self.upstream.as_mut() else {
            return Flow::Continue;
        };
        if let Some(conn) = up.conn() {
            d.connected(
                conn.response_headers(),
                up.is_reused() || self.conn_turns > 0,
            );
        }
        self.turn_seq += 1;
        let span = info_span!(
            parent: &self.span,
            "turn",
            turn.seq = self.turn_seq,
            upstream.id = up.id(),
            upstream.reused = up.is_reused(),
        );
        let used_before = up.is_reused() || self.conn_turns > 0;
        up.set_reusable(false);
        let retry = (previous.is_none() && used_before).then(|| text.clone());
        let request = text.clone();
        self.ledger.sent(Sent::Create);
        // A failed send surfaces as the pump's end event, handled like any mid-turn failure.
        if let Err(e) = self.send_upstream(text).await {
            debug!(parent: &span, error = %e, "upstream send failed");
        }
        debug!(parent: &span, "turn started");
        self.last_upstream = Instant::now();
        self.turn = Some(Turn {
            seq: self.turn_seq,
            span,
            started: Instant::now(),
            frames: 0,
            retry,
            request: previous.is_none().then_some(request),
            quiet: Vec::new(),
            quiet_bytes: 0,
            failed_over: Vec::new(),
        });
        Flow::Continue
    }

    /// With a cluster: says in the log where a continuation this instance cannot serve
    /// lives (`prev_id_owner=other_instance owner_instance=...`), from the owner record.
    async fn log_owner(&self, previous: &str) {
        let cluster = &self.gw.cluster;
        if !cluster.enabled() {
            return;
        }
        let owner = cluster.owner(previous, self.route.client.as_str()).await;
        let (place, instance) = match &owner {
            Some(o) if !o.same_client => ("other_client", "-"),
            Some(o) if Some(o.instance.as_str()) == cluster.instance() => {
                ("this_instance", o.instance.as_str())
            }
            Some(o) => ("other_instance", o.instance.as_str()),
            None => ("unknown", "-"),
        };
        info!(
            prev_id_owner = %place,
            owner_instance = %crate::telemetry::escape(instance, 64),
            "continuation not held by a connection here; previous_response_not_found"
        );
    }

    /// An owned future (the session itself is not `Sync`, so it is not borrowed across the dial).
    fn acquire(
        &self,
        hint: Option<NewReason>,
    ) -> impl std::future::Future<Output = Result<Pooled<UpstreamConn>, AcquireError>> + Send + 'static
    {
        let (gw, route, headers) = (self.gw.clone(), self.route.clone(), self.headers.clone());
        let routing = self.id.to_string();
        let ingress = self.ingress;
        async move { gw.acquire(&route, &routing, &headers, hint, ingress).await }
            .instrument(self.span.clone())
    }

    fn set_upstream(&mut self, p: Pooled<UpstreamConn>) {
        self.span
            .record("account", tracing::field::display(p.account()));
        self.upstream = Some(p);
        self.ledger = Ledger::default();
        self.conn_turns = 0;
    }

    async fn acquire_failed<D: Downstream>(&mut self, d: &mut D, e: AcquireError) -> Flow {
        let ev = match &e {
            AcquireError::NoAccount { retry_after } => {
                event::limit_error("all_accounts_unavailable", *retry_after)
            }
            e => event::error_value(e.http_status(), e.code(), &e.to_string()),
        };
        debug!(error = %e, "acquire failed");
        crate::metrics::error(e.code());
        match d.error(ev).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        }
    }

    /// Between turns: drop the held upstream if it may not serve this turn. An unusable
    /// account (rate-limited, refused, disabled, removed) is always left; an expired connection
    /// only for full requests (a continuation needs the connection that owns its parent, and
    /// the upstream's own 60-minute limit is later than `max_age`).
    fn rotate_if_needed(&mut self, continuation: bool) {
        let Some(up) = self.upstream.as_ref() else {
            return;
        };
        let Some(conn) = up.conn() else {
            self.upstream = None;
            return;
        };
        let account_gone = !self.gw.account_usable(conn.account());
        let expired = conn.age() >= self.gw.pool.limits().max_age;
        if account_gone || (expired && !continuation) {
            debug!(
                upstream.id = up.id(),
                account_gone, expired, "rotating upstream between turns"
            );
            // Dropped while reusable: the pool logs `max_age` (or discards an evicted slot).
            self.upstream = None;
        }
    }

    /// An HTTP continuation whose lane's pooled connection is busy (the previous request of
    /// the same lane still streaming) waits for it, as a frame held behind a turn would,
    /// at most `limits.turn_idle_timeout`.
    async fn wait_for_owner(&self) {
        if let Some(key) = self.owner_key() {
            let wait = self.gw.config().limits.turn_idle_timeout;
            self.gw.pool.wait_released(&key, wait).await;
        }
    }

    /// The pool key whose connection may own this route's previous responses: the tenant's
    /// own lane on the affinity's account (owner routing never leaves it, DESIGN §2).
    fn owner_key(&self) -> Option<PoolKey> {
        let (lane, affinity) = (self.route.lane.clone()?, self.route.affinity.clone()?);
        let client = self.route.client.clone();
        let assignment = self
            .gw
            .accounts
            .assign(Some(&(client.clone(), affinity)), "")
            .ok()?;
        Some(PoolKey {
            client,
            account: assignment.account.id.clone(),
            conversation: lane,
        })
    }

    /// Makes sure the upstream that holds `previous` serves this turn: the current one, or the
    /// conversation's idle pooled connection if that one produced it. False if no live
    /// connection holds it (never send a continuation to a connection that lacks its parent).
    fn route_to_owner(&mut self, previous: &str) -> bool {
        if self
            .upstream
            .as_ref()
            .and_then(Pooled::conn)
            .is_some_and(|c| c.produced(previous))
        {
            return true;
        }
        let Some(key) = self.owner_key() else {
            return false;
        };
        match self.gw.pool.checkout_owner(&key, |c| c.produced(previous)) {
            Some(co) => {
                let mut p = co.pooled;
                p.set_reusable(true);
                // The connection we had (a bypass one) closes; the owner takes over.
                self.set_upstream(p);
                self.conn_turns = 1;
                true
            }
            None => false,
        }
    }

    fn end_turn(&mut self, terminal: event::Terminal) {
        if let Some(up) = self.upstream.as_mut() {
            if let Some((input, cached)) = terminal.usage {
                self.gw.relay.usage(up.decision(), input, cached);
                self.gw.usage.add(up.decision(), input, cached);
            }
            if let Some(conn) = up.conn_mut() {
                conn.count_turn();
                if let Some(id) = terminal.completed_response_id() {
                    conn.record_response(id);
                    if self.gw.cluster.enabled() {
                        let lane = self.route.lane.as_ref().map(|l| l.as_str()).unwrap_or("");
                        let ttl = self.gw.pool.limits().max_age;
                        self.gw
                            .cluster
                            .record_owner(id, self.route.client.as_str(), lane, ttl);
                    }
                }
            }
        }
        if terminal.rate_limited
            && let Some(up) = self.upstream.as_ref()
        {
            // The account cools down; its conversations (this one included) move on their
            // next full request.
            self.gw.cool_down(up.account(), terminal.retry_after);
        }
        self.conn_turns += 1;
        if let Some(turn) = self.turn.take() {
            self.gw
                .relay
                .turn(&terminal.kind, self.ingress, turn.started.elapsed());
            debug!(
                parent: &turn.span,
                turn.seq = turn.seq,
                frames = turn.frames,
                duration_ms = turn.started.elapsed().as_millis() as u64,
                "turn ended"
            );
        }
        if terminal.connection_limit {
            // The upstream's connection lifetime is over: treat it like max_age.
            if let Some(up) = self.upstream.take() {
                self.evict(up, EvictReason::MaxAge);
            }
        } else {
            self.sync_reusable();
        }
    }

    /// The upstream connection ended (close frame with `code`, or failure when `None`).
    async fn upstream_ended<D: Downstream>(
        &mut self,
        d: &mut D,
        code: Option<CloseCode>,
        detail: &str,
    ) -> Flow {
        let in_turn = self.turn.is_some();
        let Some(up) = self.upstream.take() else {
            return Flow::Continue;
        };
        let id = up.id();
        crate::metrics::error("upstream_ended");
        // Stale reuse: a used connection failed before anything of this full request reached
        // the client. Retry once on a fresh connection.
        let retry = self.turn.as_mut().filter(|t| t.frames == 0).and_then(|t| {
            // What the failed connection said (no output) goes with it.
            t.quiet.clear();
            t.quiet_bytes = 0;
            t.retry.take()
        });
        if let Some(text) = retry {
            let reason = match code {
                Some(CloseCode::Restart) => EvictReason::Close1012,
                Some(CloseCode::Again) => EvictReason::Close1013,
                _ => EvictReason::Dead,
            };
            info!(
                upstream.id = id,
                detail, "reused upstream failed before the turn produced anything; retrying once"
            );
            self.evict(up, reason);
            match Box::pin(self.acquire(Some(NewReason::RetryAfterStaleReuse))).await {
                Ok(p) => {
                    self.set_upstream(p);
                    self.ledger.sent(Sent::Create);
                    self.sync_reusable();
                    if let Err(e) = self.send_upstream(text).await {
                        debug!(error = %e, "retry send failed");
                    }
                    return Flow::Continue;
                }
                Err(e) => {
                    self.turn = None;
                    return Box::pin(self.acquire_failed(d, e)).await;
                }
            }
        }
        if let Some(turn) = &self.turn {
            self.gw
                .relay
                .turn("upstream_failed", self.ingress, turn.started.elapsed());
        }
        match close::upstream_ended(code, in_turn) {
            Disposition::EvictAndForward { code, reason } => {
                self.evict(up, reason);
                self.turn = None;
                let why = format!(
                    "upstream closed with {code}{}{detail}",
                    if detail.is_empty() { "" } else { ": " }
                );
                d.closed(code, &why).await;
                Flow::Stop
            }
            Disposition::FailTurn { status, code } => {
                self.evict(up, EvictReason::Dead);
                self.turn = None;
                let msg = format!(
                    "upstream connection {id} failed before the response completed: {}",
                    fallback(detail)
                );
                Box::pin(self.send_error(d, status, code, &msg)).await
            }
            Disposition::Discard => {
                debug!(upstream.id = id, detail, "upstream ended between turns");
                self.evict(up, EvictReason::Dead);
                Flow::Continue
            }
        }
    }

    /// Evicts every pooled connection of this session's key, including `up`.
    fn evict(&self, up: Pooled<UpstreamConn>, reason: EvictReason) {
        if up.is_pooled() {
            up.evict(reason);
        } else {
            // A bypass connection: still evict whatever the pool holds for the key.
            if let Some(key) = up.key().cloned() {
                drop(up);
                self.gw.pool.evict_key(&key, reason);
            }
        }
    }

    async fn send_error<D: Downstream>(
        &mut self,
        d: &mut D,
        status: u16,
        code: &str,
        message: &str,
    ) -> Flow {
        debug!(status, code, message, "error event to client");
        match d.error(event::error_value(status, code, message)).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        }
    }
}

fn count_frame(frames: &::metrics::Counter, bytes: &::metrics::Counter, len: usize) {
    frames.increment(1);
    bytes.increment(len as u64);
}

fn fallback(detail: &str) -> &str {
    if detail.is_empty() {
        "connection closed"
    } else {
        detail
    }
}
