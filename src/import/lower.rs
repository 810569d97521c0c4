//! The merged view of the layers below the one being imported, for the two
//! things a layer tar can take from below it: the content of a hardlink
//! target that is not in this layer's tar, and the metadata of a parent
//! directory the tar does not list.
//!
//! Design: the lower chain is already in the store (we import bottom-up and
//! publish each layer before the next), so it is mounted by the very code
//! mount.sharedloop uses (`mount::Plan::view`), read-only and never left
//! in any mount tree: on kernels with layers as fds the layers and the
//! overlay are detached mounts; on older ones they are mounted in a
//! private scratch that is detached as soon as the overlay exists, so
//! only our fd holds the view. All lookups are relative to the overlay's
//! fd and never follow a symlink (`beneath`). The overlay is made per
//! layer that needs it; with layers as fds the layer mounts are kept
//! (`Mounts`) until the import ends, so a deep image mounts each layer
//! once. When the fds close — at the end, on an error, or because we were
//! killed — the kernel dissolves the mounts and autoclear frees the loop
//! devices. Nothing is mounted unless a layer needs it (docker- and
//! buildah-written layers list their parents and rarely link below
//! themselves).
//!
//! Keeping the unpacked trees of earlier layers instead would double the
//! staging space for the whole import and still miss layers that were
//! already in the store (those are skipped, never unpacked).

use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{Mode, OFlags, Stat};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::store::ids::Digest;
use crate::mount::{LayerCache, Plan};
use crate::store::Store;

/// Layer mounts kept for the whole import: an image whose layer tars
/// never list parent directories (umoci writes those) needs the view below
/// every layer, and each layer is then mounted once instead of once per
/// layer above it (where the kernel takes layers as fds; see
/// `mount::LayerCache`). Only fds hold them: they go with this value, or
/// with the process.
#[derive(Default)]
pub struct Mounts {
    cache: LayerCache,
}

impl Mounts {
    /// Holding a mount per layer can take more fds than the usual soft
    /// limit of 1024 (up to 500 layers, plus the loop devices' while they
    /// are set up): raise it to the hard limit, as mount.sharedloop does.
    pub fn new() -> Mounts {
        crate::cli::helper::raise_fd_limit();
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
    /// The overlay's root (an overlay even over one layer, so whiteouts
    /// are hidden as in any mount).
    root: OwnedFd,
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
            let n = chain.len();
            let root = Plan::view_of(self.store, chain)
                .and_then(|p| p.view(&self.mounts.cache))
                .map_err(|e| e.context(&format!("mount lower layers of {top}")))?;
            let v = View { root };
            log::debug!("lower view of {n} layers (top {}) in {:?}", top.short(), t.elapsed());
            self.view = Some(v);
        }
        Ok(self.view.as_ref())
    }

    /// `rel` (a cleaned relative path, '/'-separated) in the merged lower
    /// view, not following a symlink at the end. None if absent. A symlink
    /// on the way is an error: tar entries are never resolved through one.
    pub fn lookup(&mut self, rel: &[u8]) -> Result<Option<Found>> {
        let Some(v) = self.view()? else { return Ok(None) };
        let path = std::ffi::OsStr::from_bytes(rel);
        let fd = crate::kernel::beneath::open(&v.root, path, OFlags::PATH | OFlags::NOFOLLOW, Mode::empty(), crate::kernel::beneath::Mounts::Stay);
        let fd = match fd {
            Ok(fd) => fd,
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => return Ok(None),
            Err(Errno::LOOP) | Err(Errno::XDEV) => {
                return Err(Error::refused(
                    format!("to resolve {:?}", String::from_utf8_lossy(rel)),
                    "it goes through a symlink in the layers below",
                ));
            }
            Err(e) => return Err(Error::sys("look up in lower layers", String::from_utf8_lossy(rel).into_owned(), e)),
        };
        let stat = rustix::fs::fstat(&fd).map_err(|e| Error::sys("stat in lower layers", String::from_utf8_lossy(rel).into_owned(), e))?;
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
