//! The operator's view: readiness, `/status.json` and the self-refreshing `/status` page, and
//! the state gauges set at each `/metrics` scrape. Conversation ids are shortened; no secret
//! is ever part of a snapshot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use serde::Serialize;
use tokio::time::Instant;

use crate::accounts::Availability;
use crate::gateway::Shared;
use crate::pool::Decision;

/// Everything `/status.json` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub uptime_s: u64,
    pub ready: bool,
    /// Why the gateway is not ready, when it is not.
    pub not_ready: Option<String>,
    pub draining: bool,
    pub sessions_active: usize,
    /// Live tasks: session tasks and upstream pumps (one per open upstream connection).
    pub tasks: TaskCounts,
    pub accounts: Vec<AccountStatus>,
    pub pool: PoolSummary,
    pub connections: Vec<ConnStatus>,
    pub recent_decisions: Vec<DecisionStatus>,
    pub decisions: DecisionTotals,
    /// Completed turns' `cached_tokens / input_tokens`, by pool decision.
    pub cached_token_ratio: BTreeMap<&'static str, Option<f64>>,
    /// Other instances and shared account states (`cluster.redis_url`); `enabled: false`
    /// without it.
    pub cluster: crate::cluster::ClusterStatus,
}

#[derive(Debug, Serialize)]
pub struct TaskCounts {
    pub sessions: usize,
    /// HTTP connections on the main listener not (yet) upgraded (this request's included).
    pub http_connections: usize,
    pub upstream_pumps: usize,
}

#[derive(Debug, Serialize)]
pub struct AccountStatus {
    pub id: String,
    pub state: &'static str,
    pub cooldown_left_s: Option<u64>,
    pub weight: u32,
    pub open_connections: usize,
    pub pooled: usize,
}

#[derive(Debug, Serialize)]
pub struct PoolSummary {
    pub total: usize,
    /// One-shot (bypass) connections open or dialing; they count against `max_total`.
    pub one_shots: usize,
    pub idle: usize,
    pub busy: usize,
    pub dialing: usize,
    pub max_total: usize,
    pub max_per_account: usize,
}

#[derive(Debug, Serialize)]
pub struct ConnStatus {
    pub client: String,
    pub conversation: String,
    pub account: String,
    pub upstream_id: u64,
    pub state: &'static str,
    pub age_s: Option<u64>,
    pub idle_s: Option<u64>,
    pub turns: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct DecisionStatus {
    pub ago_s: u64,
    pub decision: String,
    pub reason: &'static str,
    pub account: String,
    pub client: String,
    pub conversation: String,
    /// The affinity (shortened), when it differs from the lane.
    pub affinity: Option<String>,
    /// `ws` or `http`.
    pub ingress: &'static str,
    pub upstream_id: u64,
}

#[derive(Debug, Serialize)]
pub struct DecisionTotals {
    pub reuse: u64,
    pub new: u64,
    pub bypass: u64,
    /// reuse / (reuse + new + bypass).
    pub hit_rate: Option<f64>,
}

/// `abcdef12-3456-...` -> `abcdef12…` (ids identify, the status page does not need them whole).
pub fn shorten(id: &str) -> String {
    if id.chars().count() <= 12 {
        id.to_string()
    } else {
        format!("{}…", id.chars().take(8).collect::<String>())
    }
}

fn ratio(num: u64, den: u64) -> Option<f64> {
    (den > 0).then(|| (num as f64 / den as f64 * 1000.0).round() / 1000.0)
}

impl Shared {
    /// `Ok` when ready; otherwise why not.
    pub fn readiness(&self) -> Result<(), String> {
        if self.shutdown.is_cancelled() {
            return Err("draining".into());
        }
        if !self.listening.load(Ordering::Acquire) {
            return Err("listener not up".into());
        }
        if !self.accounts.all().iter().any(|a| a.is_usable()) {
            return Err("no usable upstream account".into());
        }
        Ok(())
    }

    pub fn status(&self) -> Status {
        let now = Instant::now();
        let config = self.config();
        let slots = self.pool.snapshot();
        let not_ready = self.readiness().err();
        let accounts = self
            .accounts
            .all()
            .iter()
            .map(|a| {
                let state = a.availability();
                AccountStatus {
                    id: a.id.to_string(),
                    state: state.label(),
                    cooldown_left_s: match state {
                        Availability::Cooling { until } => {
                            Some(until.saturating_duration_since(now).as_secs())
                        }
                        _ => None,
                    },
                    weight: a.weight(),
                    open_connections: a.open_connections(),
                    pooled: slots.iter().filter(|s| s.key.account == a.id).count(),
                }
            })
            .collect();
        let count = |st: &str| slots.iter().filter(|s| s.state == st).count();
        let pool = PoolSummary {
            total: slots.len(),
            one_shots: self.pool.stats().one_shots,
            idle: count("idle"),
            busy: count("busy"),
            dialing: count("dialing"),
            max_total: config.pool.max_total,
            max_per_account: config.pool.max_per_account,
        };
        let mut connections: Vec<ConnStatus> = slots
            .iter()
            .map(|s| ConnStatus {
                client: s.key.client.to_string(),
                conversation: shorten(s.key.conversation.as_str()),
                account: s.key.account.to_string(),
                upstream_id: s.upstream_id,
                state: s.state,
                age_s: s
                    .meta
                    .as_ref()
                    .map(|m| now.saturating_duration_since(m.created_at).as_secs()),
                idle_s: s
                    .idle_since
                    .map(|t| now.saturating_duration_since(t).as_secs()),
                turns: s.meta.as_ref().map(|m| m.turns.load(Ordering::Relaxed)),
            })
            .collect();
        connections.sort_by_key(|c| c.upstream_id);
        let recent_decisions = self
            .pool
            .recent_decisions()
            .into_iter()
            .rev()
            .map(|d| DecisionStatus {
                ago_s: now.saturating_duration_since(d.at).as_secs(),
                decision: d.decision.to_string(),
                reason: d.decision.reason(),
                account: d.account.to_string(),
                client: d
                    .client
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                conversation: d
                    .conversation
                    .map(|c| shorten(c.as_str()))
                    .unwrap_or_else(|| "-".into()),
                affinity: d.affinity.map(|a| shorten(a.as_str())),
                ingress: d.ingress.label(),
                upstream_id: d.upstream_id,
            })
            .collect();
        let totals = self.pool.decision_totals();
        let all = totals.reuse + totals.new + totals.bypass;
        let decisions = DecisionTotals {
            hit_rate: ratio(totals.reuse, all),
            ..totals
        };
        let cached_token_ratio = self
            .usage
            .snapshot()
            .into_iter()
            .map(|(d, input, cached)| (d, ratio(cached, input)))
            .collect();
        Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_s: now.saturating_duration_since(self.started).as_secs(),
            ready: not_ready.is_none(),
            not_ready,
            draining: self.shutdown.is_cancelled(),
            sessions_active: self.active_sessions.load(Ordering::Acquire),
            tasks: TaskCounts {
                sessions: self.sessions.len(),
                http_connections: self.http_connections.len(),
                upstream_pumps: self.dialer.tasks().len(),
            },
            accounts,
            pool,
            connections,
            recent_decisions,
            decisions,
            cached_token_ratio,
            cluster: self.cluster.local_status(),
        }
    }

    /// [`Shared::status`] plus what Redis says of the cluster (instances, shared account
    /// states), within the call timeout.
    pub async fn status_with_cluster(&self) -> Status {
        let mut s = self.status();
        if self.cluster.enabled() {
            s.cluster = self.cluster.status().await;
        }
        s
    }

    /// Sets the state gauges from the live state (called at each scrape).
    pub fn update_gauges(&self) {
        use ::metrics::gauge;
        gauge!(crate::metrics::SESSIONS).set(self.active_sessions.load(Ordering::Acquire) as f64);
        gauge!(crate::metrics::TASKS, "kind" => "session").set(self.sessions.len() as f64);
        gauge!(crate::metrics::TASKS, "kind" => "upstream_pump")
            .set(self.dialer.tasks().len() as f64);
        gauge!(crate::metrics::TASKS, "kind" => "http_connection")
            .set(self.http_connections.len() as f64);
        const STATES: [&str; 3] = ["idle", "busy", "dialing"];
        // One pass over the slots; every configured account gets all three series (0 included).
        let accounts = self.accounts.all();
        let mut counts: std::collections::HashMap<&str, [usize; 3]> =
            accounts.iter().map(|a| (a.id.as_str(), [0; 3])).collect();
        for s in self.pool.snapshot() {
            if let (Some(c), Some(i)) = (
                counts.get_mut(s.key.account.as_str()),
                STATES.iter().position(|st| *st == s.state),
            ) {
                c[i] += 1;
            }
        }
        for (account, c) in &counts {
            for (state, n) in STATES.iter().zip(c) {
                gauge!(crate::metrics::POOLED, "account" => account.to_string(), "state" => *state)
                    .set(*n as f64);
            }
        }
        for state in ["usable", "cooling", "auth_failed", "disabled"] {
            let n = accounts
                .iter()
                .filter(|a| a.availability().label() == state)
                .count();
            gauge!(crate::metrics::ACCOUNTS, "state" => state).set(n as f64);
        }
        if self.cluster.enabled() {
            let degraded = if self.cluster.degraded() { 1.0 } else { 0.0 };
            gauge!(crate::metrics::CLUSTER_DEGRADED).set(degraded);
        }
    }
}

/// Token totals of completed turns by pool decision (the status page's cache ratio).
#[derive(Default)]
pub struct UsageTotals {
    /// `[reuse, new, bypass]` x `(input, cached)`.
    slots: [(std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64); 3],
}

impl UsageTotals {
    pub fn add(&self, decision: Decision, input: u64, cached: u64) {
        let i = decision.slot();
        self.slots[i].0.fetch_add(input, Ordering::Relaxed);
        self.slots[i].1.fetch_add(cached, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Vec<(&'static str, u64, u64)> {
        ["reuse", "new", "bypass"]
            .into_iter()
            .zip(&self.slots)
            .map(|(d, (i, c))| (d, i.load(Ordering::Relaxed), c.load(Ordering::Relaxed)))
            .collect()
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn pct(v: Option<f64>) -> String {
    v.map(|v| format!("{:.1}%", v * 100.0))
        .unwrap_or_else(|| "-".into())
}

/// The `/status` page: self-contained HTML (inline CSS, no scripts, no external assets) that
/// refreshes itself every 5 seconds.
pub fn render_html(s: &Status) -> String {
    let mut h = String::with_capacity(8192);
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>wsgate status</title><style>\
         body{{font:14px system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}}\
         h1{{font-size:1.4em;margin:0 0 .2em}}h2{{font-size:1.1em;margin:1.4em 0 .4em}}\
         table{{border-collapse:collapse;background:#fff;min-width:40%}}\
         th,td{{border:1px solid #ddd;padding:.25em .6em;text-align:left}}th{{background:#eee}}\
         .ok{{color:#17702d;font-weight:600}}.bad{{color:#b00020;font-weight:600}}\
         .cards{{display:flex;gap:1em;flex-wrap:wrap}}.card{{background:#fff;border:1px solid #ddd;padding:.6em 1em}}\
         .card b{{display:block;font-size:1.5em}}</style></head><body>"
    );
    let ready = if s.ready {
        "<span class=\"ok\">ready</span>".to_string()
    } else {
        format!(
            "<span class=\"bad\">not ready: {}</span>",
            esc(s.not_ready.as_deref().unwrap_or(""))
        )
    };
    let _ = write!(
        h,
        "<h1>wsgate {}</h1><p>{ready} · up {}s · refreshes every 5s</p>",
        esc(s.version),
        s.uptime_s
    );
    let _ = write!(
        h,
        "<div class=\"cards\"><div class=\"card\">sessions<b>{}</b></div><div class=\"card\">pooled<b>{} / {}</b></div>\
         <div class=\"card\">reuse hit rate<b>{}</b></div><div class=\"card\">cached tokens on reuse<b>{}</b></div>\
         <div class=\"card\">cached tokens on new<b>{}</b></div></div>",
        s.sessions_active,
        s.pool.total,
        s.pool.max_total,
        pct(s.decisions.hit_rate),
        pct(s.cached_token_ratio.get("reuse").copied().flatten()),
        pct(s.cached_token_ratio.get("new").copied().flatten()),
    );
    let _ = write!(
        h,
        "<h2>Decisions</h2><table><tr><th>reuse</th><th>new</th><th>bypass</th><th>hit rate</th></tr>\
         <tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
        s.decisions.reuse,
        s.decisions.new,
        s.decisions.bypass,
        pct(s.decisions.hit_rate)
    );
    h.push_str("<h2>Accounts</h2><table><tr><th>account</th><th>state</th><th>cooldown left</th><th>weight</th><th>open connections</th><th>pooled</th></tr>");
    for a in &s.accounts {
        let class = if a.state == "usable" { "ok" } else { "bad" };
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"{class}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&a.id),
            a.state,
            opt(a.cooldown_left_s.map(|c| format!("{c}s"))),
            a.weight,
            a.open_connections,
            a.pooled
        );
    }
    h.push_str("</table>");
    let _ = write!(
        h,
        "<h2>Pool</h2><p>{} idle · {} busy · {} dialing · caps {} total, {} per account</p>\
         <table><tr><th>upstream</th><th>client</th><th>conversation</th><th>account</th><th>state</th><th>age</th><th>idle</th><th>turns</th></tr>",
        s.pool.idle, s.pool.busy, s.pool.dialing, s.pool.max_total, s.pool.max_per_account
    );
    for c in &s.connections {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            c.upstream_id,
            esc(&c.client),
            esc(&c.conversation),
            esc(&c.account),
            c.state,
            opt(c.age_s.map(|v| format!("{v}s"))),
            opt(c.idle_s.map(|v| format!("{v}s"))),
            opt(c.turns)
        );
    }
    h.push_str("</table><h2>Recent decisions</h2><table><tr><th>ago</th><th>decision</th><th>reason</th><th>ingress</th><th>account</th><th>client</th><th>conversation</th><th>affinity</th><th>upstream</th></tr>");
    for d in &s.recent_decisions {
        let _ = write!(
            h,
            "<tr><td>{}s</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            d.ago_s,
            esc(&d.decision),
            d.reason,
            d.ingress,
            esc(&d.account),
            esc(&d.client),
            esc(&d.conversation),
            esc(d.affinity.as_deref().unwrap_or("-")),
            d.upstream_id
        );
    }
    h.push_str("</table>");
    render_cluster(&mut h, &s.cluster);
    h.push_str("</body></html>\n");
    h
}

fn render_cluster(h: &mut String, c: &crate::cluster::ClusterStatus) {
    if !c.enabled {
        return;
    }
    let state = if c.degraded {
        "<span class=\"bad\">degraded: Redis is not answering, decisions are local</span>"
    } else {
        "<span class=\"ok\">shared state on Redis</span>"
    };
    let _ = write!(
        h,
        "<h2>Cluster</h2><p>this instance: {} · {state}</p>\
         <table><tr><th>instance</th><th>address</th><th>state</th></tr>",
        esc(c.instance.as_deref().unwrap_or("-"))
    );
    for i in &c.instances {
        let _ = write!(
            h,
            "<tr><td>{}{}</td><td>{}</td><td>{}</td></tr>",
            esc(&i.id),
            if i.this { " (this)" } else { "" },
            esc(i.addr.as_deref().unwrap_or("-")),
            esc(&i.state)
        );
    }
    h.push_str("</table><table><tr><th>shared account state</th><th>state</th><th>left</th></tr>");
    for a in &c.accounts {
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"bad\">{}</td><td>{:.0}s</td></tr>",
            esc(&a.id),
            esc(&a.state),
            a.remaining_s
        );
    }
    h.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorten_and_escape() {
        assert_eq!(shorten("short-id"), "short-id");
        assert_eq!(shorten("5d0c2f7e-1b7a-4c1e-9a51-3f2b8e0d4c11"), "5d0c2f7e…");
        assert_eq!(esc("<b>&\""), "&lt;b&gt;&amp;&quot;");
    }
}
