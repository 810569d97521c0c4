//! Processes of this node, as /proc shows them: is the process that made
//! something (a temporary, a scratch directory, a pending mount record)
//! still at work? And the names of temporaries, which say who made them.
//!
//! A pid alone is not enough: pids are reused, so a name or record also
//! carries the process's start time (or its own creation time), and a
//! process that started later is not its maker.

/// /proc/<pid>/stat counts in USER_HZ, which is 100 on every architecture
/// Linux runs containers on.
const USER_HZ: u64 = 100;
/// A process that started this long after a temporary was created cannot
/// be its creator (the pid was reused). Generous: wall-clock steps.
pub const PID_REUSE_SLACK: u64 = 3600;

/// The fields of /proc/<pid>/stat we use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// R, S, D, Z, X, ...
    pub state: u8,
    /// Clock ticks after boot.
    pub start: u64,
}

/// Parse a /proc/<pid>/stat line. The command name (field 2) is in
/// parentheses and may hold spaces and parentheses itself: the fields
/// we want follow the last ')'.
pub fn parse_stat(line: &str) -> Option<Stat> {
    let rest = line.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat { state: *f.first()?.as_bytes().first()?, start: f.get(19)?.parse().ok()? })
}

pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// When process `pid` started (ticks after boot), if it exists.
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|s| s.start)
}

/// This process's (pid, start time).
pub fn me() -> (u32, u64) {
    let pid = std::process::id();
    (pid, start_time(pid).unwrap_or(0))
}

/// Is `pid` the very process that started at `start`, and not a zombie?
pub fn same_process(pid: u32, start: u64) -> bool {
    stat(pid).is_some_and(|s| s.start == start && !matches!(s.state, b'Z' | b'X'))
}

pub fn boot_time() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    s.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

/// Is process `pid` alive, and old enough to have made a file at
/// `created` (seconds since the epoch)?
pub fn alive_since(pid: u32, created: Option<u64>) -> bool {
    let Some(st) = stat(pid) else { return false };
    if matches!(st.state, b'Z' | b'X') {
        return false; // a zombie holds nothing
    }
    if let (Some(created), Some(btime)) = (created, boot_time())
        && btime + st.start / USER_HZ > created + PID_REUSE_SLACK
    {
        return false; // a later process with the same number
    }
    true
}

/// `<...>.<pid>.<uniq>` with uniq = `store::unique_suffix()`: (rest, pid,
/// created).
pub fn split_pid_uniq(s: &str) -> Option<(&str, u32, Option<u64>)> {
    let (rest, uniq) = s.rsplit_once('.')?;
    let (rest, pid) = rest.rsplit_once('.')?;
    if uniq.len() <= 8 || !uniq.bytes().all(|b| b.is_ascii_hexdigit()) || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let pid = pid.parse().ok()?;
    let created = u64::from_str_radix(&uniq[..uniq.len() - 8], 16).ok();
    Some((rest, pid, created))
}

/// `<label>.<host>.<pid>.<uniq>` (`store::temp_name`): (label, host, pid,
/// created).
pub fn split_host_pid_uniq(s: &str) -> Option<(&str, &str, u32, Option<u64>)> {
    let (rest, pid, created) = split_pid_uniq(s)?;
    let (label, host) = rest.rsplit_once('.')?;
    if label.is_empty() || host.is_empty() {
        return None;
    }
    Some((label, host, pid, created))
}

/// Did a process of this host that is gone make the temporary `name`
/// (a `store::temp_name` whose label is `label`)?
pub fn left_by_dead_process(name: &str, label: &str) -> bool {
    match split_host_pid_uniq(name) {
        Some((l, host, pid, created)) => l == label && host == crate::store::hostname() && !alive_since(pid, created),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines() {
        let cases: &[(&str, Option<Stat>)] = &[
            ("1234 (sleep) S 1 1234 1234 0 -1 4194560 95 0 0 0 0 0 0 0 20 0 1 0 5678 2555904", Some(Stat { state: b'S', start: 5678 })),
            ("9 (a) b) (c) Z 1 9 9 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 42 0", Some(Stat { state: b'Z', start: 42 })),
            ("9 (x) R 1", None),
            ("garbage", None),
        ];
        for (l, want) in cases {
            assert_eq!(parse_stat(l), *want, "{l:?}");
        }
        let (pid, start) = me();
        assert!(same_process(pid, start));
        assert!(!same_process(pid, start + 1));
        assert!(alive_since(pid, Some(crate::store::now_secs())));
    }

    #[test]
    fn temporary_names() {
        type Want<'a> = Option<(&'a str, &'a str, u32, Option<u64>)>;
        let cases: &[(&str, Want)] = &[
            ("layer-add.node1.1234.65a1b2c3d4e5f6a7", Some(("layer-add", "node1", 1234, Some(0x65a1b2c3)))),
            (".u.img.tmp.n.7.6500000000000000", Some((".u.img.tmp", "n", 7, Some(0x65000000)))),
            ("x.1234.65a1b2c3d4e5f6a7", None),
            ("a.b.c.d", None),
            ("a.b..65a1b2c3d4e5f6a7", None),
        ];
        for (s, want) in cases {
            assert_eq!(split_host_pid_uniq(s), *want, "{s:?}");
        }
        let name = crate::store::temp_name("lbl");
        assert!(!left_by_dead_process(&name, "lbl"), "our own");
        assert!(!left_by_dead_process(&name, "other"), "another label");
        let dead = format!("lbl.{}.{}.{}", crate::store::hostname(), u32::MAX - 1, crate::store::unique_suffix());
        assert!(left_by_dead_process(&dead, "lbl"));
    }
}
