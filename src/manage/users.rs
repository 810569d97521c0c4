//! What this node is using right now: the mount records in the state
//! directory (live ones), the loop devices attached (every one sysfs
//! shows, matched to a layer image by device and inode, or by path where
//! the device cannot be opened), and locks on the image (`F_OFD_GETLK`:
//! any lock another process or, where the filesystem passes locks on,
//! another node holds). A layer any of these use is in use: `rm` refuses
//! to remove it and `gc` keeps it.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use super::FileId;
use super::inventory::Inventory;
use crate::store::ids::Digest;
use crate::kernel::loopdev;
use crate::mount::state::{self, LayerRecord, MountRecord};
use crate::store::openat_beneath;
use crate::kernel::sys;

#[derive(Debug)]
struct AttachedLoop {
    number: u32,
    backing: PathBuf,
    file: Option<FileId>,
}

/// What this node uses: live mount records and attached loop devices.
pub struct Users {
    records: Vec<MountRecord>,
    loops: Vec<AttachedLoop>,
    ns: u64,
    /// Mount namespaces some process is in (only read if a record of
    /// another namespace needs it).
    namespaces: std::sync::OnceLock<BTreeSet<u64>>,
}

/// Every attached loop device (every `/sys/block/loopN`, not only those
/// /proc/partitions lists: `loopdev::Scan`) and, when the device can be
/// opened, the backing file's device and inode.
fn scan_loops() -> Vec<AttachedLoop> {
    let mut out: Vec<AttachedLoop> = loopdev::attached(loopdev::Scan::Sysfs)
        .into_iter()
        .map(|loopdev::Attached { number, backing }| {
            let file = rustix::fs::open(loopdev::dev_path(number), OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty())
                .ok()
                .and_then(|fd| sys::loop_get_status64(&fd).ok())
                .map(|i| FileId { dev: i.lo_device, ino: i.lo_inode });
            AttachedLoop { number, backing, file }
        })
        .collect();
    out.sort_by_key(|l| l.number);
    out
}

fn live_namespaces() -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for ent in rd.flatten() {
        if !ent.file_name().to_str().is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        if let Ok(md) = std::fs::metadata(ent.path().join("ns/mnt")) {
            out.insert(md.ino());
        }
    }
    out
}

impl Users {
    pub fn scan() -> Users {
        let records = match crate::kernel::mountinfo::read() {
            Ok(m) => state::live(&m),
            Err(e) => {
                log::warn!("{e}: mount records not consulted");
                vec![]
            }
        };
        Users { records, loops: scan_loops(), ns: state::mnt_ns(), namespaces: std::sync::OnceLock::new() }
    }

    /// A record of our namespace was checked against mountinfo by
    /// `state::live`; one of another namespace counts while the loop device
    /// it recorded for the layer still has that backing file, or (no loop
    /// device: erofs from the file) while its namespace exists.
    fn alive(&self, rec: &MountRecord, layer: &LayerRecord) -> bool {
        if rec.mnt_ns == self.ns {
            return true;
        }
        match &layer.loop_dev {
            Some(l) => loopdev::backing_file(l.number).as_deref() == Some(l.backing.as_path()),
            None => self.namespaces.get_or_init(live_namespaces).contains(&rec.mnt_ns),
        }
    }

    /// Live mounts whose chain holds `id`.
    pub(super) fn mounts_of(&self, id: &Digest) -> Vec<&MountRecord> {
        self.records
            .iter()
            .filter(|r| r.chain.iter().any(|l| &l.chain_id == id && self.alive(r, l)))
            .collect()
    }

    pub(super) fn loops_of_file(&self, file: FileId, path: &Path) -> Vec<u32> {
        self.loops
            .iter()
            .filter(|l| match l.file {
                Some(f) => f == file,
                None => Path::new(&l.backing) == path,
            })
            .map(|l| l.number)
            .collect()
    }

    fn loops_of(&self, inv: &Inventory, id: &Digest) -> Vec<u32> {
        let mut v: Vec<u32> = inv
            .copies(id)
            .filter_map(|l| l.image.as_ref().ok())
            .flat_map(|i| self.loops_of_file(i.file, &i.path))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The image of `id` is locked by a process this node does not know
    /// as a user of it: a mount on another node sharing the store (its
    /// loop device's read lock), or an import reading it there. Only
    /// asked when this node has no loop device on it, since our own
    /// devices' locks would answer yes.
    pub(super) fn held_elsewhere(&self, inv: &Inventory, id: &Digest) -> bool {
        if !self.loops_of(inv, id).is_empty() {
            return false;
        }
        inv.copies(id).any(|l| {
            let rel = format!("layers/{}/layer.img", id.hex());
            inv.handle(l.which).is_some_and(|h| {
                openat_beneath(&h.fd, &h.path, &rel, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())
                    .is_ok_and(|fd| sys::ofd_write_lock_free(&fd) == Ok(false))
            })
        })
    }

    /// Why layer `id` must stay on this node's account, if it must.
    pub(super) fn in_use(&self, inv: &Inventory, id: &Digest) -> Option<String> {
        let mounts = self.mounts_of(id);
        if !mounts.is_empty() {
            let m: Vec<String> =
                mounts.iter().map(|r| format!("the mount at {} (source {})", r.target.display(), r.source)).collect();
            return Some(format!("is in use by {}", m.join(" and ")));
        }
        let loops = self.loops_of(inv, id);
        if !loops.is_empty() {
            let l: Vec<String> = loops.iter().map(|n| format!("/dev/loop{n}")).collect();
            return Some(format!(
                "has its image attached to {} (no sharedloop mount record for it on this node)",
                l.join(", ")
            ));
        }
        // Any OFD/POSIX lock on the image (a reader's lock taken by a mount
        // on another node sharing the store, where the filesystem passes
        // locks on) also means in use.
        for l in inv.copies(id) {
            let rel = format!("layers/{}/layer.img", id.hex());
            let Some(h) = inv.handle(l.which) else { continue };
            let Ok(fd) = openat_beneath(&h.fd, &h.path, &rel, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty()) else {
                continue;
            };
            if sys::ofd_write_lock_free(&fd) == Ok(false) {
                return Some(format!("has its image {} locked by another process or node", h.path.join(&rel).display()));
            }
        }
        None
    }

    /// A loop device attached to any file below `path` (not following
    /// symlinks), as "/dev/loopN".
    pub(super) fn attached_below(&self, path: &Path) -> Option<String> {
        let mut stack = vec![path.to_path_buf()];
        while let Some(p) = stack.pop() {
            let Ok(md) = std::fs::symlink_metadata(&p) else { continue };
            if md.is_dir() {
                if let Ok(rd) = std::fs::read_dir(&p) {
                    stack.extend(rd.flatten().map(|e| e.path()));
                }
            } else if md.is_file()
                && let Some(n) = self.loops_of_file(FileId { dev: md.dev(), ino: md.ino() }, &p).first()
            {
                return Some(format!("/dev/loop{n}"));
            }
        }
        None
    }
}
