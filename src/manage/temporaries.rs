//! What crashed processes left in a store directory, and what processes
//! still at work hold there: `gc` removes the first and keeps the second
//! (and, through the claims of imports at work, the layers they use).
//! Removed are:
//!
//! - `tmp/<label>.<host>.<pid>.<uniq>` (staging of `add`/`import`, and
//!   `.deleting` directories of `rm`/`gc`): when `<host>` is this host and
//!   process `<pid>` is gone (or is a later process with that number), or
//!   when `<host>` is another host and it is older than 24 hours;
//! - `uppers/.<name>.img.tmp.<host>.<pid>.<uniq>` (upper images being
//!   created): the same rule;
//! - `names/.<name>.<pid>.<uniq>` (name records being written; they carry no
//!   host): older than one hour with no process `<pid>` here, or older than
//!   24 hours; the same for `configs/.*` and `confignames/.*` (image
//!   configs and their records being written).
//!
//! Entries of `tmp/` that follow no known pattern go after 24 hours.
//! Nothing whose file is attached to a loop device, or locked (uppers), is
//! removed. A crash between renaming a layer out of `layers/` and deleting it leaves
//! a `.deleting` directory of a dead process, which the next `gc` removes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use super::human::human_age;
use super::inventory::{Inventory, list_dir};
use super::usage::{Usage, usage_beneath};
use super::users::Users;
use crate::store::ids::Digest;
use crate::store::{self, DirHandle, Which, openat_beneath};
use crate::kernel::sys;

/// Staging left by another host is only judged by its age.
const OTHER_HOST_GRACE: u64 = 24 * 3600;
/// Name records are written in milliseconds; their temporaries carry no host.
const NAME_TMP_GRACE: u64 = 3600;

/// Seconds since the newest change to `p` or its direct entries.
fn age_of(p: &Path, now: u64) -> u64 {
    let mut newest = std::fs::symlink_metadata(p).map(|m| m.mtime().max(0) as u64).unwrap_or(0);
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                newest = newest.max(m.mtime().max(0) as u64);
            }
        }
    }
    now.saturating_sub(newest)
}

/// What `gc` makes of a temporary `(host, pid, created)`.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Left by a process that is gone: removed, for this reason.
    Stale(String),
    /// Kept, for this reason (shown by `gc -v`).
    Keep(String),
}

impl Verdict {
    fn stale(self) -> Option<String> {
        match self {
            Verdict::Stale(why) => Some(why),
            Verdict::Keep(_) => None,
        }
    }
}

/// Whether host `host`'s process `pid` holds the lock on one of its claims
/// in a store's `tmp/` (None: it has no claim there).
type ClaimHeld<'a> = &'a dyn Fn(&str, u32) -> Option<bool>;

/// Judge a temporary of `(host, pid, created)`, `age` seconds old. On this
/// host the process table decides. Another host's process cannot be seen:
/// a lock it holds on its claim (taken for its whole life) says it is at
/// work; without one its leftovers go once they are 24 hours old, since a
/// filesystem that does not pass locks between nodes would make a live
/// import look dead.
fn judge(host: Option<&str>, pid: u32, created: Option<u64>, age: u64, me: &str, held: ClaimHeld) -> Verdict {
    match host {
        Some(h) if h == me => {
            if crate::kernel::procs::alive_since(pid, created) {
                Verdict::Keep(format!("process {pid} of this host is still at work"))
            } else {
                Verdict::Stale(format!("left by process {pid}, which is gone"))
            }
        }
        Some(h) => match held(h, pid) {
            Some(true) => Verdict::Keep(format!(
                "host {h}'s process {pid} is at work (it holds the lock on its claim), {} old",
                human_age(age)
            )),
            _ if age > OTHER_HOST_GRACE => Verdict::Stale(format!("left on host {h} {} ago", human_age(age))),
            lock => Verdict::Keep(format!(
                "left by host {h}'s process {pid}, which {}: another host's, removed once {} old (now {})",
                if lock == Some(false) { "no longer holds its claim's lock (dead?)" } else { "holds no claim here" },
                human_age(OTHER_HOST_GRACE),
                human_age(age)
            )),
        },
        None if age > OTHER_HOST_GRACE => Verdict::Stale(format!("{} old", human_age(age))),
        None if age > NAME_TMP_GRACE && !crate::kernel::procs::alive_since(pid, created) => {
            Verdict::Stale(format!("{} old, no process {pid} here", human_age(age)))
        }
        None => Verdict::Keep(format!("{} old, being written", human_age(age))),
    }
}

/// Why a temporary is stale, if it is (see `judge`).
fn stale(host: Option<&str>, pid: u32, created: Option<u64>, age: u64, me: &str, held: ClaimHeld) -> Option<String> {
    judge(host, pid, created, age, me, held).stale()
}

/// `held` for the store directory `h`: looks for `tmp/claim.<host>.<pid>.*`
/// and asks whether its lock is taken (F_OFD_GETLK: any process on any
/// node whose locks reach us).
fn claim_lock_held(h: &DirHandle) -> impl Fn(&str, u32) -> Option<bool> + '_ {
    move |host: &str, pid: u32| {
        let prefix = format!("{}.{host}.{pid}.", store::CLAIM_LABEL);
        let claims: Vec<(String, PathBuf)> =
            list_dir(h, "tmp").unwrap_or_default().into_iter().filter(|(n, _)| n.starts_with(&prefix)).collect();
        if claims.is_empty() {
            return None;
        }
        Some(claims.iter().any(|(n, _)| {
            openat_beneath(&h.fd, &h.path, &format!("tmp/{n}"), OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())
                .ok()
                .is_some_and(|fd| sys::ofd_write_lock_free(&fd) == Ok(false))
        }))
    }
}

/// A stale temporary, to be removed.
pub(super) struct Garbage {
    pub(super) which: Which,
    /// tmp, uppers or names
    pub(super) sub: &'static str,
    pub(super) name: String,
    pub(super) path: PathBuf,
    pub(super) why: String,
    /// What it occupies (`usage`).
    pub(super) usage: Usage,
}

/// Chain IDs that imports still at work have claimed (`tmp/claim.*` of a
/// live process, in either store): kept by `gc` and `rm` with their
/// ancestors, so a layer an import found already stored stays until the
/// import has named its image.
pub(super) fn claimed(inv: &Inventory, now: u64) -> Vec<Digest> {
    let me = store::hostname();
    let mut out = Vec::new();
    for (_, h) in &inv.dirs {
        for (name, path) in list_dir(h, "tmp").unwrap_or_default() {
            let Some((label, host, pid, created)) = crate::kernel::procs::split_host_pid_uniq(&name) else { continue };
            if label != store::CLAIM_LABEL || stale(Some(host), pid, created, age_of(&path, now), &me, &claim_lock_held(h)).is_some() {
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(text) => out.extend(store::Claim::parse(&text)),
                Err(e) => log::warn!("{}: cannot read claim: {e}", path.display()),
            }
        }
    }
    out
}

/// When the oldest `add` or `import` still at work began: the creation
/// time of the oldest staging directory in either `tmp/` that is not stale
/// (its process alive here, or another host's younger than 24 hours).
/// Layers it published since are unreferenced until it names its image.
pub(super) fn work_in_progress_since(inv: &Inventory, now: u64) -> Option<u64> {
    let me = store::hostname();
    let mut since: Option<u64> = None;
    for (_, h) in &inv.dirs {
        for (name, path) in list_dir(h, "tmp").unwrap_or_default() {
            let Some((label, host, pid, created)) = crate::kernel::procs::split_host_pid_uniq(&name) else { continue };
            if label.ends_with(".deleting") {
                continue;
            }
            let age = age_of(&path, now);
            if stale(Some(host), pid, created, age, &me, &claim_lock_held(h)).is_none() {
                let began = created.unwrap_or(now.saturating_sub(age));
                since = Some(since.map_or(began, |s| s.min(began)));
            }
        }
    }
    since
}

/// Stale temporaries of one store directory.
pub(super) fn stale_temporaries(which: Which, h: &DirHandle, users: &Users, now: u64, out: &mut Vec<Garbage>) {
    let me = store::hostname();
    let held = claim_lock_held(h);
    // Every temporary is either collected or kept with its reason, which
    // `gc -v` prints: an administrator must be able to tell a live import
    // of another node from a dead one waiting out its grace period.
    let mut consider = |sub: &'static str, name: String, path: PathBuf, verdict: Verdict| {
        let why = match verdict {
            Verdict::Stale(why) => why,
            Verdict::Keep(why) => {
                log::info!("{}: kept: {why}", path.display());
                return;
            }
        };
        if let Some(dev) = users.attached_below(&path) {
            log::info!("{}: kept, attached to {dev}", path.display());
            return;
        }
        let usage = usage_beneath(h, &format!("{sub}/{name}")).unwrap_or_else(|e| {
            log::warn!("{e}: size not known");
            Usage::default()
        });
        out.push(Garbage { which, sub, name, path, why, usage });
    };
    let list = |sub: &str| {
        list_dir(h, sub).unwrap_or_else(|e| {
            log::warn!("{e}");
            vec![]
        })
    };
    let prefixed = |what: &str, v: Verdict| match v {
        Verdict::Stale(w) => Verdict::Stale(format!("{what}, {w}")),
        Verdict::Keep(w) => Verdict::Keep(format!("{what}, {w}")),
    };
    for (name, path) in list("tmp") {
        let age = age_of(&path, now);
        let what = match crate::kernel::procs::split_host_pid_uniq(&name) {
            Some((label, _, _, _)) if label == store::CLAIM_LABEL => "claim of an import or add",
            Some((label, _, _, _)) if label.ends_with(".deleting") => "layer being removed",
            _ => "staging",
        };
        let verdict = match crate::kernel::procs::split_host_pid_uniq(&name) {
            Some((_, host, pid, created)) => judge(Some(host), pid, created, age, &me, &held),
            None if age > OTHER_HOST_GRACE => Verdict::Stale(format!("unrecognised, {} old", human_age(age))),
            None => Verdict::Keep(format!("unrecognised, removed once {} old (now {})", human_age(OTHER_HOST_GRACE), human_age(age))),
        };
        consider("tmp", name, path, prefixed(what, verdict));
    }
    for (name, path) in list("uppers") {
        let Some(inner) = name.strip_prefix('.') else { continue };
        let Some((label, host, pid, created)) = crate::kernel::procs::split_host_pid_uniq(inner) else { continue };
        if !label.ends_with(".tmp") {
            continue;
        }
        let mut verdict = judge(Some(host), pid, created, age_of(&path, now), &me, &held);
        // An upper being created is not locked yet; one that is, is in use.
        let locked = matches!(verdict, Verdict::Stale(_))
            && rustix::fs::open(&path, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty())
                .ok()
                .is_some_and(|fd| !sys::ofd_write_lock_free(&fd).unwrap_or(true));
        if locked {
            verdict = Verdict::Keep("locked by a writer".into());
        }
        consider("uppers", name, path, prefixed("upper being created", verdict));
    }
    for (sub, what) in [
        ("names", "name record being written"),
        (crate::store::configs::CONFIGS, "image config being written"),
        (crate::store::configs::CONFIGNAMES, "image config record being written"),
    ] {
        for (name, path) in list(sub) {
            let Some(inner) = name.strip_prefix('.') else { continue };
            let Some((_, pid, created)) = crate::kernel::procs::split_pid_uniq(inner) else { continue };
            let verdict = judge(None, pid, created, age_of(&path, now), &me, &held);
            consider(sub, name, path, prefixed(what, verdict));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_on_temporaries() {
        let me = "node-b";
        let mine = std::process::id();
        let dead = 4_194_303; // above any pid_max in use here
        let day = 86_400;
        // (host, pid, age, claim lock held, keep?, words the reason has)
        type Case<'a> = (Option<&'a str>, u32, u64, Option<bool>, bool, &'a str);
        let cases: &[Case] = &[
            (Some("node-a"), 7, 60, Some(true), true, "host node-a's process 7 is at work (it holds the lock on its claim)"),
            (Some("node-a"), 7, 2 * day, Some(true), true, "is at work"),
            (Some("node-a"), 7, 60, Some(false), true, "no longer holds its claim's lock (dead?): another host's, removed once 24h old (now 60s)"),
            (Some("node-a"), 7, 60, None, true, "holds no claim here"),
            (Some("node-a"), 7, 2 * day, Some(false), false, "left on host node-a 2d ago"),
            (Some("node-a"), 7, 2 * day, None, false, "left on host node-a 2d ago"),
            (Some(me), mine, 2 * day, None, true, "still at work"),
            (Some(me), dead, 60, None, false, "which is gone"),
            (None, dead, 60, None, true, "being written"),
            (None, dead, 2 * 3600, None, false, "no process"),
            (None, mine, 2 * day, None, false, "2d old"),
        ];
        for (i, &(host, pid, age, held, keep, words)) in cases.iter().enumerate() {
            let v = judge(host, pid, None, age, me, &|h: &str, p: u32| if h == "node-a" && p == 7 { held } else { None });
            let (kept, why) = match v {
                Verdict::Keep(w) => (true, w),
                Verdict::Stale(w) => (false, w),
            };
            assert_eq!(kept, keep, "case {i}: {why}");
            assert!(why.contains(words), "case {i}: {why:?} lacks {words:?}");
        }
    }

    #[test]
    fn temporary_names() {
        assert_eq!(
            crate::kernel::procs::split_host_pid_uniq("layer-ab.node_1.1234.65f0a1b200000001"),
            Some(("layer-ab", "node_1", 1234, Some(0x65f0a1b2)))
        );
        assert_eq!(
            crate::kernel::procs::split_host_pid_uniq("ab.deleting.h.7.65f0a1b2000000ff"),
            Some(("ab.deleting", "h", 7, Some(0x65f0a1b2)))
        );
        assert_eq!(crate::kernel::procs::split_host_pid_uniq("x.h.notapid.65f0a1b200000001"), None);
        assert_eq!(crate::kernel::procs::split_host_pid_uniq("h.1.65f0a1b200000001"), None);
        assert_eq!(crate::kernel::procs::split_pid_uniq("debian:12.5.42.65f0a1b200000001"), Some(("debian:12.5", 42, Some(0x65f0a1b2))));
        assert_eq!(crate::kernel::procs::split_pid_uniq("a.1.xyz"), None);
    }

    #[test]
    fn own_process_is_alive_and_old_enough() {
        let me = std::process::id();
        assert!(crate::kernel::procs::alive_since(me, Some(store::now_secs())));
        assert!(!crate::kernel::procs::alive_since(me, Some(store::now_secs() - 10 * crate::kernel::procs::PID_REUSE_SLACK)));
        assert!(!crate::kernel::procs::alive_since(u32::MAX, None));
    }
}
