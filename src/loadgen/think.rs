//! The load generator's pauses between turns: spread around their mean by a hash of session
//! and turn, so every target sees the same schedule.

use std::time::Duration;

/// `think` spread by `jitter` (see [`LoadgenConfig::think_jitter`](super::LoadgenConfig::think_jitter)): a pure function of the
/// session's name (without the run id) and the turn, uniform in `think * [1 - j, 1 + j]`.
pub(super) fn think_time(think: Duration, jitter: f64, session: &str, turn: usize) -> Duration {
    let jitter = jitter.clamp(0.0, 1.0);
    if jitter == 0.0 {
        return think;
    }
    // The session's index (after the run id) and the turn, mixed by splitmix64.
    let index: u64 = session
        .rsplit('-')
        .next()
        .and_then(|i| i.parse().ok())
        .unwrap_or(0);
    let mut x = index
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(turn as u64);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    let unit = (x >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
    think.mul_f64(1.0 - jitter + 2.0 * jitter * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn think_times_spread_around_their_mean_the_same_for_every_run() {
        let think = Duration::from_millis(20);
        assert_eq!(think_time(think, 0.0, "run1-3", 7), think);
        let times: Vec<Duration> = (0..64)
            .flat_map(|s| (1..50).map(move |t| (s, t)))
            .map(|(s, t)| think_time(think, 0.5, &format!("run1-{s}"), t))
            .collect();
        assert!(times.iter().all(|d| *d >= think / 2 && *d <= think * 3 / 2));
        let mean = times.iter().sum::<Duration>() / times.len() as u32;
        assert!(
            mean > Duration::from_millis(19) && mean < Duration::from_millis(21),
            "{mean:?}"
        );
        // Spread: no 1 ms slot holds more than a few percent of the pauses.
        let mut slots = [0usize; 21];
        for d in &times {
            slots[(d.as_millis() as usize).min(30) - 10] += 1;
        }
        assert!(slots.iter().all(|n| *n < times.len() / 10), "{slots:?}");
        // The same schedule for another run (another run id), different across sessions.
        assert_eq!(
            think_time(think, 0.5, "run1-5", 3),
            think_time(think, 0.5, "run2-5", 3)
        );
        assert_ne!(
            think_time(think, 0.5, "run1-5", 3),
            think_time(think, 0.5, "run1-6", 3)
        );
    }
}
