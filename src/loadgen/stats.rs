//! What a load run measures: per-session counters and latency histograms (time to first event,
//! per-event latency from the mock's `ts_ns` send stamps), merged at the end into percentiles.

use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

/// Latency percentiles.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// One session's counters and histograms (merged into the run's at the end).
pub(super) struct Stats {
    pub(super) ttfe_us: Histogram<u64>,
    pub(super) latency_us: Histogram<u64>,
    pub(super) turns_ok: u64,
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    pub(super) events: u64,
}

impl Stats {
    /// Histograms that grow to the largest value recorded (three significant figures):
    /// sized for 600 s up front they took ~170 KB each, so ~350 KB a session, all zeroed.
    pub(super) fn new() -> Stats {
        Stats {
            ttfe_us: Histogram::new(3).expect("valid precision"),
            latency_us: Histogram::new(3).expect("valid precision"),
            turns_ok: 0,
            errors: 0,
            first_error: None,
            events: 0,
        }
    }

    /// The first event of a turn sent at `sent` arrived.
    pub(super) fn first_event(&mut self, sent: Instant) {
        let _ = self
            .ttfe_us
            .record(sent.elapsed().as_micros().max(1) as u64);
    }

    /// One event arrived (its send stamp, if any, gives its latency).
    pub(super) fn event(&mut self, data: &str) {
        self.events += 1;
        if let Some(ts) = stamp(data) {
            let lat = now_ns().saturating_sub(ts) / 1000;
            let _ = self.latency_us.record((lat as u64).max(1));
        }
    }

    pub(super) fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }

    pub(super) fn merge(&mut self, other: Stats) {
        let _ = self.ttfe_us.add(&other.ttfe_us);
        let _ = self.latency_us.add(&other.latency_us);
        self.turns_ok += other.turns_ok;
        self.errors += other.errors;
        self.events += other.events;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

pub(super) fn percentiles(h: &Histogram<u64>, scale: f64) -> Percentiles {
    Percentiles {
        count: h.len(),
        p50: h.value_at_quantile(0.50) as f64 / scale,
        p99: h.value_at_quantile(0.99) as f64 / scale,
        p999: h.value_at_quantile(0.999) as f64 / scale,
        max: h.max() as f64 / scale,
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// `"ts_ns":123` at the end of a mock delta, without parsing the frame.
fn stamp(text: &str) -> Option<u128> {
    // The mock writes the stamp last (`..,"ts_ns":123}`): read from the end, no search.
    let body = text.trim_end().strip_suffix('}')?;
    let colon = body.rfind(':')?;
    let digits = &body[colon + 1..];
    if !body[..colon].ends_with("\"ts_ns\"") || digits.is_empty() {
        return None;
    }
    digits
        .bytes()
        .all(|c| c.is_ascii_digit())
        .then(|| digits.parse().ok())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_read_without_parsing() {
        assert_eq!(
            stamp(r#"{"type":"response.output_text.delta","delta":"x","ts_ns":1234567}"#),
            Some(1234567)
        );
        assert_eq!(stamp(r#"{"type":"response.completed"}"#), None);
        assert_eq!(stamp("{\"delta\":\"a:b\",\"ts_ns\":42}\n"), Some(42));
        assert_eq!(stamp(r#"{"ts_ns":12,"type":"x"}"#), None);
        assert_eq!(stamp(r#"{"ts_ns":}"#), None);
        assert_eq!(stamp(r#"{"ts_ns":-5}"#), None);
        assert_eq!(stamp(r#"{"delta":"ts_ns","n":7}"#), None);
    }
}
