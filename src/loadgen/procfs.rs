//! What the load generator reads of another process from /proc (Linux): its CPU time and
//! resident memory, its descendants' included (nginx's workers, for one); and of the host,
//! the CPU time its hypervisor took from it (steal), which a run on a shared VM reports so
//! that a run disturbed by a neighbour can be told from one that measured the targets.

/// CPU seconds a process spent in user space and in the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    pub user: f64,
    pub system: f64,
}

impl CpuTimes {
    pub fn total(&self) -> f64 {
        self.user + self.system
    }

    /// The time spent since `before` (never negative).
    pub fn since(&self, before: CpuTimes) -> CpuTimes {
        CpuTimes {
            user: (self.user - before.user).max(0.0),
            system: (self.system - before.system).max(0.0),
        }
    }
}

/// User and system CPU seconds of `pid` and all its descendants (Linux; USER_HZ = 100).
pub fn cpu_times(pid: u32) -> Option<CpuTimes> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut times = parse_stat_times(&stat)?;
    for child in descendants(pid) {
        if let Some(c) = cpu_times(child) {
            times.user += c.user;
            times.system += c.system;
        }
    }
    Some(times)
}

/// utime and stime of one `/proc/<pid>/stat` line. The fields after the command (which may
/// contain spaces and parentheses) start after its last `)`: state is field 3, utime 14,
/// stime 15.
fn parse_stat_times(stat: &str) -> Option<CpuTimes> {
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<u64>().ok());
    Some(CpuTimes {
        user: ticks(14)? as f64 / 100.0,
        system: ticks(15)? as f64 / 100.0,
    })
}

/// The machine's CPU time so far, all CPUs (`/proc/stat`'s `cpu` line, in USER_HZ ticks):
/// every state's ticks, and those the hypervisor gave to another guest (steal).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostTicks {
    pub total: u64,
    pub steal: u64,
}

impl HostTicks {
    /// Steal's share of the machine's CPU time between `before` and now, in percent (`None`
    /// when no time passed).
    pub fn steal_pct_since(&self, before: HostTicks) -> Option<f64> {
        let total = self.total.saturating_sub(before.total);
        let steal = self.steal.saturating_sub(before.steal);
        (total > 0).then(|| steal as f64 * 100.0 / total as f64)
    }
}

/// The host's CPU ticks (Linux; `None` elsewhere or if `/proc/stat` is unreadable).
pub fn host_ticks() -> Option<HostTicks> {
    parse_host_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The `cpu` line of `/proc/stat`: user nice system idle iowait irq softirq steal guest
/// guest_nice. Guest time is already counted in user and nice, so it is left out of the
/// total; a kernel that shows no steal column counts none.
fn parse_host_ticks(stat: &str) -> Option<HostTicks> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    if fields.len() < 4 {
        return None;
    }
    Some(HostTicks {
        total: fields.iter().take(8).sum(),
        steal: fields.get(7).copied().unwrap_or(0),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_split_user_and_system() {
        // A command with spaces and a parenthesis, as /proc shows it.
        let stat =
            "4242 (nginx: worker) x) S 1 4242 4242 0 -1 4194560 120 0 0 0 731 268 0 0 20 0 1 0";
        let t = parse_stat_times(stat).unwrap();
        assert_eq!(
            t,
            CpuTimes {
                user: 7.31,
                system: 2.68
            }
        );
        assert!((t.total() - 9.99).abs() < 1e-9);
        let later = CpuTimes {
            user: 8.0,
            system: 2.5,
        };
        let d = later.since(t);
        assert!((d.user - 0.69).abs() < 1e-9);
        assert_eq!(
            d.system, 0.0,
            "a counter never goes back; the difference is clamped"
        );
        assert_eq!(parse_stat_times("4242 (x) S 1"), None);
        assert_eq!(parse_stat_times("no parenthesis"), None);
    }

    #[test]
    fn host_steal_is_a_share_of_every_cpu_state() {
        let before =
            parse_host_ticks("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 50 0 25 400 5 0 2 18 0 0\n")
                .unwrap();
        assert_eq!(
            before,
            HostTicks {
                total: 1000,
                steal: 35
            }
        );
        // 200 ticks later, 30 of them stolen: 15%.
        let after = parse_host_ticks("cpu  150 0 60 900 10 0 5 65 7 0\n").unwrap();
        assert_eq!(after.total, 1190, "guest time is not counted twice");
        let pct = after.steal_pct_since(before).unwrap();
        assert!((pct - 30.0 * 100.0 / 190.0).abs() < 1e-9, "{pct}");
        assert_eq!(before.steal_pct_since(before), None, "no time passed");
        // An old kernel without the steal column; lines that are not the total.
        assert_eq!(
            parse_host_ticks("cpu  1 2 3 4\n").map(|t| (t.total, t.steal)),
            Some((10, 0))
        );
        assert_eq!(parse_host_ticks("cpu0 1 2 3 4\nintr 5\n"), None);
        assert_eq!(parse_host_ticks("cpu  1 x 3 4\n"), None);
        assert_eq!(parse_host_ticks("cpu  1 2\n"), None);
    }

    #[test]
    fn own_process_has_cpu_times() {
        let t = cpu_times(std::process::id()).expect("/proc/self is readable");
        assert!(t.user >= 0.0 && t.system >= 0.0);
    }
}
