//! Taking names and layers out of the store, for `rm` and `gc`.
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
//! Everything is removed through store directory fds
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, `unlinkat`): a symlink planted
//! in a shared store is refused or removed as a link, never followed.

use std::os::fd::OwnedFd;

use rustix::fs::{AtFlags, Mode, OFlags};
use serde::Serialize;

use super::inventory::{Inventory, StoredLayer, StoredName};
use super::usage::Usage;
use super::users::Users;
use crate::error::{Error, Result};
use crate::store::ids::Digest;
use crate::mount::state;
use crate::store::{self, DirHandle, Which, openat_beneath};

/// The node's attach lock (the one mount.sharedloop holds while it finds
/// or attaches layer devices): held, no mount on this node attaches a
/// layer. Best effort: without a state directory we go on unlocked.
struct NodeLock(#[allow(dead_code)] Option<crate::mount::AttachLock>);

fn node_lock() -> NodeLock {
    match crate::mount::AttachLock::take(&state::dir()) {
        Ok(l) => NodeLock(Some(l)),
        Err(e) => {
            log::warn!("{e}; going on without the attach lock");
            NodeLock(None)
        }
    }
}

/// A name record removed (or, with `--dry-run`, that would be).
#[derive(Debug, Serialize)]
pub struct RemovedName {
    pub name: String,
    pub store: Which,
}

/// A layer copy removed (or that would be), with what it occupied: the
/// inventory's figure, the one `ls` shows.
#[derive(Debug, Serialize)]
pub struct RemovedLayer {
    pub chain_id: Digest,
    pub store: Which,
    #[serde(flatten)]
    pub usage: Usage,
}

impl RemovedLayer {
    pub(super) fn of(l: &StoredLayer) -> RemovedLayer {
        let usage = l.usage.clone().unwrap_or_else(|e| {
            log::warn!("layer {} ({}): size not known: {e}", l.id, l.which);
            Usage::default()
        });
        RemovedLayer { chain_id: l.id, store: l.which, usage }
    }
}

/// What `remove_layers` took out, in order.
#[derive(Debug, Default)]
pub(super) struct Removed {
    pub(super) names: Vec<RemovedName>,
    pub(super) layers: Vec<RemovedLayer>,
}

impl Removed {
    pub(super) fn is_empty(&self) -> bool {
        self.names.is_empty() && self.layers.is_empty()
    }
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
pub(super) fn remove_entry(h: &DirHandle, sub: &str, name: &str) -> Result<()> {
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

pub(super) fn remove_name(h: &DirHandle, n: &StoredName) -> Result<()> {
    let names = open_subdir(h, "names")?;
    match rustix::fs::unlinkat(&names, n.name.file_name(), AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(Error::sys(format!("name {}: remove", n.name), &n.path, e)),
    }
    // Its image config record goes with it; the config itself is gc's.
    store::configs::forget_config_name(&h.path, &n.name)
}

/// Remove name records, then layers (children before parents), under the
/// node lock, checking again under it what is in use: `rm` then refuses
/// (`skip_busy` false), `gc` keeps those layers and their ancestors.
/// What was removed goes into `out`, also when an error stops it midway.
pub(super) fn remove_layers(
    inv: &Inventory,
    doomed: &[Digest],
    names: &[&StoredName],
    what: &str,
    skip_busy: bool,
    out: &mut Removed,
) -> Result<()> {
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
        out.names.push(RemovedName { name: n.name.to_string(), store: n.which });
    }
    let mut retired = Vec::new();
    let mut err = None;
    'outer: for id in &doomed {
        for l in inv.copies(id) {
            let h = inv.handle(l.which).ok_or_else(|| Error::Internal("store directory vanished".into()))?;
            match retire_layer(h, id) {
                Ok(Some(p)) => retired.push((l, p)),
                Ok(None) => {}
                Err(e) => {
                    err = Some(e);
                    break 'outer;
                }
            }
        }
    }
    drop(lock);
    for (l, p) in retired {
        let h = inv.handle(l.which).expect("scanned");
        remove_entry(h, "tmp", &p)?;
        out.layers.push(RemovedLayer::of(l));
    }
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Layers ordered children first: deeper chains first.
pub(super) fn children_first(inv: &Inventory, ids: impl IntoIterator<Item = Digest>) -> Vec<Digest> {
    let mut v: Vec<(usize, Digest)> = ids.into_iter().map(|id| (inv.chain(&id).0.len(), id)).collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    v.into_iter().map(|(_, id)| id).collect()
}
