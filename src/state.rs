//! What this node remembers about its sharedloop mounts, one JSON file per
//! mount under /run/sharedloop/mounts (SHAREDLOOP_STATE_DIR overrides), so
//! umount knows which loop devices to wait for and `status` and the
//! in-use message can say who holds what. The kernel stays the authority:
//! nothing here is needed for a mount to be correct, and a record whose
//! mount is gone from this namespace is pruned.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::Digest;
use crate::mountinfo::MountInfo;
use crate::store::{Which, mkdir_p, unique_suffix};

pub fn dir() -> PathBuf {
    std::env::var_os("SHAREDLOOP_STATE_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/run/sharedloop"))
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoopRecord {
    pub number: u32,
    /// What sysfs showed as backing_file when we set it up.
    pub backing: String,
    pub reused: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    pub chain_id: Digest,
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
    pub image: Option<PathBuf>,
    pub fstype: String,
    pub loop_dev: Option<LoopRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountRecord {
    pub source: String,
    pub target: PathBuf,
    pub chain: Vec<LayerRecord>,
    pub upper: Option<UpperRecord>,
    pub mount_api: String,
    pub mnt_id: u64,
    pub mnt_ns: u64,
    pub created: u64,
}

impl MountRecord {
    pub fn loops(&self) -> impl Iterator<Item = &LoopRecord> {
        self.chain.iter().filter_map(|l| l.loop_dev.as_ref()).chain(self.upper.iter().filter_map(|u| u.loop_dev.as_ref()))
    }
}

pub fn mnt_ns() -> u64 {
    std::fs::metadata("/proc/self/ns/mnt").map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap_or(0)
}

fn record_path(mnt_id: u64) -> PathBuf {
    dir().join("mounts").join(format!("{mnt_id}.json"))
}

pub fn write(rec: &MountRecord) -> Result<PathBuf> {
    let d = dir().join("mounts");
    mkdir_p(&d)?;
    let dest = record_path(rec.mnt_id);
    let tmp = d.join(format!(".{}.{}", rec.mnt_id, unique_suffix()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(rec).expect("serialize")).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("write mount record", &tmp, &e)
    })?;
    std::fs::rename(&tmp, &dest).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("write mount record", &dest, &e)
    })?;
    Ok(dest)
}

pub fn remove(mnt_id: u64) {
    let _ = std::fs::remove_file(record_path(mnt_id));
}

/// All records whose mount still exists (those of other namespaces are kept:
/// we cannot see their mounts), pruning the dead ones of ours.
pub fn live(mounts: &[MountInfo]) -> Vec<MountRecord> {
    let d = dir().join("mounts");
    let ns = mnt_ns();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(&d) else { return out };
    for ent in rd.flatten() {
        let p = ent.path();
        if p.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let Some(rec) = std::fs::read(&p).ok().and_then(|b| serde_json::from_slice::<MountRecord>(&b).ok()) else {
            continue;
        };
        if rec.mnt_ns == ns && !mounts.iter().any(|m| m.id == rec.mnt_id && Path::new(&m.mount_point) == rec.target) {
            let _ = std::fs::remove_file(&p);
            continue;
        }
        out.push(rec);
    }
    out
}
