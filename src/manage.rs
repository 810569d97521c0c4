//! Managing the store: `sharedloop ls`, `rm`, `gc` and `verify`.
//!
//! All four start from an [`Inventory`]: one pass over `layers/` and
//! `names/` of both store directories (root and fallback), and from
//! [`Users`]: what this node is using right now, from the mount records in
//! the state directory and from the loop devices attached (every
//! `/sys/block/loopN`, not only those /proc/partitions lists, matched to a
//! layer image by device and inode, or by path where the device cannot be
//! opened), and from locks on the image (`F_OFD_GETLK`: any lock another
//! process or, where the filesystem passes locks on, another node holds).
//!
//! Everything is read and removed through store directory fds
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, `unlinkat`): a symlink planted
//! in a shared store is refused or removed as a link, never followed.
//!
//! # What is referenced
//!
//! A layer is *needed* when it is in the chain of any name (in either store
//! directory; a name shadowed by the same name in the root still counts) or
//! when it is the parent of a layer that stays. A layer can be stored in
//! both directories; IDs are what count, and removing a layer removes every
//! stored copy of it.
//!
//! # `rm NAME|ID ...`
//!
//! Removes the name records (from both directories) and then every layer of
//! their chains that is no longer needed. A bare layer ID (or unique prefix)
//! removes that layer and the part of its chain nothing else needs; it is
//! refused when another layer depends on it (the dependent is named) or a
//! name's chain contains it. Nothing is changed when any layer to be removed
//! is used by a live mount on this node (the mount is named), has its
//! image attached to a loop device, or locked. `--name-only` removes the
//! name records only (this works while the image is mounted; `gc` takes the
//! layers later). `--dry-run` says what would go. Errors: a malformed
//! argument is a usage error (exit 1); an unknown name or ID, a needed
//! layer or one in use exit with 32 (store errors, as everywhere).
//!
//! Each layer directory leaves `layers/` with one rename into
//! `tmp/<hex>.deleting.<host>.<pid>.<uniq>` and is deleted there, so a
//! concurrent mount sees a whole layer or none. The in-use check and the
//! renames happen under the node's attach lock (the one mounts hold while
//! they find or attach loop devices), so no mount on this node can attach a
//! layer in between. Mounts on other nodes are seen through image
//! locks: every layer image attached to a loop device carries a shared OFD
//! lock for as long as the device holds it (erofs layers mounted straight
//! from the file do not: the kernel opens its own file). The check and the
//! rename are not one step across nodes, so a mount racing an `rm` on
//! another node can still lose its layer (NFS: ESTALE).
//!
//! # `gc`
//!
//! Removes layers that are not needed (see above), except those younger
//! than `--min-age` (default 1 hour; age from the metadata's `created` and
//! the layer directory's mtime, whichever is younger): `add` without
//! `--name` publishes layers that are unreferenced until the top of the
//! image is added and named, and a multi-layer add must not lose its lower
//! layers in between. For the same reason a layer published after an `add`
//! or `import` still at work began (the oldest live staging directory in
//! `tmp/`, see below) is young too, so an import that runs longer than the
//! grace period keeps its lower layers. A young layer keeps its ancestors.
//! Layers in use (and their ancestors) are kept whatever their age, and
//! no layer is removed when a store directory could not be read completely.
//!
//! It also removes what crashed processes left:
//! - `tmp/<label>.<host>.<pid>.<uniq>` (staging of `add`/`import`, and
//!   `.deleting` directories of `rm`/`gc`): when `<host>` is this host and
//!   process `<pid>` is gone (or is a later process with that number), or
//!   when `<host>` is another host and it is older than 24 hours;
//! - `uppers/.<name>.img.tmp.<host>.<pid>.<uniq>` (upper images being
//!   created): the same rule;
//! - `names/.<name>.<pid>.<uniq>` (name records being written; they carry no
//!   host): older than one hour with no process `<pid>` here, or older than
//!   24 hours.
//!
//! Entries of `tmp/` that follow no known pattern go after 24 hours.
//! Nothing whose file is attached to a loop device, or locked (uppers), is
//! removed. Bytes freed are counted as allocated blocks (`st_blocks`).
//! A crash between renaming a layer out of `layers/` and deleting it leaves
//! a `.deleting` directory of a dead process, which the next `gc` removes.
//!
//! Races the grace period does not cover: `add --parent P` checks that P
//! exists when it starts and publishes its layer when it ends; a `gc` or
//! `rm` that removes P in between (P unreferenced and older than the grace)
//! leaves the new layer with a missing parent (`verify` reports it).
//!
//! # `verify [ID|NAME ...]`
//!
//! Without arguments every stored layer and name; with arguments the chains
//! they name. Per layer copy: the metadata reads and agrees with itself
//! ([`LayerMeta::validate`]); `layer.img` is a regular file of exactly
//! `meta.size` bytes; its superblock magic matches `fstype` (ext4 0xEF53 at
//! byte 1080, xfs `XFSB` at 0, erofs 0xE0F5E1E2 at 1024); its parent is in
//! the store; with `--deep` the filesystem checker runs read-only
//! (`e2fsck -fn`, `xfs_repair -n -f`, `fsck.erofs`). Per name: the record
//! reads and its chain is complete. Exits with 32 when anything failed.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::fs::{AtFlags, Mode, OFlags};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::ids::{Digest, LayerRef, Name};
use crate::loopdev;
use crate::state::{self, LayerRecord, MountRecord};
use crate::store::{self, DirHandle, FsType, LayerMeta, MAX_LAYERS, Store, Which, falls_back, openat_beneath};
use crate::sys;

/// Staging left by another host is only judged by its age.
const OTHER_HOST_GRACE: u64 = 24 * 3600;
/// Name records are written in milliseconds; their temporaries carry no host.
const NAME_TMP_GRACE: u64 = 3600;

// ------------------------------------------------------------------ inventory

/// Device and inode of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub path: PathBuf,
    /// st_size
    pub size: u64,
    /// st_blocks * 512
    pub allocated: u64,
    file: FileId,
}

/// One stored copy of a layer.
#[derive(Debug)]
pub struct StoredLayer {
    pub id: Digest,
    pub which: Which,
    /// `layers/<hex>`
    pub path: PathBuf,
    pub meta: std::result::Result<LayerMeta, String>,
    pub image: std::result::Result<ImageInfo, String>,
    /// mtime of the layer directory, seconds since the epoch.
    pub mtime: u64,
}

/// One name record.
#[derive(Debug)]
pub struct StoredName {
    pub name: Name,
    pub which: Which,
    pub path: PathBuf,
    pub target: std::result::Result<Digest, String>,
}

/// Something in the store that is not what it should be.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    pub store: Which,
    pub path: PathBuf,
    pub error: String,
}

/// Every layer and name in both store directories.
pub struct Inventory {
    pub root: PathBuf,
    pub fallback: PathBuf,
    /// The store directories that exist, root first, canonical paths.
    pub dirs: Vec<(Which, Arc<DirHandle>)>,
    /// Root copies before fallback copies.
    pub layers: Vec<StoredLayer>,
    pub names: Vec<StoredName>,
    pub problems: Vec<Problem>,
    /// A `layers/` or `names/` directory could not be read: references are
    /// unknown, so nothing may be removed on their account.
    pub incomplete: bool,
    by_id: BTreeMap<Digest, Vec<usize>>,
}

/// Entries of the subdirectory `sub` of a store directory (opened beneath
/// it, never through a symlink): (file name, path), sorted. A missing
/// directory is empty. Names that are not UTF-8 are none of ours: skipped.
fn list_dir(h: &DirHandle, sub: &str) -> Result<Vec<(String, PathBuf)>> {
    let dir = h.path.join(sub);
    let fd = match openat_beneath(&h.fd, &h.path, sub, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) if e.errno() == Some(rustix::io::Errno::NOENT) => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for ent in rustix::fs::Dir::read_from(&fd).map_err(|e| Error::sys("read directory", &dir, e))? {
        let ent = ent.map_err(|e| Error::sys("read directory", &dir, e))?;
        let Ok(name) = ent.file_name().to_str() else { continue };
        if name != "." && name != ".." {
            out.push((name.to_string(), dir.join(name)));
        }
    }
    out.sort();
    Ok(out)
}

fn stat_image(h: &DirHandle, id: &Digest) -> std::result::Result<ImageInfo, String> {
    let rel = format!("layers/{}/layer.img", id.hex());
    let path = h.path.join(&rel);
    let fd = openat_beneath(&h.fd, &h.path, &rel, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())
        .map_err(|e| e.to_string())?;
    let st = rustix::fs::fstat(&fd).map_err(|e| Error::sys("stat", &path, e).to_string())?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(format!("{}: not a regular file", path.display()));
    }
    Ok(ImageInfo {
        path,
        size: st.st_size as u64,
        allocated: st.st_blocks as u64 * 512,
        file: FileId { dev: st.st_dev as u64, ino: st.st_ino as u64 },
    })
}

impl Inventory {
    pub fn scan(store: &Store) -> Result<Inventory> {
        let mut inv = Inventory {
            root: store.root.clone(),
            fallback: store.fallback.clone(),
            dirs: vec![],
            layers: vec![],
            names: vec![],
            problems: vec![],
            incomplete: false,
            by_id: BTreeMap::new(),
        };
        for which in [Which::Root, Which::Fallback] {
            let h = match store.handle(which) {
                Ok(h) => h,
                // Missing or unreadable: as with the fallback rule, empty.
                Err(e) if e.errno().is_some_and(falls_back) => continue,
                Err(e) => return Err(e),
            };
            if inv.dirs.iter().any(|(_, d)| d.path == h.path) {
                continue; // root and fallback are one directory
            }
            inv.scan_layers(which, &h);
            inv.scan_names(which, &h);
            inv.dirs.push((which, h));
        }
        if inv.dirs.is_empty() {
            // Neither store is there: an error, so that `verify` or `gc` of
            // a shared store that is not mounted never reports success.
            store.require()?;
        }
        for (i, l) in inv.layers.iter().enumerate() {
            inv.by_id.entry(l.id).or_default().push(i);
        }
        Ok(inv)
    }

    fn problem(&mut self, store: Which, path: PathBuf, error: impl Into<String>) {
        self.problems.push(Problem { store, path, error: error.into() });
    }

    fn scan_layers(&mut self, which: Which, h: &DirHandle) {
        let entries = match list_dir(h, "layers") {
            Ok(v) => v,
            Err(e) => {
                self.incomplete = true;
                return self.problem(which, h.path.join("layers"), e.to_string());
            }
        };
        for (name, path) in entries {
            let Some(id) = Digest::from_hex(&name) else {
                self.problem(which, path, "not a layer (name is not a chain ID)");
                continue;
            };
            let md = match std::fs::symlink_metadata(&path) {
                Ok(md) => md,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // removed meanwhile
                Err(e) => {
                    self.problem(which, path.clone(), Error::io("stat", &path, &e).to_string());
                    continue;
                }
            };
            if !md.is_dir() {
                self.problem(which, path, "not a layer (not a directory)");
                continue;
            }
            let meta = Store::read_meta_in(&h.path, &id).map_err(|e| e.to_string());
            let image = stat_image(h, &id);
            self.layers.push(StoredLayer { id, which, path, meta, image, mtime: md.mtime().max(0) as u64 });
        }
    }

    fn scan_names(&mut self, which: Which, h: &DirHandle) {
        let entries = match list_dir(h, "names") {
            Ok(v) => v,
            Err(e) => {
                self.incomplete = true;
                return self.problem(which, h.path.join("names"), e.to_string());
            }
        };
        for (file, path) in entries {
            if file.starts_with('.') {
                continue; // a record being written (gc's business)
            }
            let Some(name) = Name::from_file_name(&file).filter(|n| n.file_name() == file) else {
                self.problem(which, path, "not a name record (invalid name)");
                continue;
            };
            // The one way a name record is read (store::read_name_in): as
            // the server has it, riding out a record another node has just
            // replaced. It lists names/ again for each name: fine for the
            // tens to hundreds of names a store holds.
            let target = store::read_name_in(&h.path, &name).map_err(|e| e.to_string());
            self.names.push(StoredName { name, which, path, target });
        }
    }

    pub fn has(&self, id: &Digest) -> bool {
        self.by_id.contains_key(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &Digest> {
        self.by_id.keys()
    }

    pub fn copies<'a>(&'a self, id: &Digest) -> impl Iterator<Item = &'a StoredLayer> + 'a {
        self.by_id.get(id).into_iter().flatten().map(|&i| &self.layers[i])
    }

    /// The metadata of the first copy that has valid metadata (root first).
    pub fn meta_of(&self, id: &Digest) -> Option<&LayerMeta> {
        self.copies(id).find_map(|l| l.meta.as_ref().ok())
    }

    /// `starts` and all their ancestors (as far as metadata tells).
    pub fn closure(&self, starts: impl IntoIterator<Item = Digest>) -> BTreeSet<Digest> {
        let mut out = BTreeSet::new();
        let mut stack: Vec<Digest> = starts.into_iter().collect();
        while let Some(id) = stack.pop() {
            if !out.insert(id) {
                continue;
            }
            if let Some(p) = self.meta_of(&id).and_then(|m| m.parent) {
                stack.push(p);
            }
        }
        out
    }

    /// The chain of `top`, top first, as far as it goes; the error says why
    /// it stops early.
    pub fn chain(&self, top: &Digest) -> (Vec<Digest>, Option<String>) {
        let mut ids = Vec::new();
        let mut next = Some(*top);
        while let Some(id) = next {
            if ids.contains(&id) || ids.len() >= MAX_LAYERS {
                return (ids, Some(format!("chain of {top}: parent cycle or more than {MAX_LAYERS} layers")));
            }
            match self.meta_of(&id) {
                Some(m) => {
                    ids.push(id);
                    next = m.parent;
                }
                None if self.has(&id) => return (ids, Some(format!("layer {id} has unreadable metadata"))),
                None => return (ids, Some(format!("layer {id} is missing"))),
            }
        }
        (ids, None)
    }

    /// Names (deduplicated) whose chain contains each layer.
    fn names_by_layer(&self) -> BTreeMap<Digest, BTreeSet<String>> {
        let mut out: BTreeMap<Digest, BTreeSet<String>> = BTreeMap::new();
        for n in &self.names {
            if let Ok(top) = &n.target {
                for id in self.chain(top).0 {
                    out.entry(id).or_default().insert(n.name.to_string());
                }
            }
        }
        out
    }

    /// Layers with a copy whose parent is `id`.
    fn children_of(&self, id: &Digest) -> BTreeSet<Digest> {
        self.layers
            .iter()
            .filter(|l| l.meta.as_ref().ok().and_then(|m| m.parent).as_ref() == Some(id))
            .map(|l| l.id)
            .collect()
    }

    fn handle(&self, which: Which) -> Option<&Arc<DirHandle>> {
        self.dirs.iter().find(|(w, _)| *w == which).map(|(_, h)| h)
    }

    /// Resolve a user's layer reference against what is stored.
    fn resolve_id(&self, r: &LayerRef) -> Result<Digest> {
        let not_found = |what: String| {
            Error::Store(format!(
                "layer {what}: not found in {} nor {}",
                self.root.display(),
                self.fallback.display()
            ))
        };
        match r {
            LayerRef::Id(d) if self.has(d) => Ok(*d),
            LayerRef::Id(d) => Err(not_found(d.to_string())),
            LayerRef::Prefix(p) => {
                let found: Vec<&Digest> = self.ids().filter(|d| d.hex().starts_with(p.as_str())).collect();
                match found.as_slice() {
                    [] => Err(not_found(format!("sha256:{p}"))),
                    [one] => Ok(**one),
                    many => Err(Error::Store(format!(
                        "layer sha256:{p}: ambiguous ID prefix, {} layers match: {}",
                        many.len(),
                        many.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
                    ))),
                }
            }
            LayerRef::Name(n) => Err(Error::Internal(format!("{n} is not a layer ID"))),
        }
    }

    fn refuse_if_incomplete(&self, what: &str) -> Result<()> {
        if self.incomplete {
            let p: Vec<String> = self.problems.iter().map(|p| p.error.clone()).collect();
            return Err(Error::Store(format!(
                "{what}: cannot tell which layers are referenced, the store could not be read completely: {}",
                p.join("; ")
            )));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------- users

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

/// Every attached loop device: its backing path and, when the device can
/// be opened, the backing file's device and inode.
fn scan_loops() -> Vec<AttachedLoop> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/sys/block") else { return out };
    for ent in rd.flatten() {
        let name = ent.file_name();
        let Some(n) = name.to_str().and_then(|s| s.strip_prefix("loop")).and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Some(backing) = loopdev::backing_file(n) else { continue };
        let file = rustix::fs::open(loopdev::dev_path(n), OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty())
            .ok()
            .and_then(|fd| sys::loop_get_status64(&fd).ok())
            .map(|i| FileId { dev: i.lo_device, ino: i.lo_inode });
        out.push(AttachedLoop { number: n, backing, file });
    }
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
        let records = match crate::mountinfo::read() {
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
    fn mounts_of(&self, id: &Digest) -> Vec<&MountRecord> {
        self.records
            .iter()
            .filter(|r| r.chain.iter().any(|l| &l.chain_id == id && self.alive(r, l)))
            .collect()
    }

    fn loops_of_file(&self, file: FileId, path: &Path) -> Vec<u32> {
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
    fn held_elsewhere(&self, inv: &Inventory, id: &Digest) -> bool {
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
    fn in_use(&self, inv: &Inventory, id: &Digest) -> Option<String> {
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
    fn attached_below(&self, path: &Path) -> Option<String> {
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

/// The node's attach lock (the one mount.sharedloop holds while it finds
/// or attaches layer devices): held, no mount on this node attaches a
/// layer. Best effort: without a state directory we go on unlocked.
struct NodeLock(#[allow(dead_code)] Option<crate::assemble::AttachLock>);

fn node_lock() -> NodeLock {
    match crate::assemble::AttachLock::take(&state::dir()) {
        Ok(l) => NodeLock(Some(l)),
        Err(e) => {
            log::warn!("{e}; going on without the attach lock");
            NodeLock(None)
        }
    }
}

// ------------------------------------------------------------------- removal

/// Allocated bytes below `path` (not following symlinks).
fn du(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else { continue };
        total += md.blocks() * 512;
        if md.is_dir()
            && let Ok(rd) = std::fs::read_dir(&p)
        {
            stack.extend(rd.flatten().map(|e| e.path()));
        }
    }
    total
}

fn open_subdir(h: &DirHandle, sub: &str) -> Result<OwnedFd> {
    openat_beneath(&h.fd, &h.path, sub, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
}

/// Remove `name` in `dir` and everything below it, through directory fds
/// only: a symlink planted in the store (or swapped in meanwhile) is
/// removed as a link, never followed.
fn remove_at(dir: &OwnedFd, name: &std::ffi::CStr) -> std::result::Result<(), rustix::io::Errno> {
    use rustix::io::Errno;
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {}
        Err(e) => return Err(e),
    }
    let sub = match rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for ent in rustix::fs::Dir::read_from(&sub)? {
        let ent = ent?;
        let n = ent.file_name();
        if n != c"." && n != c".." {
            names.push(n.to_owned());
        }
    }
    for n in names {
        remove_at(&sub, &n)?;
    }
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Remove the entry `name` of the subdirectory `sub` of a store directory.
fn remove_entry(h: &DirHandle, sub: &str, name: &str) -> Result<()> {
    let path = h.path.join(sub).join(name);
    let fd = open_subdir(h, sub)?;
    let cname = std::ffi::CString::new(name).map_err(|_| Error::Internal(format!("{name:?}: NUL in a file name")))?;
    remove_at(&fd, &cname).map_err(|e| Error::sys("remove", path, e))
}

/// Move `layers/<hex>` of store directory `h` to
/// `tmp/<hex>.deleting.<host>.<pid>.<uniq>` in one rename; returns that
/// name, to be deleted once every rename is done.
fn retire_layer(h: &DirHandle, id: &Digest) -> Result<Option<String>> {
    store::mkdir_p(&h.path.join("tmp"))?;
    let layers = open_subdir(h, "layers")?;
    let tmp = open_subdir(h, "tmp")?;
    let dest = store::temp_name(&format!("{}.deleting", id.hex()));
    match rustix::fs::renameat(&layers, id.hex(), &tmp, &dest) {
        Ok(()) => Ok(Some(dest)),
        // Removed meanwhile (another node's gc): nothing left to do.
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(Error::sys(format!("layer {id}: move out of the store"), h.path.join("layers").join(id.hex()), e)),
    }
}

fn remove_name(h: &DirHandle, n: &StoredName) -> Result<()> {
    let names = open_subdir(h, "names")?;
    match rustix::fs::unlinkat(&names, n.name.file_name(), AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(Error::sys(format!("name {}: remove", n.name), &n.path, e)),
    }
}

/// Remove name records, then layers (children before parents), under the
/// node lock, checking again under it what is in use: `rm` then refuses
/// (`skip_busy` false), `gc` keeps those layers and their ancestors.
/// Returns the layers removed and the bytes freed.
fn remove_layers(
    inv: &Inventory,
    doomed: &[Digest],
    names: &[&StoredName],
    what: &str,
    skip_busy: bool,
) -> Result<(usize, u64)> {
    let lock = node_lock();
    let users = Users::scan();
    let busy: Vec<(Digest, String)> = doomed.iter().filter_map(|id| users.in_use(inv, id).map(|why| (*id, why))).collect();
    let mut doomed = doomed.to_vec();
    if !busy.is_empty() {
        if !skip_busy {
            let b: Vec<String> = busy.iter().map(|(id, why)| format!("layer {id} {why}")).collect();
            return Err(Error::InUse(format!("cannot remove {what}: {}", b.join("; "))));
        }
        let keep = inv.closure(busy.iter().map(|(id, _)| *id));
        for (id, why) in &busy {
            log::info!("layer {id} kept: it {why}");
        }
        doomed.retain(|id| !keep.contains(id));
    }
    for n in names {
        let h = inv.handle(n.which).ok_or_else(|| Error::Internal("store directory vanished".into()))?;
        remove_name(h, n)?;
        println!("removed name {} ({})", n.name, n.which);
    }
    let mut retired = Vec::new();
    let mut err = None;
    'outer: for id in &doomed {
        for l in inv.copies(id) {
            let h = inv.handle(l.which).ok_or_else(|| Error::Internal("store directory vanished".into()))?;
            let bytes = du(&l.path);
            match retire_layer(h, id) {
                Ok(Some(p)) => retired.push((l, p, bytes)),
                Ok(None) => {}
                Err(e) => {
                    err = Some(e);
                    break 'outer;
                }
            }
        }
    }
    drop(lock);
    let (mut count, mut freed) = (0, 0);
    for (l, p, bytes) in retired {
        let h = inv.handle(l.which).expect("scanned");
        remove_entry(h, "tmp", &p)?;
        count += 1;
        freed += bytes;
        println!("removed layer {} ({}, {})", l.id, l.which, human_size(bytes));
    }
    match err {
        Some(e) => Err(e),
        None => Ok((count, freed)),
    }
}

/// Layers ordered children first: deeper chains first.
fn children_first(inv: &Inventory, ids: impl IntoIterator<Item = Digest>) -> Vec<Digest> {
    let mut v: Vec<(usize, Digest)> = ids.into_iter().map(|id| (inv.chain(&id).0.len(), id)).collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    v.into_iter().map(|(_, id)| id).collect()
}

// ------------------------------------------------------------------------ ls

/// `sharedloop ls --json`: one JSON document. Field names are stable.
///
/// ```text
/// {
///   "root": "/var/lib/sharedloop/root",      store root as configured
///   "fallback": "/var/lib/sharedloop/private",
///   "images": [                              one per name record, by name
///     { "name": "debian:12",
///       "store": "root",                     where the record is: root | fallback
///       "top": "sha256:…",                   chain ID the name points to
///       "layers": 3,                         layers in its chain (those found)
///       "size": 12345678,                    bytes: sum of the chain's meta sizes
///       "error": null }                      or why the chain is incomplete
///   ],
///   "layers": [                              one per stored copy, by chain ID
///     { "chain_id": "sha256:…",
///       "diff_id": "sha256:…",
///       "parent": "sha256:…" | null,
///       "fstype": "ext4" | "xfs" | "erofs",
///       "size": 4194304,                     bytes of layer.img (metadata)
///       "created": 1700000000,               seconds since the epoch
///       "store": "root" | "fallback",
///       "names": ["debian:12"],              names whose chain holds it
///       "mounts": 1,                         live sharedloop mounts on this node using it
///       "loop_devices": [7],                 loop devices its image is attached to
///       "held_elsewhere": false }            locked by a user this node does not know:
///                                            a mount on another node sharing the store
///   ],
///   "problems": [                            what could not be read
///     { "store": "root", "path": "…", "error": "…" }
///   ]
/// }
/// ```
#[derive(Debug, Serialize)]
pub struct Listing {
    pub root: PathBuf,
    pub fallback: PathBuf,
    pub images: Vec<ImageEntry>,
    pub layers: Vec<LayerEntry>,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Serialize)]
pub struct ImageEntry {
    pub name: String,
    pub store: Which,
    pub top: Digest,
    pub layers: usize,
    pub size: u64,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LayerEntry {
    /// chain_id, diff_id, parent, fstype, size, created: as stored.
    #[serde(flatten)]
    pub meta: LayerMeta,
    pub store: Which,
    pub names: Vec<String>,
    pub mounts: usize,
    pub loop_devices: Vec<u32>,
    pub held_elsewhere: bool,
}

pub fn listing(store: &Store) -> Result<Listing> {
    let inv = Inventory::scan(store)?;
    let users = Users::scan();
    let mut problems = inv.problems.clone();
    let mut images = Vec::new();
    for n in &inv.names {
        match &n.target {
            Ok(top) => {
                let (chain, error) = inv.chain(top);
                let size = chain.iter().filter_map(|id| inv.meta_of(id)).map(|m| m.size).sum();
                images.push(ImageEntry {
                    name: n.name.to_string(),
                    store: n.which,
                    top: *top,
                    layers: chain.len(),
                    size,
                    error,
                });
            }
            Err(e) => problems.push(Problem { store: n.which, path: n.path.clone(), error: e.clone() }),
        }
    }
    images.sort_by(|a, b| a.name.cmp(&b.name).then((a.store as u8).cmp(&(b.store as u8))));
    let names = inv.names_by_layer();
    let mut layers = Vec::new();
    for l in &inv.layers {
        let meta = match &l.meta {
            Ok(m) => m,
            Err(e) => {
                problems.push(Problem { store: l.which, path: l.path.clone(), error: e.clone() });
                continue;
            }
        };
        let loop_devices = match &l.image {
            Ok(i) => users.loops_of_file(i.file, &i.path),
            Err(e) => {
                problems.push(Problem { store: l.which, path: l.path.join("layer.img"), error: e.clone() });
                vec![]
            }
        };
        layers.push(LayerEntry {
            meta: meta.clone(),
            store: l.which,
            names: names.get(&l.id).map(|s| s.iter().cloned().collect()).unwrap_or_default(),
            mounts: users.mounts_of(&l.id).len(),
            held_elsewhere: loop_devices.is_empty() && users.held_elsewhere(&inv, &l.id),
            loop_devices,
        });
    }
    layers.sort_by(|a, b| a.meta.chain_id.cmp(&b.meta.chain_id).then((a.store as u8).cmp(&(b.store as u8))));
    Ok(Listing { root: inv.root.clone(), fallback: inv.fallback.clone(), images, layers, problems })
}

/// What other nodes sharing the store hold, as far as this node can
/// tell: images locked by users it does not know (their mounts' loop
/// devices hold the locks) and, for uppers with multi-mount protection,
/// the node named in the image.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Elsewhere {
    /// Layers locked by a user this node does not know.
    pub layers: Vec<Digest>,
    pub uppers: Vec<UpperElsewhere>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct UpperElsewhere {
    pub image: PathBuf,
    /// The node an MMP-protected image names as its last writer.
    pub node: Option<String>,
}

pub fn held_elsewhere(store: &Store) -> Result<Elsewhere> {
    let inv = Inventory::scan(store)?;
    let users = Users::scan();
    let mut out = Elsewhere { layers: inv.ids().filter(|id| users.held_elsewhere(&inv, id)).copied().collect(), uppers: vec![] };
    for (_, h) in &inv.dirs {
        for (name, path) in list_dir(h, "uppers").unwrap_or_default() {
            if name.starts_with('.') || !name.ends_with(".img") {
                continue;
            }
            let Ok(fd) = openat_beneath(&h.fd, &h.path, &format!("uppers/{name}"), OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty()) else {
                continue;
            };
            let Ok(st) = rustix::fs::fstat(&fd) else { continue };
            let file = FileId { dev: st.st_dev, ino: st.st_ino };
            if !users.loops_of_file(file, &path).is_empty() || sys::ofd_write_lock_free(&fd) != Ok(false) {
                continue;
            }
            let node = crate::mmp::read(&fd).filter(|b| b.state() == crate::mmp::MmpState::Active).map(|b| b.node);
            out.uppers.push(UpperElsewhere { image: path, node });
        }
    }
    Ok(out)
}

/// Bytes for people: 512B, 4.0KiB, 12.3MiB.
pub fn human_size(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b}B");
    }
    let mut v = b as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1}{}", UNITS[u])
}

/// Columns padded to their widest cell, two spaces apart, the last one
/// not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let mut out = String::new();
    let head: Vec<String> = header.iter().map(|s| s.to_string()).collect();
    for r in std::iter::once(&head).chain(rows) {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  ", w = w[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The human form of `ls`.
pub fn render(l: &Listing) -> String {
    let images: Vec<Vec<String>> = l
        .images
        .iter()
        .map(|i| {
            vec![i.name.clone(), i.top.short(), i.layers.to_string(), human_size(i.size), i.store.to_string()]
        })
        .collect();
    let opt = |d: &Option<Digest>| d.map(|d| d.short()).unwrap_or_else(|| "-".into());
    let layers: Vec<Vec<String>> = l
        .layers
        .iter()
        .map(|x| {
            vec![
                x.meta.chain_id.short(),
                x.meta.diff_id.short(),
                opt(&x.meta.parent),
                x.meta.fstype.to_string(),
                human_size(x.meta.size),
                x.store.to_string(),
                x.mounts.to_string(),
                if x.held_elsewhere { "yes".into() } else { "-".into() },
                if x.names.is_empty() { "-".into() } else { x.names.join(",") },
            ]
        })
        .collect();
    format!(
        "{}\n{}",
        table(&["NAME", "TOP", "LAYERS", "SIZE", "STORE"], &images),
        table(&["CHAIN ID", "DIFF ID", "PARENT", "FSTYPE", "SIZE", "STORE", "MOUNTS", "ELSEWHERE", "NAMES"], &layers)
    )
}

pub fn ls(store: &Store, json: bool) -> Result<()> {
    let l = listing(store)?;
    // A missing fallback is the usual case; a missing root is worth a word.
    for (_, p, e) in store.missing().into_iter().filter(|(w, ..)| *w == Which::Root) {
        log::warn!("root store {}: {e}; listing the fallback only", p.display());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&l).expect("serialize"));
        return Ok(());
    }
    print!("{}", render(&l));
    for i in l.images.iter().filter(|i| i.error.is_some()) {
        log::warn!("image {} ({}): incomplete: {}", i.name, i.store, i.error.as_deref().unwrap_or(""));
    }
    for p in &l.problems {
        log::warn!("{} store: {}: {}", p.store, p.path.display(), p.error);
    }
    Ok(())
}

// ------------------------------------------------------------------------ rm

pub struct RmOptions {
    /// Remove the name records only; layers stay (for `gc`).
    pub name_only: bool,
    pub dry_run: bool,
}

pub fn rm(store: &Store, targets: &[String], o: &RmOptions) -> Result<()> {
    if targets.is_empty() {
        return Err(Error::Usage("rm: name what to remove (NAME or layer ID)".into()));
    }
    let inv = Inventory::scan(store)?;
    let mut gone_names: BTreeSet<Name> = BTreeSet::new();
    let mut layer_targets: Vec<Digest> = Vec::new();
    for t in targets {
        match LayerRef::parse(t)? {
            LayerRef::Name(n) => {
                if !inv.names.iter().any(|s| s.name == n) {
                    return Err(Error::Store(format!(
                        "image {n}: no such name in {} nor {}",
                        inv.root.display(),
                        inv.fallback.display()
                    )));
                }
                gone_names.insert(n);
            }
            r if o.name_only => {
                return Err(Error::Usage(format!("rm --name-only: {r} is a layer ID, not a name")));
            }
            r => layer_targets.push(inv.resolve_id(&r)?),
        }
    }
    let name_records: Vec<&StoredName> = inv.names.iter().filter(|n| gone_names.contains(&n.name)).collect();
    let what = targets.join(" ");
    if o.name_only {
        for n in &name_records {
            if o.dry_run {
                println!("would remove name {} ({})", n.name, n.which);
            } else {
                remove_name(inv.handle(n.which).expect("scanned"), n)?;
                println!("removed name {} ({})", n.name, n.which);
            }
        }
        return Ok(());
    }
    inv.refuse_if_incomplete(&format!("cannot remove {what}"))?;

    // The chains to remove, and what must stay: the chains of the other
    // names and the ancestors of every layer outside the removed chains.
    let tops = name_records.iter().filter_map(|n| n.target.as_ref().ok().copied()).chain(layer_targets.iter().copied());
    let candidates = inv.closure(tops);
    let remaining: Vec<&StoredName> = inv.names.iter().filter(|n| !gone_names.contains(&n.name)).collect();
    let keep_roots = remaining
        .iter()
        .filter_map(|n| n.target.as_ref().ok().copied())
        .chain(inv.ids().filter(|id| !candidates.contains(id)).copied())
        .chain(claimed(&inv, store::now_secs()));
    let needed = inv.closure(keep_roots);
    let by_imports = inv.closure(claimed(&inv, store::now_secs()));

    let mut refusals = Vec::new();
    for t in &layer_targets {
        if !needed.contains(t) {
            continue;
        }
        let dependents: Vec<String> = inv
            .children_of(t)
            .into_iter()
            .filter(|c| needed.contains(c) || !candidates.contains(c))
            .map(|c| c.to_string())
            .collect();
        let images: Vec<String> = remaining
            .iter()
            .filter(|n| n.target.as_ref().is_ok_and(|top| inv.chain(top).0.contains(t)))
            .map(|n| n.name.to_string())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut why = Vec::new();
        match dependents.as_slice() {
            [] => {}
            [one] => why.push(format!("layer {one} depends on it")),
            many => why.push(format!("layers {} depend on it", many.join(", "))),
        }
        match images.as_slice() {
            [] => {}
            [one] => why.push(format!("it is in the chain of image {one}")),
            many => why.push(format!("it is in the chain of images {}", many.join(", "))),
        }
        if by_imports.contains(t) {
            why.push("an import still at work uses it".into());
        }
        refusals.push((t, why.join("; ")));
    }
    match refusals.as_slice() {
        [] => {}
        [(t, why)] if layer_targets.len() == 1 && targets.len() == 1 => {
            return Err(Error::InUse(format!("cannot remove layer {t}: {why}")));
        }
        many => {
            let m: Vec<String> = many.iter().map(|(t, why)| format!("layer {t} is needed: {why}")).collect();
            return Err(Error::InUse(format!("cannot remove {what}: {}", m.join("; "))));
        }
    }
    for n in &name_records {
        if let Ok(top) = &n.target
            && let (_, Some(e)) = inv.chain(top)
        {
            log::warn!("image {}: chain incomplete ({e}); removing what is there", n.name);
        }
    }
    let doomed = children_first(&inv, candidates.difference(&needed).copied());

    // Refuse before changing anything.
    let users = Users::scan();
    let busy: Vec<String> =
        doomed.iter().filter_map(|id| users.in_use(&inv, id).map(|why| format!("layer {id} {why}"))).collect();
    if !busy.is_empty() {
        return Err(Error::InUse(format!("cannot remove {what}: {}", busy.join("; "))));
    }
    if o.dry_run {
        for n in &name_records {
            println!("would remove name {} ({})", n.name, n.which);
        }
        let mut total = 0;
        for id in &doomed {
            for l in inv.copies(id) {
                let b = du(&l.path);
                total += b;
                println!("would remove layer {} ({}, {})", id, l.which, human_size(b));
            }
        }
        println!("would free {total} bytes ({})", human_size(total));
        return Ok(());
    }
    let (_, freed) = remove_layers(&inv, &doomed, &name_records, &what, false)?;
    if !doomed.is_empty() {
        println!("freed {freed} bytes ({})", human_size(freed));
    }
    Ok(())
}

// ------------------------------------------------------------------------ gc

pub struct GcOptions {
    pub dry_run: bool,
    /// Unreferenced layers younger than this stay.
    pub min_age: Duration,
}

/// "1h", "30m", "90s", "2d", "1h30m", "0"; a bare number is seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(n) = t.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'w' => 7 * 86400,
            _ => return Err(format!("{s:?}: unknown unit {c:?} (use s, m, h, d or w)")),
        };
        let n: u64 = num.parse().map_err(|_| format!("{s:?}: a number must come before {c:?}"))?;
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(|| format!("{s:?}: too long"))?;
        num.clear();
    }
    if !num.is_empty() {
        return Err(format!("{s:?}: number without a unit at the end"));
    }
    Ok(Duration::from_secs(total))
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

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
            if crate::procs::alive_since(pid, created) {
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
        None if age > NAME_TMP_GRACE && !crate::procs::alive_since(pid, created) => {
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

struct Garbage {
    which: Which,
    /// tmp, uppers or names
    sub: &'static str,
    name: String,
    path: PathBuf,
    why: String,
    bytes: u64,
}

/// Chain IDs that imports still at work have claimed (`tmp/claim.*` of a
/// live process, in either store): kept by `gc` and `rm` with their
/// ancestors, so a layer an import found already stored stays until the
/// import has named its image.
fn claimed(inv: &Inventory, now: u64) -> Vec<Digest> {
    let me = store::hostname();
    let mut out = Vec::new();
    for (_, h) in &inv.dirs {
        for (name, path) in list_dir(h, "tmp").unwrap_or_default() {
            let Some((label, host, pid, created)) = crate::procs::split_host_pid_uniq(&name) else { continue };
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
fn work_in_progress_since(inv: &Inventory, now: u64) -> Option<u64> {
    let me = store::hostname();
    let mut since: Option<u64> = None;
    for (_, h) in &inv.dirs {
        for (name, path) in list_dir(h, "tmp").unwrap_or_default() {
            let Some((label, host, pid, created)) = crate::procs::split_host_pid_uniq(&name) else { continue };
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
fn stale_temporaries(which: Which, h: &DirHandle, users: &Users, now: u64, out: &mut Vec<Garbage>) {
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
        let bytes = du(&path);
        out.push(Garbage { which, sub, name, path, why, bytes });
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
        let what = match crate::procs::split_host_pid_uniq(&name) {
            Some((label, _, _, _)) if label == store::CLAIM_LABEL => "claim of an import or add",
            Some((label, _, _, _)) if label.ends_with(".deleting") => "layer being removed",
            _ => "staging",
        };
        let verdict = match crate::procs::split_host_pid_uniq(&name) {
            Some((_, host, pid, created)) => judge(Some(host), pid, created, age, &me, &held),
            None if age > OTHER_HOST_GRACE => Verdict::Stale(format!("unrecognised, {} old", human_age(age))),
            None => Verdict::Keep(format!("unrecognised, removed once {} old (now {})", human_age(OTHER_HOST_GRACE), human_age(age))),
        };
        consider("tmp", name, path, prefixed(what, verdict));
    }
    for (name, path) in list("uppers") {
        let Some(inner) = name.strip_prefix('.') else { continue };
        let Some((label, host, pid, created)) = crate::procs::split_host_pid_uniq(inner) else { continue };
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
    for (name, path) in list("names") {
        let Some(inner) = name.strip_prefix('.') else { continue };
        let Some((_, pid, created)) = crate::procs::split_pid_uniq(inner) else { continue };
        let verdict = judge(None, pid, created, age_of(&path, now), &me, &held);
        consider("names", name, path, prefixed("name record being written", verdict));
    }
}

pub fn gc(store: &Store, o: &GcOptions) -> Result<()> {
    let inv = Inventory::scan(store)?;
    // A missing fallback is the usual case; a missing root is worth a word.
    for (_, p, e) in store.missing().into_iter().filter(|(w, ..)| *w == Which::Root) {
        log::warn!("root store {}: {e}; collecting the fallback only", p.display());
    }
    let users = Users::scan();
    let now = store::now_secs();
    let min_age = o.min_age.as_secs();

    // Layers.
    let mut doomed: Vec<Digest> = Vec::new();
    if inv.incomplete {
        log::warn!("{}", inv.refuse_if_incomplete("gc: layers not collected").unwrap_err());
    } else {
        // Published since an add or import still at work began (a minute
        // of slack for clocks): that one may be about to name it.
        let busy_since = work_in_progress_since(&inv, now).map(|t| t.saturating_sub(60));
        let young = |id: &Digest| {
            inv.copies(id).any(|l| {
                let created = l.meta.as_ref().map(|m| m.created).unwrap_or(0).max(l.mtime);
                now.saturating_sub(created) < min_age || busy_since.is_some_and(|t| created >= t)
            })
        };
        // Why each kept layer stays (`gc -v` says it): the first reason found.
        let mut why: BTreeMap<Digest, String> = BTreeMap::new();
        for n in &inv.names {
            if let Ok(top) = &n.target {
                for id in inv.chain(top).0 {
                    why.entry(id).or_insert_with(|| format!("in the chain of image {} ({})", n.name, n.which));
                }
            }
        }
        let claims = claimed(&inv, now);
        for id in inv.closure(claims.iter().copied()) {
            why.entry(id).or_insert_with(|| "claimed by an import or add still at work".into());
        }
        for id in inv.ids().filter(|id| young(id)) {
            why.entry(*id).or_insert_with(|| {
                format!("published less than --min-age {} ago, or since an add or import still at work began", human_age(min_age))
            });
        }
        let roots = inv
            .names
            .iter()
            .filter_map(|n| n.target.as_ref().ok().copied())
            .chain(inv.ids().filter(|id| young(id)).copied())
            .chain(claims);
        let mut needed = inv.closure(roots);
        // What is in use stays with its ancestors (asked of the candidates
        // only: a lock query may cost a round trip to a file server).
        let busy: Vec<Digest> = inv
            .ids()
            .filter(|id| !needed.contains(id))
            .filter(|id| match users.in_use(&inv, id) {
                Some(w) => {
                    why.insert(**id, format!("it {w}"));
                    true
                }
                None => false,
            })
            .copied()
            .collect();
        needed.extend(inv.closure(busy));
        for id in &needed {
            match why.get(id) {
                Some(w) => log::info!("layer {id} kept: {w}"),
                None => log::info!("layer {id} kept: the parent of a layer that stays"),
            }
        }
        // A layer whose metadata cannot be read is left to `verify`.
        let unknown: BTreeSet<Digest> = inv.ids().filter(|id| inv.meta_of(id).is_none()).copied().collect();
        for id in &unknown {
            log::warn!("layer {id}: unreadable metadata, not collected (see sharedloop verify)");
        }
        doomed = children_first(&inv, inv.ids().filter(|id| !needed.contains(id) && !unknown.contains(id)).copied());
    }

    // Temporaries.
    let mut garbage = Vec::new();
    for (which, h) in &inv.dirs {
        stale_temporaries(*which, h, &users, now, &mut garbage);
    }

    let verb = if o.dry_run { "would remove" } else { "removed" };
    let mut count = 0;
    let mut freed = 0;
    if o.dry_run {
        for id in &doomed {
            for l in inv.copies(id) {
                let b = du(&l.path);
                println!("{verb} layer {id} ({}, {}): not referenced", l.which, human_size(b));
                count += 1;
                freed += b;
            }
        }
    } else if !doomed.is_empty() {
        let (n, b) = remove_layers(&inv, &doomed, &[], "unreferenced layers", true)?;
        count += n;
        freed += b;
    }
    let mut first_err = None;
    for g in garbage {
        if !o.dry_run
            && let Err(e) = remove_entry(inv.handle(g.which).expect("scanned"), g.sub, &g.name)
        {
            log::warn!("{e}");
            first_err.get_or_insert(e);
            continue;
        }
        println!("{verb} {} ({}, {}): {}", g.path.display(), g.which, human_size(g.bytes), g.why);
        count += 1;
        freed += g.bytes;
    }
    if count == 0 {
        println!("gc: nothing to remove");
    } else if o.dry_run {
        println!("gc: would remove {count} items, free {freed} bytes ({})", human_size(freed));
    } else {
        println!("gc: removed {count} items, freed {freed} bytes ({})", human_size(freed));
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

// -------------------------------------------------------------------- verify

pub struct VerifyOptions {
    /// Also run the filesystem's checker, read-only.
    pub deep: bool,
}

/// The filesystem checker, read-only. Ok(None): passed; Ok(Some(note)):
/// not run.
fn deep_check(path: &Path, fstype: FsType) -> std::result::Result<Option<String>, String> {
    let (tool, args): (&str, &[&str]) = match fstype {
        FsType::Ext4 => ("e2fsck", &["-fn"]),
        FsType::Xfs => ("xfs_repair", &["-n", "-f"]),
        FsType::Erofs => ("fsck.erofs", &[]),
    };
    let mut cmd = crate::command::Cmd::new(tool);
    let out = match cmd.args(args).arg(path).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(format!("deep check skipped: {tool} not found"))),
        Err(e) => return Err(format!("run {tool}: {e}")),
    };
    if out.status.success() {
        return Ok(None);
    }
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let tail: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let tail = tail[tail.len().saturating_sub(3)..].join(" / ");
    Err(format!("{tool} {} {}: {}: {tail}", args.join(" "), path.display(), out.status))
}

/// Everything wrong with one stored copy of a layer (empty: fine), and
/// notes that are not failures.
fn check_layer(inv: &Inventory, l: &StoredLayer, deep: bool) -> (Vec<String>, Vec<String>) {
    let mut fail = Vec::new();
    let mut notes = Vec::new();
    let meta = match &l.meta {
        Ok(m) => Some(m),
        Err(e) => {
            fail.push(e.clone());
            None
        }
    };
    let image = match &l.image {
        Ok(i) => Some(i),
        Err(e) => {
            fail.push(format!("image: {e}"));
            None
        }
    };
    let Some(meta) = meta else { return (fail, notes) };
    if let Some(p) = &meta.parent
        && inv.meta_of(p).is_none()
    {
        fail.push(if inv.has(p) {
            format!("parent {p} has unreadable metadata")
        } else {
            format!("parent {p} is missing from the store")
        });
    }
    let Some(image) = image else { return (fail, notes) };
    if image.size != meta.size {
        fail.push(format!("image is {} bytes, metadata says {}", image.size, meta.size));
    }
    let h = inv.handle(l.which).expect("scanned");
    let rel = format!("layers/{}/layer.img", l.id.hex());
    match openat_beneath(&h.fd, &h.path, &rel, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty()) {
        Ok(fd) => {
            if let Err(e) = crate::superblock::check(&fd, meta.fstype) {
                fail.push(e);
            }
        }
        Err(e) => fail.push(e.to_string()),
    }
    if deep && fail.is_empty() {
        match deep_check(&image.path, meta.fstype) {
            Ok(None) => {}
            Ok(Some(note)) => notes.push(note),
            Err(e) => fail.push(e),
        }
    }
    (fail, notes)
}

pub fn verify(store: &Store, refs: &[String], o: &VerifyOptions) -> Result<()> {
    let inv = Inventory::scan(store)?;
    // What to check: indices into inv.layers and inv.names, plus failures
    // found while selecting.
    // In the order asked for (chains top first), each once.
    let mut layers: Vec<usize> = Vec::new();
    let mut names: Vec<usize> = Vec::new();
    let mut failed = 0usize;
    let mut checked = 0usize;
    let mut report = |ok: bool, what: &str, why: &[String], notes: &[String]| {
        checked += 1;
        if ok {
            let n = if notes.is_empty() { String::new() } else { format!(" ({})", notes.join("; ")) };
            println!("OK    {what}{n}");
        } else {
            failed += 1;
            println!("FAIL  {what}: {}", why.join("; "));
        }
    };
    let add_chain = |top: &Digest, layers: &mut Vec<usize>| {
        let (mut ids, err) = inv.chain(top);
        // A layer with broken metadata ends the chain early: check it too.
        if err.is_some() {
            let next = match ids.last() {
                None => Some(*top),
                Some(l) => inv.meta_of(l).and_then(|m| m.parent),
            };
            ids.extend(next);
        }
        for i in ids.iter().flat_map(|id| inv.by_id.get(id).into_iter().flatten().copied()) {
            if !layers.contains(&i) {
                layers.push(i);
            }
        }
    };
    // The root store is the one checked; its absence (a shared store not
    // mounted on this node) is a failure even with a fallback present.
    for (_, p, e) in store.missing().into_iter().filter(|(w, ..)| *w == Which::Root) {
        report(false, &format!("store {}", p.display()), &[format!("cannot open it: {e}")], &[]);
    }
    if refs.is_empty() {
        layers.extend(0..inv.layers.len());
        names.extend(0..inv.names.len());
        for p in &inv.problems {
            report(false, &format!("{} ({})", p.path.display(), p.store), std::slice::from_ref(&p.error), &[]);
        }
    } else {
        for r in refs {
            match LayerRef::parse(r)? {
                LayerRef::Name(n) => {
                    let found: Vec<usize> = (0..inv.names.len()).filter(|&i| inv.names[i].name == n).collect();
                    if found.is_empty() {
                        report(false, &format!("image {n}"), &["no such name in the store".into()], &[]);
                    }
                    for i in found {
                        if let Ok(top) = &inv.names[i].target {
                            add_chain(top, &mut layers);
                        }
                        if !names.contains(&i) {
                            names.push(i);
                        }
                    }
                }
                id => match inv.resolve_id(&id) {
                    Ok(d) => add_chain(&d, &mut layers),
                    Err(e) => report(false, &format!("layer {id}"), &[e.to_string()], &[]),
                },
            }
        }
    }
    for i in layers {
        let l = &inv.layers[i];
        let (fail, notes) = check_layer(&inv, l, o.deep);
        report(fail.is_empty(), &format!("layer {} ({})", l.id, l.which), &fail, &notes);
    }
    for i in names {
        let n = &inv.names[i];
        let why: Vec<String> = match &n.target {
            Err(e) => vec![e.clone()],
            Ok(top) => inv.chain(top).1.into_iter().map(|e| format!("chain of {top} is broken: {e}")).collect(),
        };
        report(why.is_empty(), &format!("image {} ({})", n.name, n.which), &why, &[]);
    }
    println!("verify: {checked} checked, {failed} failed");
    if failed > 0 {
        return Err(Error::Store(format!("verify: {failed} of {checked} checks failed")));
    }
    Ok(())
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
    fn durations() {
        let ok: &[(&str, u64)] = &[("0", 0), ("0s", 0), ("90", 90), ("1h", 3600), ("1h30m", 5400), ("2d", 172800), ("1w", 604800)];
        for (s, want) in ok {
            assert_eq!(parse_duration(s), Ok(Duration::from_secs(*want)), "{s}");
        }
        for s in ["", "h", "1x", "1h30", "-1s"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }

    #[test]
    fn temporary_names() {
        assert_eq!(
            crate::procs::split_host_pid_uniq("layer-ab.node_1.1234.65f0a1b200000001"),
            Some(("layer-ab", "node_1", 1234, Some(0x65f0a1b2)))
        );
        assert_eq!(
            crate::procs::split_host_pid_uniq("ab.deleting.h.7.65f0a1b2000000ff"),
            Some(("ab.deleting", "h", 7, Some(0x65f0a1b2)))
        );
        assert_eq!(crate::procs::split_host_pid_uniq("x.h.notapid.65f0a1b200000001"), None);
        assert_eq!(crate::procs::split_host_pid_uniq("h.1.65f0a1b200000001"), None);
        assert_eq!(crate::procs::split_pid_uniq("debian:12.5.42.65f0a1b200000001"), Some(("debian:12.5", 42, Some(0x65f0a1b2))));
        assert_eq!(crate::procs::split_pid_uniq("a.1.xyz"), None);
    }

    #[test]
    fn sizes_and_tables() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(1023), "1023B");
        assert_eq!(human_size(1024), "1.0KiB");
        assert_eq!(human_size(4 << 20), "4.0MiB");
        assert_eq!(human_size(1536 << 20), "1.5GiB");
        let t = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()], vec!["q".into(), "".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\nq\n");
    }

    #[test]
    fn own_process_is_alive_and_old_enough() {
        let me = std::process::id();
        assert!(crate::procs::alive_since(me, Some(store::now_secs())));
        assert!(!crate::procs::alive_since(me, Some(store::now_secs() - 10 * crate::procs::PID_REUSE_SLACK)));
        assert!(!crate::procs::alive_since(u32::MAX, None));
    }
}
