//! `wsgate loadgen`: a load generator for Responses-WebSocket endpoints (the gateway, a plain
//! reverse proxy, or the mock upstream directly), shaped like Codex traffic.
//!
//! Each session is one conversation: it connects with `session-id`, runs M turns (full first,
//! then `previous_response_id` continuations, or a reconnect and a full request every turn),
//! and measures time to first event and per-event latency (from the `ts_ns` send stamps the
//! mock writes in `--speed` mode). Idle mode opens sessions, runs one turn each and holds them,
//! sampling a process's RSS (the gateway's memory per idle session).

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::client::{Client, ClientError, create_text};

mod http;
mod procfs;
mod stats;
mod think;

use crate::event;
pub use procfs::{CpuTimes, HostTicks, cpu_times, host_ticks, rss_kib};
pub use stats::Percentiles;
use stats::{Stats, percentiles};
use think::think_time;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadgenConfig {
    pub url: String,
    /// Bearer key for the target (the gateway's client key), if any.
    pub key: Option<String>,
    pub sessions: usize,
    pub turns: usize,
    pub deltas: usize,
    pub delta_size: usize,
    /// The mock's pause between deltas (zero: none; the mock then writes a turn at once).
    pub delta_interval: Duration,
    pub think: Duration,
    /// Spread of the think time: each pause is drawn from `think * [1 - j, 1 + j]` (mean
    /// `think`), by a hash of the session and turn, so every target sees the same schedule.
    /// 0 makes every session pause exactly `think`: sessions started together then stay in
    /// lockstep and their turns arrive in bursts.
    pub think_jitter: f64,
    pub reconnect_every_turn: bool,
    /// Idle mode: after one turn, hold every session open this long.
    pub idle_hold: Option<Duration>,
    /// Sample this process's RSS in idle mode.
    pub rss_pid: Option<u32>,
    /// Report the CPU time this process (and its descendants) spent during the run.
    pub cpu_pid: Option<u32>,
    /// The mock upstream, to report its connection count.
    pub mock_url: Option<String>,
    /// Concurrent connection attempts.
    pub connect_concurrency: usize,
    pub label: String,
    /// Prefix for conversation ids (unique per run).
    pub run_id: String,
    /// HTTP ingress: every turn is a `POST` (SSE) on a kept-alive HTTP/1.1 connection to the
    /// same path (`ws://` -> `http://`), instead of a frame on a WebSocket.
    pub http: bool,
    /// With `http`: non-streaming POSTs (`stream: false`), one JSON body per turn, counted as
    /// one event (the body's arrival is the turn's first event; no per-event latency).
    pub http_json: bool,
}

impl LoadgenConfig {
    /// A run against `url` labelled `label` (also its conversation-id prefix), with the
    /// command line's defaults: 8 sessions of 10 turns of 10 deltas, no think time, WebSocket.
    pub fn new(url: impl Into<String>, label: &str) -> LoadgenConfig {
        LoadgenConfig {
            url: url.into(),
            key: None,
            sessions: 8,
            turns: 10,
            deltas: 10,
            delta_size: 0,
            delta_interval: Duration::ZERO,
            think: Duration::ZERO,
            think_jitter: 0.5,
            reconnect_every_turn: false,
            idle_hold: None,
            rss_pid: None,
            cpu_pid: None,
            mock_url: None,
            connect_concurrency: 128,
            label: label.into(),
            run_id: label.into(),
            http: false,
            http_json: false,
        }
    }
}

/// A run's result.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub label: String,
    pub sessions: usize,
    pub turns_ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed_s: f64,
    pub turns_per_s: f64,
    pub events: u64,
    pub events_per_s: f64,
    /// Time from sending `response.create` to the first event, in milliseconds.
    pub ttfe_ms: Percentiles,
    /// Upstream send time to client receive time of each delta, in microseconds.
    pub event_latency_us: Percentiles,
    /// Idle mode: RSS of `rss_pid` before and while holding the sessions (KiB).
    pub rss_before_kib: Option<u64>,
    pub rss_held_kib: Option<u64>,
    pub rss_per_session_kib: Option<f64>,
    /// Streaming mode with `rss_pid`: the largest RSS sampled during the run (KiB).
    pub rss_peak_kib: Option<u64>,
    /// CPU seconds (user + system) of `cpu_pid` and its descendants during the run.
    pub cpu_s: Option<f64>,
    /// `cpu_s` per million events received.
    pub cpu_s_per_million_events: Option<f64>,
    /// The user-space and kernel shares of `cpu_s`, per million events received.
    pub cpu_user_s_per_million_events: Option<f64>,
    pub cpu_system_s_per_million_events: Option<f64>,
    /// The share of the machine's CPU time its hypervisor gave to other guests during the
    /// run, percent (`/proc/stat` steal; Linux). A run with a large share measured the
    /// neighbours as much as the target (bench/compare.sh runs it again).
    pub host_steal_pct: Option<f64>,
    /// The mock upstream's counters after the run.
    pub mock: Option<Value>,
    /// Upstream connections the mock accepted during this run.
    pub upstream_connections_opened: Option<u64>,
}

struct Ctx {
    cfg: LoadgenConfig,
    connects: Semaphore,
}

impl Ctx {
    /// The prompt that asks the mock for this load's turn shape.
    fn load_text(&self) -> String {
        let mut text = format!(
            "load [[mock: deltas={}, size={}",
            self.cfg.deltas, self.cfg.delta_size
        );
        if !self.cfg.delta_interval.is_zero() {
            text.push_str(&format!(
                ", interval={}",
                self.cfg.delta_interval.as_millis().max(1)
            ));
        }
        text.push_str("]]");
        text
    }

    /// The pause before turn `turn` of `session` (see [`LoadgenConfig::think_jitter`]).
    fn think(&self, session: &str, turn: usize) -> Duration {
        think_time(self.cfg.think, self.cfg.think_jitter, session, turn)
    }

    /// `turns` turns of `conversation` on one connection of kind `C`: continuations on it,
    /// a new connection (and a full request) after a failed turn or, with
    /// `reconnect_every_turn`, before every turn. Returns the connection still open.
    async fn turns<C: Conn>(
        &self,
        conversation: &str,
        turns: usize,
        mut stats: Stats,
    ) -> (Stats, Option<C>) {
        let mut conn: Option<C> = None;
        let mut prev: Option<String> = None;
        for t in 0..turns {
            if t > 0 && !self.cfg.think.is_zero() {
                tokio::time::sleep(self.think(conversation, t)).await;
            }
            if self.cfg.reconnect_every_turn
                && let Some(c) = conn.take()
            {
                c.abandon();
                prev = None;
            }
            if conn.is_none() {
                match C::open(self, conversation).await {
                    Ok(c) => conn = Some(c),
                    Err(e) => {
                        stats.error(e);
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            match c
                .turn(self, conversation, prev.as_deref(), &mut stats)
                .await
            {
                Ok(id) => {
                    stats.turns_ok += 1;
                    prev = id;
                }
                Err(e) => {
                    stats.error(e);
                    conn = None;
                    prev = None;
                }
            }
        }
        (stats, conn)
    }

    /// Session `i`, recording into `stats` (made before the clock started).
    async fn session(&self, i: usize, stats: Stats) -> (Stats, Option<Client>) {
        let conversation = format!("{}-{i}", self.cfg.run_id);
        if self.cfg.http {
            let (stats, _) = self
                .turns::<http::HttpSender>(&conversation, self.cfg.turns, stats)
                .await;
            return (stats, None);
        }
        let turns = if self.cfg.idle_hold.is_some() {
            1
        } else {
            self.cfg.turns
        };
        let (stats, client) = self.turns::<Client>(&conversation, turns, stats).await;
        if self.cfg.idle_hold.is_some() {
            return (stats, client);
        }
        if let Some(c) = client {
            c.close().await;
        }
        (stats, None)
    }
}

/// One session's connection to the target, over WebSocket ([`Client`]) or HTTP
/// ([`http::HttpSender`]): what [`Ctx::turns`] opens, runs turns on and drops.
trait Conn: Sized {
    type Error: std::fmt::Display;
    async fn open(ctx: &Ctx, conversation: &str) -> Result<Self, Self::Error>;
    /// One turn; the completed response's id.
    async fn turn(
        &mut self,
        ctx: &Ctx,
        conversation: &str,
        prev: Option<&str>,
        stats: &mut Stats,
    ) -> Result<Option<String>, Self::Error>;
    /// Dropped before a reconnect.
    fn abandon(self) {}
}

impl Conn for Client {
    type Error = ClientError;

    async fn open(ctx: &Ctx, conversation: &str) -> Result<Client, ClientError> {
        let _permit = ctx.connects.acquire().await;
        let auth = ctx.cfg.key.as_ref().map(|k| format!("Bearer {k}"));
        let mut headers = vec![
            ("session-id", conversation),
            ("openai-beta", "responses_websockets=2026-02-06"),
        ];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        let mut c = Client::connect(&ctx.cfg.url, &headers).await?;
        c.set_timeout(Duration::from_secs(120));
        Ok(c)
    }

    async fn turn(
        &mut self,
        ctx: &Ctx,
        conversation: &str,
        prev: Option<&str>,
        stats: &mut Stats,
    ) -> Result<Option<String>, ClientError> {
        let text = ctx.load_text();
        let body = create_text(Some(conversation), &text, prev);
        let sent = Instant::now();
        self.send_text(&body).await?;
        let mut first = true;
        loop {
            let frame = self.recv_text().await?;
            if first {
                first = false;
                stats.first_event(sent);
            }
            stats.event(&frame);
            let Some(ty) = event::sniff_type(&frame) else {
                continue;
            };
            if event::is_terminal(&ty) {
                if ty != "response.completed" {
                    return Err(ClientError::TurnFailed(frame.chars().take(200).collect()));
                }
                return Ok(event::response_id(&frame));
            }
        }
    }

    /// Codex exits or reconnects without a close handshake.
    fn abandon(self) {
        self.abort();
    }
}

async fn mock_stats(url: &str) -> Option<Value> {
    let base = url
        .split("/v1/")
        .next()
        .unwrap_or(url)
        .trim_end_matches('/');
    let mut c = Client::connect(&format!("{base}/mock/stats"), &[])
        .await
        .ok()?;
    c.recv().await.ok()
}

/// Runs the load and reports.
pub async fn run(cfg: LoadgenConfig) -> Report {
    let ctx = Arc::new(Ctx {
        connects: Semaphore::new(cfg.connect_concurrency.max(1)),
        cfg: cfg.clone(),
    });
    let rss_before = cfg.rss_pid.and_then(rss_kib);
    let mock_before = match &cfg.mock_url {
        Some(url) => mock_stats(url).await,
        None => None,
    };
    let cpu_before = cfg.cpu_pid.and_then(cpu_times);
    let host_before = host_ticks();
    // Streaming runs with `rss_pid`: sample the target's memory while the load runs.
    let rss_peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = match (cfg.rss_pid, cfg.idle_hold) {
        (Some(pid), None) => {
            let peak = rss_peak.clone();
            Some(tokio::spawn(async move {
                loop {
                    if let Some(k) = rss_kib(pid) {
                        peak.fetch_max(k, std::sync::atomic::Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }))
        }
        _ => None,
    };
    // Each session's histograms are made before the clock starts and merged after it stops:
    // that work is the load generator's, and on this 2-core machine it would come out of the
    // target's share of the CPU.
    let mut fresh: Vec<Stats> = (0..cfg.sessions).map(|_| Stats::new()).collect();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..cfg.sessions {
        let ctx = ctx.clone();
        let s = fresh.pop().unwrap_or_else(Stats::new);
        tasks.spawn(async move { ctx.session(i, s).await });
    }
    let mut stats = Stats::new();
    let mut done = Vec::with_capacity(cfg.sessions);
    let mut held = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok((s, c)) => {
                done.push(s);
                held.extend(c);
            }
            Err(e) => stats.error(e),
        }
    }
    let elapsed = started.elapsed();
    let host_steal_pct = host_before
        .zip(host_ticks())
        .and_then(|(before, after)| after.steal_pct_since(before));
    for s in done {
        stats.merge(s);
    }
    let mut report = Report {
        label: cfg.label.clone(),
        sessions: cfg.sessions,
        elapsed_s: elapsed.as_secs_f64(),
        host_steal_pct,
        ..Report::default()
    };
    if let Some(s) = sampler {
        s.abort();
        report.rss_before_kib = rss_before;
        report.rss_peak_kib = Some(rss_peak.load(std::sync::atomic::Ordering::Relaxed));
    }
    if let (Some(before), Some(after)) = (cpu_before, cfg.cpu_pid.and_then(cpu_times)) {
        let cpu = after.since(before);
        report.cpu_s = Some(cpu.total());
        if stats.events > 0 {
            let per_million = |s: f64| Some(s * 1e6 / stats.events as f64);
            report.cpu_s_per_million_events = per_million(cpu.total());
            report.cpu_user_s_per_million_events = per_million(cpu.user);
            report.cpu_system_s_per_million_events = per_million(cpu.system);
        }
    }
    if let Some(hold) = cfg.idle_hold {
        // Let the target settle, then sample its memory while every session is held.
        tokio::time::sleep(hold).await;
        report.rss_before_kib = rss_before;
        report.rss_held_kib = cfg.rss_pid.and_then(rss_kib);
        if let (Some(b), Some(h)) = (report.rss_before_kib, report.rss_held_kib)
            && !held.is_empty()
        {
            report.rss_per_session_kib = Some((h.saturating_sub(b)) as f64 / held.len() as f64);
        }
        for c in held {
            c.abort();
        }
    }
    report.turns_ok = stats.turns_ok;
    report.errors = stats.errors;
    report.first_error = stats.first_error.take();
    report.events = stats.events;
    let secs = elapsed.as_secs_f64().max(1e-9);
    report.turns_per_s = stats.turns_ok as f64 / secs;
    report.events_per_s = stats.events as f64 / secs;
    report.ttfe_ms = percentiles(&stats.ttfe_us, 1000.0);
    report.event_latency_us = percentiles(&stats.latency_us, 1.0);
    if let Some(url) = &cfg.mock_url {
        report.mock = mock_stats(url).await;
        let accepted = |v: &Option<Value>| v.as_ref().and_then(|m| m["accepted"].as_u64());
        if let (Some(before), Some(after)) = (accepted(&mock_before), accepted(&report.mock)) {
            report.upstream_connections_opened = Some(after.saturating_sub(before));
        }
    }
    report
}

/// The human-readable table of one report.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let p = |x: &Percentiles| {
        format!(
            "p50 {:.3} p99 {:.3} p999 {:.3} max {:.3}",
            x.p50, x.p99, x.p999, x.max
        )
    };
    s.push_str(&format!("run                 {}\n", r.label));
    s.push_str(&format!("sessions            {}\n", r.sessions));
    s.push_str(&format!(
        "turns ok / errors   {} / {}\n",
        r.turns_ok, r.errors
    ));
    if let Some(e) = &r.first_error {
        s.push_str(&format!("first error         {e}\n"));
    }
    s.push_str(&format!("elapsed             {:.3} s\n", r.elapsed_s));
    if let Some(pct) = r.host_steal_pct {
        s.push_str(&format!("host steal          {pct:.1}% of the CPU time\n"));
    }
    s.push_str(&format!("turns/s             {:.1}\n", r.turns_per_s));
    s.push_str(&format!("events/s            {:.0}\n", r.events_per_s));
    s.push_str(&format!("first event (ms)    {}\n", p(&r.ttfe_ms)));
    s.push_str(&format!("event latency (us)  {}\n", p(&r.event_latency_us)));
    if let Some(k) = r.rss_per_session_kib {
        s.push_str(&format!(
            "RSS per session     {k:.1} KiB ({:?} -> {:?} KiB)\n",
            r.rss_before_kib, r.rss_held_kib
        ));
    }
    if let Some(k) = r.rss_peak_kib {
        s.push_str(&format!(
            "RSS peak            {:.1} MiB\n",
            k as f64 / 1024.0
        ));
    }
    if let (Some(c), Some(m)) = (r.cpu_s, r.cpu_s_per_million_events) {
        s.push_str(&format!(
            "target CPU          {c:.2} s ({m:.2} s per million events"
        ));
        if let (Some(u), Some(k)) = (
            r.cpu_user_s_per_million_events,
            r.cpu_system_s_per_million_events,
        ) {
            s.push_str(&format!(": {u:.2} user, {k:.2} system"));
        }
        s.push_str(")\n");
    }
    if let Some(n) = r.upstream_connections_opened {
        s.push_str(&format!("upstream conns      {n} opened during the run\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU a run cost the target, split into user space and kernel, per million events:
    /// here the target is this process (the mock and the load generator both run in it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_the_targets_cpu_split() {
        let mock = crate::mock::MockUpstream::start(crate::mock::MockConfig {
            speed: true,
            ..Default::default()
        })
        .await
        .expect("mock starts");
        let report = run(LoadgenConfig {
            sessions: 2,
            turns: 20,
            deltas: 1000,
            delta_size: 16,
            think_jitter: 0.0,
            cpu_pid: Some(std::process::id()),
            connect_concurrency: 2,
            run_id: "cpu-split".into(),
            ..LoadgenConfig::new(mock.url(), "cpu")
        })
        .await;
        assert_eq!(report.errors, 0, "{:?}", report.first_error);
        assert_eq!(report.turns_ok, 40);
        let total = report.cpu_s_per_million_events.expect("cpu measured");
        let user = report.cpu_user_s_per_million_events.expect("user share");
        let system = report
            .cpu_system_s_per_million_events
            .expect("system share");
        // 40,000 events relayed in this process: well over one 10 ms tick.
        assert!(total > 0.0, "the run cost this process no CPU?");
        assert!(user >= 0.0 && system >= 0.0);
        assert!(
            (user + system - total).abs() < 1e-6,
            "user {user} + system {system} != total {total}"
        );
        // The host's share stolen by its hypervisor is reported beside (Linux: /proc/stat).
        let steal = report.host_steal_pct.expect("host steal measured");
        assert!((0.0..=100.0).contains(&steal), "{steal}");
        assert!(table(&report).contains("host steal"));
    }
}
