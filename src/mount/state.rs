//! What this node remembers about its sharedloop mounts, one JSON file per
//! mount under /run/sharedloop/mounts (SHAREDLOOP_STATE_DIR overrides), so
//! umount knows which loop devices to wait for, umount and `status` can
//! tell a sharedloop overlay from any other, and the in-use message can
//! say who holds what.
//!
//! # Crash consistency
//!
//! A mount writes its record (and then its utab line) *before* the overlay
//! becomes visible at the target: the overlay is made as a detached mount
//! whose ID is known, and attached only once both are written. So whatever
//! a SIGKILL interrupts, there is never a sharedloop overlay without its
//! record. What a kill can leave is the reverse, a record (and utab line)
//! of a mount that never appeared or has gone (a killed umount): such a
//! record is *stale* once the process that wrote it is gone (pid and start
//! time) and its mount is not in this namespace's mountinfo, and
//! [`reconcile`] removes it and its utab line. A record whose writer still
//! runs is *pending* and left alone. Temporary files of a killed writer
//! (`.<id>.<pid>.<start>.tmp`) go the same way. The next mount, umount,
//! `mounts`, `status` and `gc` of the node all reconcile first.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::ids::Digest;
use crate::kernel::mountinfo::MountInfo;
use crate::kernel::procs;
use crate::store::{Which, mkdir_p};

pub fn dir() -> PathBuf {
    std::env::var_os("SHAREDLOOP_STATE_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/run/sharedloop"))
}

fn mounts_dir() -> PathBuf {
    dir().join("mounts")
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoopRecord {
    pub number: u32,
    /// What sysfs showed as backing_file when we set it up.
    #[serde(with = "crate::bytes::path")]
    pub backing: PathBuf,
    pub reused: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    pub chain_id: Digest,
    #[serde(with = "crate::bytes::path")]
    pub image: PathBuf,
    pub store: Which,
    pub fstype: String,
    /// None for erofs mounted straight from the file.
    pub loop_dev: Option<LoopRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpperRecord {
    /// "image" or "tmpfs".
    pub kind: String,
    #[serde(with = "crate::bytes::opt_path")]
    pub image: Option<PathBuf>,
    pub fstype: String,
    pub loop_dev: Option<LoopRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountRecord {
    pub source: String,
    #[serde(with = "crate::bytes::path")]
    pub target: PathBuf,
    pub chain: Vec<LayerRecord>,
    pub upper: Option<UpperRecord>,
    pub mount_api: String,
    pub mnt_id: u64,
    pub mnt_ns: u64,
    pub created: u64,
    /// The mount.sharedloop process that wrote the record, and its start
    /// time: while it runs, the record is pending (its mount may not be
    /// attached yet).
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub pid_start: u64,
    /// Whether that process wrote a utab line for the target (not with -n).
    #[serde(default)]
    pub utab: bool,
}

impl MountRecord {
    pub fn loops(&self) -> impl Iterator<Item = &LoopRecord> {
        self.chain.iter().filter_map(|l| l.loop_dev.as_ref()).chain(self.upper.iter().filter_map(|u| u.loop_dev.as_ref()))
    }

    /// Is its writer still at work (the mount perhaps not attached yet)?
    pub fn pending(&self) -> bool {
        self.pid != 0 && procs::same_process(self.pid, self.pid_start)
    }

    /// Is its mount in `mounts` (this namespace's mountinfo)?
    pub fn mounted_in(&self, mounts: &[MountInfo]) -> bool {
        mounts.iter().any(|m| m.id == self.mnt_id && m.mount_point == self.target)
    }
}

pub fn mnt_ns() -> u64 {
    std::fs::metadata("/proc/self/ns/mnt").map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap_or(0)
}

fn record_path(mnt_id: u64) -> PathBuf {
    mounts_dir().join(format!("{mnt_id}.json"))
}

/// `.<mnt id>.<pid>.<start>.tmp`: a record being written.
fn temp_path(mnt_id: u64) -> PathBuf {
    let (pid, start) = procs::me();
    mounts_dir().join(format!(".{mnt_id}.{pid}.{start}.tmp"))
}

/// The writer (pid, start) of a temporary record name, if it is one.
fn temp_writer(name: &str) -> Option<(u32, u64)> {
    let mid = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let mut f = mid.split('.');
    let (_id, pid, start) = (f.next()?.parse::<u64>().ok()?, f.next()?.parse().ok()?, f.next()?.parse().ok()?);
    f.next().is_none().then_some((pid, start))
}

/// Write `rec` (atomically: a temporary renamed into place).
pub fn write(rec: &MountRecord) -> Result<PathBuf> {
    let d = mounts_dir();
    mkdir_p(&d)?;
    let dest = record_path(rec.mnt_id);
    let tmp = temp_path(rec.mnt_id);
    let data = serde_json::to_vec_pretty(rec).map_err(|e| Error::Internal(format!("mount record: {e}")))?;
    // Written whole then renamed, so a reader never sees half a record;
    // not fsync'ed: a record describes a mount, which a crash takes with
    // it, so there is nothing for it to survive into (and the state
    // directory is normally /run, a tmpfs). On a disk, the flush cost a
    // mount more than a millisecond.
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &data));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io("write mount record", &tmp, &e));
    }
    std::fs::rename(&tmp, &dest).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("write mount record", &dest, &e)
    })?;
    Ok(dest)
}

pub fn remove(mnt_id: u64) {
    let _ = std::fs::remove_file(record_path(mnt_id));
}

/// Every readable record (and the path it was read from), temporaries of
/// dead writers removed on the way.
fn read_all() -> Vec<(PathBuf, MountRecord)> {
    let d = mounts_dir();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(&d) else { return out };
    for ent in rd.flatten() {
        let p = ent.path();
        let name = ent.file_name();
        let name = name.to_string_lossy();
        if let Some((pid, start)) = temp_writer(&name) {
            if !procs::same_process(pid, start) {
                log::debug!("removing {}: left by a killed mount", p.display());
                let _ = std::fs::remove_file(&p);
            }
            continue;
        }
        if p.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        // Records are small and this node's own (root-owned state dir); one
        // that is not regular is not ours to read.
        if !ent.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let Some(rec) = std::fs::read(&p).ok().and_then(|b| serde_json::from_slice::<MountRecord>(&b).ok()) else {
            continue;
        };
        out.push((p, rec));
    }
    out
}

/// Remove scratch directories whose owner died without its guards running
/// (SIGKILL, OOM) during a path or legacy mount (named
/// `<pid>-<start time>-<uniq>` by `mount::Scratch`): their layer mounts, and so
/// their loop devices, would otherwise stay. rmdir also detaches them in
/// other mount namespaces (Linux 3.18+). The fd way never needs this.
pub fn sweep_scratch() {
    let Ok(rd) = std::fs::read_dir(dir().join("scratch")) else { return };
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        let mut f = name.split('-');
        let (Some(pid), Some(start)) = (f.next().and_then(|p| p.parse::<u32>().ok()), f.next().and_then(|s| s.parse::<u64>().ok()))
        else {
            continue;
        };
        if crate::kernel::procs::same_process(pid, start) {
            continue; // its owner is still at work
        }
        let p = ent.path();
        let _ = rustix::mount::unmount(&p, rustix::mount::UnmountFlags::DETACH);
        match std::fs::remove_dir(&p) {
            Ok(()) => log::info!("removed scratch {} left by dead process {pid}", p.display()),
            Err(e) => log::warn!("cannot remove stale scratch {}: {e}", p.display()),
        }
    }
}

/// The namespaces some process is in now (for records of other namespaces).
fn live_namespaces() -> std::collections::BTreeSet<u64> {
    let mut out = std::collections::BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                && let Ok(m) = std::fs::metadata(e.path().join("ns/mnt"))
            {
                out.insert(std::os::unix::fs::MetadataExt::ino(&m));
            }
        }
    }
    out
}

/// All records whose mount exists or may yet (pending, or in another live
/// namespace, which we cannot look into), after removing the stale ones
/// and their utab lines: see the module documentation.
pub fn live(mounts: &[MountInfo]) -> Vec<MountRecord> {
    sweep_scratch();
    crate::kernel::loopdev::sweep_half_attached();
    let ns = mnt_ns();
    let all = read_all();
    let mut namespaces: Option<std::collections::BTreeSet<u64>> = None;
    let mut keep = Vec::new();
    let mut stale = Vec::new();
    for (p, rec) in all {
        let alive = if rec.mnt_ns == ns {
            rec.mounted_in(mounts) || rec.pending()
        } else {
            rec.pending() || namespaces.get_or_insert_with(live_namespaces).contains(&rec.mnt_ns)
        };
        if alive { keep.push(rec) } else { stale.push((p, rec)) }
    }
    for (p, rec) in stale {
        log::info!("{}: forgetting the mount at {} (its mount is gone and its mount process too)", p.display(), rec.target.display());
        if rec.utab && rec.mnt_ns == ns {
            // Only if nothing is mounted there now and no other record (a
            // newer mount of the same target, maybe still pending) claims it.
            let target = rec.target.clone();
            let others: Vec<MountRecord> = keep.iter().filter(|r| r.target == target).cloned().collect();
            let r = crate::mount::utab::remove_stale(&target, || {
                let now = crate::kernel::mountinfo::read().unwrap_or_default();
                others.is_empty() && !now.iter().any(|m| m.mount_point == target)
            });
            if let Err(e) = r {
                log::warn!("{e}: stale utab line for {} not removed", target.display());
            }
        }
        let _ = std::fs::remove_file(&p);
    }
    keep
}

/// Clean up after killed mounts and umounts (see the module
/// documentation: stale records, their utab lines, scratch directories);
/// what `live` does, for callers that have no mount table at hand. The
/// live records, or none if the mount table cannot be read.
pub fn reconcile() -> Vec<MountRecord> {
    match crate::kernel::mountinfo::read() {
        Ok(m) => live(&m),
        Err(e) => {
            log::warn!("{e}: mount records not reconciled");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_record_names() {
        let cases: &[(&str, Option<(u32, u64)>)] = &[
            (".64.1234.5678.tmp", Some((1234, 5678))),
            (".64.1234.tmp", None),
            ("64.json", None),
            (".64.x.5678.tmp", None),
            (".64.1.2.3.tmp", None),
        ];
        for (n, want) in cases {
            assert_eq!(temp_writer(n), *want, "{n:?}");
        }
        let t = temp_path(64);
        let name = t.file_name().unwrap().to_str().unwrap();
        assert_eq!(temp_writer(name), Some(procs::me()));
    }

    #[test]
    fn records_keep_odd_bytes() {
        let rec = MountRecord {
            source: "img".into(),
            target: crate::bytes::path_from(b"/srv/caf\xe9"),
            chain: vec![],
            upper: Some(UpperRecord { kind: "image".into(), image: Some(crate::bytes::path_from(b"/u/\xff.img")), fstype: "ext4".into(), loop_dev: None }),
            mount_api: "fd".into(),
            mnt_id: 7,
            mnt_ns: 1,
            created: 2,
            pid: 3,
            pid_start: 4,
            utab: true,
        };
        let j = serde_json::to_vec(&rec).unwrap();
        assert_eq!(serde_json::from_slice::<MountRecord>(&j).unwrap(), rec);
    }
}
