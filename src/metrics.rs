//! Prometheus metrics: names, histogram buckets, the process-wide recorder, and pre-registered
//! handles for the per-frame hot path.
//!
//! The recorder is global (the `metrics` facade); [`install`] is idempotent, so every gateway
//! in a process shares it. Gauges that describe state (sessions, pooled connections, accounts)
//! are set from the live state at scrape time, so they can never drift.

use std::sync::OnceLock;
use std::time::Duration;

use ::metrics::{Counter, Histogram, counter, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::pool::{Decision, EvictReason};

pub const POOL_DECISIONS: &str = "wsgate_pool_decisions_total";
pub const POOL_EVICTIONS: &str = "wsgate_pool_evictions_total";
pub const TURNS: &str = "wsgate_turns_total";
pub const CLIENT_OPENED: &str = "wsgate_client_connections_opened_total";
pub const CLIENT_CLOSED: &str = "wsgate_client_connections_closed_total";
pub const UPSTREAM_OPENED: &str = "wsgate_upstream_connections_opened_total";
pub const UPSTREAM_CLOSED: &str = "wsgate_upstream_connections_closed_total";
pub const FRAMES: &str = "wsgate_frames_total";
pub const BYTES: &str = "wsgate_bytes_total";
pub const RAW_FRAMES: &str = "wsgate_relay_raw_frames_total";
pub const ERRORS: &str = "wsgate_errors_total";
pub const SESSIONS: &str = "wsgate_sessions_active";
pub const TASKS: &str = "wsgate_tasks";
pub const POOLED: &str = "wsgate_pool_connections";
pub const ACCOUNTS: &str = "wsgate_accounts";
pub const TURN_FIRST_EVENT: &str = "wsgate_turn_first_event_seconds";
pub const TURN_DURATION: &str = "wsgate_turn_duration_seconds";
pub const DIAL: &str = "wsgate_upstream_dial_seconds";
pub const REUSE_AGE: &str = "wsgate_pool_reuse_age_seconds";
pub const CACHED_RATIO: &str = "wsgate_turn_cached_ratio";
pub const INPUT_TOKENS: &str = "wsgate_input_tokens_total";
pub const CACHED_TOKENS: &str = "wsgate_cached_tokens_total";
pub const CLUSTER_DEGRADED: &str = "wsgate_cluster_degraded";
pub const CLUSTER_REDIS_ERRORS: &str = "wsgate_cluster_redis_errors_total";
pub const CLUSTER_FALLBACKS: &str = "wsgate_cluster_fallbacks_total";

/// Latency buckets (seconds): 1 ms .. 10 min.
const LATENCY: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];
/// Connection age buckets (seconds): 1 s .. 1 h.
const AGE: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 2700.0, 3300.0, 3600.0,
];
/// Ratio buckets.
const RATIO: &[f64] = &[
    0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns its handle. `None` if
/// another recorder was installed first (then `/metrics` says so).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(REUSE_AGE.into()), AGE))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(CACHED_RATIO.into()), RATIO))
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            spawn_upkeep(handle.clone());
            Some(handle)
        })
        .clone()
}

fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(POOL_DECISIONS, "Pool decisions by decision and reason");
    describe_counter!(POOL_EVICTIONS, "Pooled connections evicted, by reason");
    describe_counter!(TURNS, "Turns by terminal event");
    describe_counter!(CLIENT_OPENED, "Client WebSocket sessions opened");
    describe_counter!(CLIENT_CLOSED, "Client WebSocket sessions closed");
    describe_counter!(UPSTREAM_OPENED, "Upstream WebSocket connections opened");
    describe_counter!(UPSTREAM_CLOSED, "Upstream WebSocket connections closed");
    describe_counter!(FRAMES, "Frames relayed, by direction");
    describe_counter!(BYTES, "Payload bytes relayed, by direction");
    describe_counter!(
        RAW_FRAMES,
        "Upstream frames relayed to clients as the upstream's own bytes (raw runs; part of frames_total upstream_to_client)"
    );
    describe_counter!(ERRORS, "Errors by kind");
    describe_gauge!(SESSIONS, "Client sessions connected now");
    describe_gauge!(
        TASKS,
        "Live tasks by kind (session, upstream_pump, http_connection)"
    );
    describe_gauge!(POOLED, "Pooled upstream connections by account and state");
    describe_gauge!(ACCOUNTS, "Accounts by state");
    describe_gauge!(
        CLUSTER_DEGRADED,
        "1 while cluster.redis_url is set but Redis does not answer (decisions are local)"
    );
    describe_counter!(
        CLUSTER_REDIS_ERRORS,
        "Redis calls that failed or timed out, by operation"
    );
    describe_counter!(
        CLUSTER_FALLBACKS,
        "Decisions taken on local state because Redis was unavailable, by operation"
    );
    describe_histogram!(
        TURN_FIRST_EVENT,
        "Time from response.create to the first upstream event"
    );
    describe_histogram!(
        TURN_DURATION,
        "Time from response.create to the terminal event"
    );
    describe_histogram!(DIAL, "Upstream dial time (TCP + TLS + handshake)");
    describe_histogram!(REUSE_AGE, "Age of pooled connections when reused");
    describe_histogram!(
        CACHED_RATIO,
        "cached_tokens / input_tokens of completed turns, by pool decision"
    );
    describe_counter!(
        INPUT_TOKENS,
        "usage.input_tokens of completed turns, by pool decision"
    );
    describe_counter!(
        CACHED_TOKENS,
        "usage.input_tokens_details.cached_tokens of completed turns, by pool decision"
    );
}

/// How often histogram samples are folded into their buckets ([`spawn_upkeep`]).
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The exporter keeps every histogram sample in a growing list until a scrape or an upkeep
/// folds it into the fixed buckets: without one, a gateway nobody scrapes would grow by a few
/// bytes per turn for as long as it runs. One thread per process (the recorder is
/// process-wide, and a thread needs no runtime and outlives none) runs the upkeep every
/// [`UPKEEP_INTERVAL`], so at most one interval's samples are ever held.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("wsgate-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms are folded at each scrape only");
    }
}

/// The process-wide handle, if [`install`] ran.
pub fn handle() -> Option<PrometheusHandle> {
    HANDLE.get().cloned().flatten()
}

pub fn eviction(r: EvictReason) {
    counter!(POOL_EVICTIONS, "reason" => r.to_string()).increment(1);
}

/// Pre-registered metrics of the pool's decisions: a client's reconnect costs atomic adds,
/// not registry lookups by label (issue 14, workload (c)). Every decision's series exists
/// from the start, at zero.
pub struct PoolMetrics {
    /// By [`Decision::index`]; a decision past the end is counted by lookup.
    decisions: Vec<Counter>,
    reuse_age: Histogram,
}

impl PoolMetrics {
    pub fn new() -> PoolMetrics {
        PoolMetrics {
            decisions: Decision::ALL
                .iter()
                .map(|d| counter!(POOL_DECISIONS, "decision" => d.as_str(), "reason" => d.reason()))
                .collect(),
            reuse_age: histogram!(REUSE_AGE),
        }
    }

    pub fn decision(&self, d: Decision, reused_at_age: Option<Duration>) {
        match self.decisions.get(d.index()) {
            Some(counter) => counter.increment(1),
            // A decision missing from `Decision::ALL` is still counted, by lookup.
            None => counter!(POOL_DECISIONS, "decision" => d.as_str(), "reason" => d.reason())
                .increment(1),
        }
        if let Some(age) = reused_at_age {
            self.reuse_age.record(age.as_secs_f64());
        }
    }
}

impl Default for PoolMetrics {
    fn default() -> Self {
        PoolMetrics::new()
    }
}

pub fn error(kind: &'static str) {
    counter!(ERRORS, "kind" => kind).increment(1);
}

pub fn dial(elapsed: Duration) {
    histogram!(DIAL).record(elapsed.as_secs_f64());
}

/// The `terminal` label of a turn that ended with `terminal` (an event type, or `aborted` /
/// `upstream_failed`, ...), as an index into [`TERMINALS`].
fn terminal_index(terminal: &str) -> usize {
    match terminal {
        "response.completed" => 0,
        "response.failed" => 1,
        "response.incomplete" => 2,
        "error" => 3,
        "upstream_failed" => 4,
        "rate_limited" => 5,
        "failover_continuation" => 6,
        _ => 7,
    }
}

const TERMINALS: [&str; 8] = [
    "completed",
    "failed",
    "incomplete",
    "error",
    "upstream_failed",
    "rate_limited",
    "failover_continuation",
    "aborted",
];

const INGRESSES: [crate::turn::Ingress; 2] = [crate::turn::Ingress::Ws, crate::turn::Ingress::Http];

/// Pre-registered metrics of the relay path: per-session and per-frame counters and per-turn
/// series (registering once keeps the hot path to atomic adds, no registry lookup by label).
#[derive(Clone)]
pub struct Relay {
    /// Client sessions opened and closed.
    pub client_opened: Counter,
    pub client_closed: Counter,
    pub frames_up: Counter,
    pub bytes_up: Counter,
    pub frames_down: Counter,
    pub bytes_down: Counter,
    /// Of `frames_down`, those relayed verbatim (raw runs).
    pub raw_down: Counter,
    first_event: Histogram,
    /// Turns and their durations by terminal label ([`TERMINALS`]) and ingress.
    turns: Vec<(Counter, Histogram)>,
    /// Input tokens, cached tokens and the cached ratio of completed turns, by the pool
    /// decision of their connection ([`Decision::slot`](crate::pool::Decision::slot)).
    usage: Vec<(Counter, Counter, Histogram)>,
}

impl Relay {
    pub fn new() -> Relay {
        let turns = TERMINALS
            .iter()
            .flat_map(|terminal| {
                INGRESSES.iter().map(move |ingress| {
                    let ingress = ingress.label();
                    (
                        counter!(TURNS, "terminal" => *terminal, "ingress" => ingress),
                        histogram!(TURN_DURATION, "terminal" => *terminal, "ingress" => ingress),
                    )
                })
            })
            .collect();
        Relay {
            client_opened: counter!(CLIENT_OPENED),
            client_closed: counter!(CLIENT_CLOSED),
            frames_up: counter!(FRAMES, "direction" => "client_to_upstream"),
            bytes_up: counter!(BYTES, "direction" => "client_to_upstream"),
            frames_down: counter!(FRAMES, "direction" => "upstream_to_client"),
            bytes_down: counter!(BYTES, "direction" => "upstream_to_client"),
            raw_down: counter!(RAW_FRAMES),
            first_event: histogram!(TURN_FIRST_EVENT),
            turns,
            usage: ["reuse", "new", "bypass"]
                .into_iter()
                .map(|d| {
                    (
                        counter!(INPUT_TOKENS, "decision" => d),
                        counter!(CACHED_TOKENS, "decision" => d),
                        histogram!(CACHED_RATIO, "decision" => d),
                    )
                })
                .collect(),
        }
    }

    /// Usage of a completed turn, labelled with the pool decision of its connection.
    pub fn usage(&self, decision: crate::pool::Decision, input_tokens: u64, cached_tokens: u64) {
        let Some((input, cached, ratio)) = self.usage.get(decision.slot()) else {
            return;
        };
        input.increment(input_tokens);
        cached.increment(cached_tokens);
        if input_tokens > 0 {
            ratio.record(cached_tokens.min(input_tokens) as f64 / input_tokens as f64);
        }
    }

    /// A turn ended with `terminal` (an event type, or `aborted` / `upstream_failed`).
    pub fn turn(&self, terminal: &str, ingress: crate::turn::Ingress, duration: Duration) {
        let at = terminal_index(terminal) * INGRESSES.len()
            + INGRESSES.iter().position(|i| *i == ingress).unwrap_or(0);
        if let Some((turns, durations)) = self.turns.get(at) {
            turns.increment(1);
            durations.record(duration.as_secs_f64());
        }
    }

    /// The first event of a turn reached its client `after` the turn started.
    pub fn first_event(&self, after: Duration) {
        self.first_event.record(after.as_secs_f64());
    }
}

impl Default for Relay {
    fn default() -> Self {
        Relay::new()
    }
}
