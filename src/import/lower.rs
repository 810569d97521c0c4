//! The merged view of the layers below the one being imported, for the two
//! things a layer tar can take from below it: the content of a hardlink
//! target that is not in this layer's tar, and the metadata of a parent
//! directory the tar does not list.
//!
//! Design: the lower chain is already in the store (we import bottom-up and
//! publish each layer before the next), so it is mounted the way
//! mount.sharedloop mounts it, but never attached to any mount tree: each
//! layer is a detached read-only mount (loop device with AUTOCLEAR, or an
//! erofs image read straight from its file), and one detached read-only
//! overlay sits over them. All lookups are `openat2` relative to the
//! overlay's fd. Nothing appears in mountinfo and our own mount namespace
//! is unchanged. The overlay is made per layer that needs it; the layer
//! mounts under it are kept (`Mounts`) until the import ends, so a deep
//! image mounts each layer once. When the fds close — at the end, on an
//! error, or because we were killed — the kernel dissolves the mounts and
//! autoclear frees the loop devices. Nothing is mounted unless a layer
//! needs it (docker- and buildah-written layers list their parents and
//! rarely link below themselves).
//!
//! Keeping the unpacked trees of earlier layers instead would double the
//! staging space for the whole import and still miss layers that were
//! already in the store (those are skipped, never unpacked).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;
use rustix::mount::MountAttrFlags;

use crate::error::{Error, Result};
use crate::ids::Digest;
use crate::kernel::Version;
use crate::loopdev::{self, AttachOptions, LoopIndex};
use crate::mountapi::FsContext;
use crate::store::{FsType, Layer, Store};

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// Detached read-only mounts of layers, kept for the whole import: an
/// image whose layer tars never list parent directories (umoci writes
/// those) needs the view below every layer, and each layer is then mounted
/// once instead of once per layer above it. Only fds hold them: they go
/// with this value, or with the process.
#[derive(Default)]
pub struct Mounts {
    by_id: HashMap<Digest, OwnedFd>,
}

impl Mounts {
    /// Holding a mount per layer can take more fds than the usual soft
    /// limit of 1024 (up to 500 layers, plus the loop devices' while they
    /// are set up): raise it to the hard limit, as mount.sharedloop does.
    pub fn new() -> Mounts {
        crate::helper::raise_fd_limit();
        Mounts::default()
    }
}

/// The chain below the current layer; mounted on first use.
pub struct Lower<'a> {
    store: &'a Store,
    top: Option<Digest>,
    mounts: &'a mut Mounts,
    view: Option<View>,
}

struct View {
    /// The detached overlay (or, for a one-layer chain, the layer itself).
    root: OwnedFd,
    /// One layer alone is not an overlay: its whiteouts show as char 0/0.
    raw_layer: bool,
}

/// A looked-up lower entry.
pub struct Found {
    pub fd: OwnedFd,
    pub stat: Stat,
}

impl<'a> Lower<'a> {
    pub fn new(store: &'a Store, top: Option<Digest>, mounts: &'a mut Mounts) -> Lower<'a> {
        Lower { store, top, mounts, view: None }
    }

    /// Whether the view was mounted (for tests and debug output).
    pub fn was_mounted(&self) -> bool {
        self.view.is_some()
    }

    fn view(&mut self) -> Result<Option<&View>> {
        let Some(top) = self.top else { return Ok(None) };
        if self.view.is_none() {
            let t = std::time::Instant::now();
            let chain = self.store.chain(&top)?;
            let v = mount_chain(&chain, self.mounts).map_err(|e| e.context(&format!("mount lower layers of {top}")))?;
            log::debug!("lower view of {} layers (top {}) in {:?}", chain.len(), top.short(), t.elapsed());
            self.view = Some(v);
        }
        Ok(self.view.as_ref())
    }

    /// `rel` (a cleaned relative path, '/'-separated) in the merged lower
    /// view, not following a symlink at the end. None if absent. A symlink
    /// on the way is an error: tar entries are never resolved through one.
    pub fn lookup(&mut self, rel: &[u8]) -> Result<Option<Found>> {
        let Some(v) = self.view()? else { return Ok(None) };
        let raw_layer = v.raw_layer;
        let path = std::ffi::OsStr::from_bytes(rel);
        let fd = if rel.is_empty() {
            rustix::fs::openat2(&v.root, ".", OFlags::PATH | OFlags::CLOEXEC, Mode::empty(), RESOLVE)
        } else {
            rustix::fs::openat2(&v.root, path, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty(), RESOLVE)
        };
        let fd = match fd {
            Ok(fd) => fd,
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => return Ok(None),
            Err(Errno::LOOP) | Err(Errno::XDEV) => {
                return Err(Error::Store(format!(
                    "refusing to resolve {:?} through a symlink in the layers below",
                    String::from_utf8_lossy(rel)
                )));
            }
            Err(e) => return Err(Error::sys("look up in lower layers", String::from_utf8_lossy(rel).into_owned(), e)),
        };
        let stat = rustix::fs::fstat(&fd).map_err(|e| Error::sys("stat in lower layers", String::from_utf8_lossy(rel).into_owned(), e))?;
        let ft = rustix::fs::FileType::from_raw_mode(stat.st_mode);
        if raw_layer && ft == rustix::fs::FileType::CharacterDevice && stat.st_rdev == 0 {
            return Ok(None); // a whiteout, seen without an overlay
        }
        Ok(Some(Found { fd, stat }))
    }

    /// Open a found regular file or directory for reading (contents, xattrs).
    pub fn reopen(&self, f: &Found, rel: &[u8]) -> Result<OwnedFd> {
        let p = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f.fd));
        rustix::fs::open(p.as_str(), OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY, Mode::empty())
            .map_err(|e| Error::sys("open in lower layers", String::from_utf8_lossy(rel).into_owned(), e))
    }

    /// A symlink's target.
    pub fn readlink(&self, f: &Found, rel: &[u8]) -> Result<Vec<u8>> {
        rustix::fs::readlinkat(&f.fd, "", Vec::new())
            .map(|c| c.into_bytes())
            .map_err(|e| Error::sys("read symlink in lower layers", String::from_utf8_lossy(rel).into_owned(), e))
    }
}

fn layer_attrs() -> MountAttrFlags {
    MountAttrFlags::MOUNT_ATTR_RDONLY | MountAttrFlags::MOUNT_ATTR_NODEV | MountAttrFlags::MOUNT_ATTR_NOSUID
}

/// Detached mounts of `chain` (top first; reusing those in `mounts`) and
/// a detached overlay over them.
fn mount_chain(chain: &[Layer], mounts: &mut Mounts) -> Result<View> {
    let kernel = Version::running()?;
    if chain.len() > 1 && !kernel.has_layer_fds() {
        return Err(Error::Store(format!(
            "this layer refers to files of the layers below it (a hardlink or an unlisted parent directory); reading those needs overlayfs layers by file descriptor, Linux 6.13 or newer (running {kernel})"
        )));
    }
    if chain.iter().any(|l| !mounts.by_id.contains_key(&l.meta.chain_id)) {
        let idx = LoopIndex::scan();
        for l in chain {
            if let std::collections::hash_map::Entry::Vacant(e) = mounts.by_id.entry(l.meta.chain_id) {
                e.insert(mount_layer(l, &idx, kernel)?);
            }
        }
    }
    let mnt = |l: &Layer| mounts.by_id.get(&l.meta.chain_id).expect("mounted above");
    if chain.len() == 1 {
        let root = mnt(&chain[0]).try_clone().map_err(|e| Error::io("dup", &chain[0].image_path, &e))?;
        return Ok(View { root, raw_layer: true });
    }
    let ctx = FsContext::open("overlay", "lower layers overlay", Path::new("overlay"))?;
    ctx.set_string("source", "sharedloop-import")?;
    for l in chain {
        ctx.set_fd("lowerdir+", mnt(l)).map_err(|e| e.context(&format!("layer {}", l.meta.chain_id)))?;
    }
    ctx.set_flag("ro")?;
    ctx.create()?;
    let root = ctx.mount(layer_attrs() | MountAttrFlags::MOUNT_ATTR_NOEXEC)?;
    Ok(View { root, raw_layer: false })
}

fn mount_layer(l: &Layer, idx: &LoopIndex, kernel: Version) -> Result<OwnedFd> {
    let what = format!("layer {}", l.meta.chain_id);
    let fstype = l.meta.fstype.as_str();
    if l.meta.fstype == FsType::Erofs && kernel.has_erofs_file_backed() {
        let ctx = FsContext::open(fstype, &what, &l.image_path)?;
        let src = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&l.image));
        ctx.set_string("source", &src)?;
        ctx.set_flag("ro")?;
        ctx.create()?;
        return ctx.mount(layer_attrs());
    }
    let dev = match idx.find(&l.image, &l.image_path)? {
        Some(d) => d,
        None => {
            // The in-use mark mounts put on attached layers (see assemble).
            let _ = crate::sys::ofd_try_read_lock(&l.image);
            loopdev::attach(
            l.image.as_fd(),
            &l.image_path,
            AttachOptions { read_only: true, direct_io: true, configure: kernel.has_loop_configure() },
            )
            .map_err(|e| e.context(&what))?
        }
    };
    let ctx = FsContext::open(fstype, &what, dev.path())?;
    ctx.set_string("source", dev.path())?;
    ctx.set_flag("ro")?;
    ctx.create()?;
    ctx.mount(layer_attrs())
    // `dev` closes here; the mount holds the device, and autoclear frees
    // it when the mount goes.
}
