//! What the load generator reads of another process from /proc (Linux): its CPU time and
//! resident memory, its descendants' included (nginx's workers, for one).

/// User + system CPU seconds of `pid` and all its descendants (Linux; USER_HZ = 100).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may contain spaces): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<u64>().ok());
    let mut total = (ticks(14)? + ticks(15)?) as f64 / 100.0;
    for child in descendants(pid) {
        total += cpu_seconds(child).unwrap_or(0.0);
    }
    Some(total)
}

/// The direct children of `pid` (every thread's).
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            out.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// Resident set size of `pid` and all its descendants (e.g. nginx's workers), KiB (Linux).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let own: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let mut total = own;
    for child in descendants(pid) {
        total += rss_kib(child).unwrap_or(0);
    }
    Some(total)
}
