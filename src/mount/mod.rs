//! Putting a chain together: layer mounts, the upper, one overlay mount.
//! The same code serves mount.sharedloop and the import's read-only view
//! of the layers below the one it unpacks.
//!
//! One skeleton (`Plan::build`): take the node's attach lock (which `rm`
//! and `gc` take too), check that every layer is still the file the store
//! holds, find or attach each layer's loop device and mount the layer (on
//! a pool of threads), release the lock, prepare the upper, create the
//! overlay. Then `run` records and attaches it at the target, or `view`
//! keeps it as a detached tree only an fd holds. Three ways of handing the
//! layers to overlayfs fill in the steps that differ (`Way`):
//! - fd (`fd.rs`, layers as file descriptors, 6.13+),
//! - path (`path.rs`, `lowerdir+` by path, 6.8+),
//! - legacy (`legacy.rs`, mount(2) only, any kernel).
//!
//! The way is chosen by probing the kernel (`kernel::Feature`), never by
//! its version; `mount_api=` asks for one, and is refused up front, naming
//! the missing feature, where the kernel cannot do it.

pub mod opts;
pub mod state;
pub mod utab;
mod fd;
mod legacy;
mod path;
pub(crate) mod scratch;
mod upper;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountAttrFlags, MountFlags, UnmountFlags};

pub use fd::LayerCache;
pub use legacy::{LEGACY_OPTS_MAX, legacy_data};

use crate::error::{Error, Result, StoreError};
use crate::interrupt::step;
use crate::kernel::Feature;
use crate::kernel::loopdev::{self, AttachOptions, LoopDevice, LoopIndex};
use crate::kernel::mountapi::{FsContext, attach_at, mount_id};
use crate::mount::opts::{Atime, Flags, MountApi, UpperSpec};
use crate::mount::state::{LayerRecord, LoopRecord, UpperRecord};
use crate::store::{FsType, Layer, Store};
use crate::upper::CreateOptions;
use upper::UpperReady;

/// Everything decided before anything is acquired.
pub struct Plan {
    pub source: String,
    pub target: PathBuf,
    pub layers: Vec<Layer>,
    pub upper: Option<UpperSpec>,
    pub upper_create: CreateOptions,
    pub api: MountApi,
    pub loop_configure: bool,
    pub direct_io: bool,
    pub overlay_opts: Vec<(String, Option<String>)>,
    pub flags: Flags,
    pub store: Store,
    pub state_dir: PathBuf,
    /// (device, backing file) pairs believed attached, as this node's
    /// mount records list them: looked at before any scan of the devices.
    pub loop_hints: Vec<(u32, PathBuf)>,
}

/// The way a mount is made: the one asked for if the kernel can do it
/// (else an error naming what it lacks), or for `auto` the best it can.
pub fn resolve_api(requested: MountApi) -> Result<MountApi> {
    match requested {
        MountApi::Auto if Feature::LayersAsFds.have() => Ok(MountApi::Fd),
        MountApi::Auto if Feature::LowerdirAdd.have() => Ok(MountApi::Path),
        MountApi::Auto => Ok(MountApi::Legacy),
        MountApi::Fd => Feature::LayersAsFds.require("mount_api=fd").map(|()| MountApi::Fd),
        MountApi::Path => Feature::LowerdirAdd.require("mount_api=path").map(|()| MountApi::Path),
        MountApi::Legacy => Ok(MountApi::Legacy),
    }
}

pub fn api_name(a: MountApi) -> &'static str {
    match a {
        MountApi::Auto => "auto",
        MountApi::Fd => "fd",
        MountApi::Path => "path",
        MountApi::Legacy => "legacy",
    }
}

/// An overlay attached at the target but not yet committed (state and
/// utab still to write): dropped, it is unmounted again.
pub struct Mounted {
    pub target: PathBuf,
    armed: bool,
}

impl Mounted {
    pub fn commit(mut self) {
        self.armed = false;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.armed {
            let _ = rustix::mount::unmount(&self.target, UnmountFlags::DETACH);
        }
    }
}

/// One layer made ready for overlayfs.
pub struct Ready {
    record: LayerRecord,
    /// fd and path ways: the layer's detached mount.
    mnt: Option<OwnedFd>,
    /// path and legacy ways: where it is mounted in the scratch.
    dir: Option<PathBuf>,
}

/// The overlay made, not yet visible to anyone.
enum Overlay {
    /// A detached mount (fd and path ways).
    Detached(OwnedFd),
    /// Mounted at this directory of the private scratch (legacy way).
    InScratch(PathBuf),
}

/// The steps in which the three ways differ; the rest is `Plan::build`.
trait Way: Sync {
    /// Layer `i` made ready, under the attach lock; `found` is its loop
    /// device if one is attached already.
    fn layer(&self, plan: &Plan, i: usize, layer: &Layer, found: Option<LoopDevice>) -> Result<Ready>;
    /// The upper, mounted where this way hands it over.
    fn upper(&self, plan: &Plan) -> Result<Option<UpperReady>>;
    /// The overlay over `layers` (and `upper`).
    fn overlay(&self, plan: &Plan, layers: &[Ready], upper: Option<&UpperReady>, read_only: bool) -> Result<Overlay>;
}

/// What `build` made; the way (its scratch) and the layer and upper
/// mounts are held until the overlay has its own references.
struct Built<'a> {
    overlay: Overlay,
    layers: Vec<LayerRecord>,
    upper: Option<UpperRecord>,
    way: Box<dyn Way + 'a>,
    _ready: Vec<Ready>,
    _upper: Option<UpperReady>,
}

pub struct Outcome<P> {
    pub mounted: Mounted,
    pub layers: Vec<LayerRecord>,
    pub upper: Option<UpperRecord>,
    /// The overlay's mount ID (the same before and after it is attached).
    pub mnt_id: u64,
    /// What `publish` returned (the caller's guards for its record and
    /// utab line, say).
    pub published: P,
}

fn loop_record(dev: &LoopDevice) -> LoopRecord {
    LoopRecord {
        number: dev.number,
        backing: dev.backing.clone(),
        reused: dev.reused,
    }
}

fn attrs_for_layer() -> MountAttrFlags {
    MountAttrFlags::MOUNT_ATTR_RDONLY | MountAttrFlags::MOUNT_ATTR_NODEV | MountAttrFlags::MOUNT_ATTR_NOSUID
}

/// Up to this many threads attach and mount new layers. A new layer's time
/// is mostly waiting (the flush of a direct-I/O attach, ext4 starting a
/// worker per superblock), so more threads than cores pay: on 2 cores a
/// first mount of 128 ext4 layers took 126 ms on 1 thread, 80 ms on 8 and
/// 66 ms on 16. Layers whose device is already attached are mounted on the
/// calling thread instead: that is cheap CPU work that threads only make
/// contend (1 thread 6 ms, 8 threads 9-11 ms for 128).
const LAYER_THREADS: usize = 16;

impl Plan {
    /// A plan for the read-only view of `layers` (top first) that the
    /// import reads lower files through: no upper, no target, mounted as
    /// mount.sharedloop would with this kernel's best way.
    pub fn view_of(store: &Store, layers: Vec<Layer>) -> Result<Plan> {
        Ok(Plan {
            source: "sharedloop-import".into(),
            target: PathBuf::from("(lower layers view)"),
            layers,
            upper: None,
            upper_create: CreateOptions {
                size: crate::mount::opts::DEFAULT_UPPER_SIZE,
                fstype: FsType::Ext4,
                mmp: Default::default(),
                alloc: Default::default(),
            },
            api: resolve_api(MountApi::Auto)?,
            loop_configure: Feature::LoopConfigure.have(),
            direct_io: true,
            overlay_opts: Vec::new(),
            flags: Flags { noexec: Some(true), nosuid: Some(true), nodev: Some(true), ..Flags::default() },
            store: store.clone(),
            state_dir: crate::mount::state::dir(),
            loop_hints: Vec::new(),
        })
    }

    fn way<'a>(&self, cache: Option<&'a LayerCache>) -> Result<Box<dyn Way + 'a>> {
        Ok(match self.api {
            MountApi::Fd | MountApi::Auto => Box::new(fd::FdWay { cache }),
            MountApi::Path => Box::new(path::PathWay { scratch: scratch::Scratch::new(&self.state_dir)? }),
            MountApi::Legacy => Box::new(legacy::LegacyWay { scratch: scratch::Scratch::new(&self.state_dir)? }),
        })
    }

    /// The skeleton every way shares.
    fn build<'a>(&self, cache: Option<&'a LayerCache>) -> Result<Built<'a>> {
        let t = std::time::Instant::now();
        let way = self.way(cache)?;
        let lock = AttachLock::take(&self.state_dir)?;
        self.still_stored()?;
        let idx = LoopIndex::with_hints(&self.loop_hints);
        log::debug!("lock and loop index: {:?}", t.elapsed());
        let ready = self.for_each_layer(&idx, |i, l, found| way.layer(self, i, l, found))?;
        drop(lock);
        log::debug!("layers ready: {:?}", t.elapsed());
        let upper = way.upper(self)?;
        log::debug!("upper ready: {:?}", t.elapsed());
        step("overlay", None)?;
        let overlay = way.overlay(self, &ready, upper.as_ref(), upper.is_none())?;
        log::debug!("overlay made: {:?}", t.elapsed());
        Ok(Built {
            overlay,
            layers: ready.iter().map(|r| r.record.clone()).collect(),
            upper: upper.as_ref().map(|u| u.record.clone()),
            way,
            _ready: ready,
            _upper: upper,
        })
    }

    /// Mount the chain. `publish` is called with the overlay's mount ID,
    /// the layers and the upper once the overlay exists but before it is
    /// attached at the target, so that whatever must find the mount later
    /// (its record, its utab line) is written before anyone can see it;
    /// if anything after fails, what `publish` returned is dropped.
    pub fn run<P>(&self, publish: impl FnOnce(u64, &[LayerRecord], Option<&UpperRecord>) -> Result<P>) -> Result<Outcome<P>> {
        let b = self.build(None)?;
        let mnt_id = match &b.overlay {
            Overlay::Detached(mnt) => mount_id(mnt, &self.target)?,
            Overlay::InScratch(dir) => mount_id(&open_root(dir)?, &self.target)?,
        };
        let published = publish(mnt_id, &b.layers, b.upper.as_ref())?;
        step("attach", None)?;
        match &b.overlay {
            Overlay::Detached(mnt) => attach_at(mnt, &self.target)?,
            Overlay::InScratch(dir) => rustix::mount::mount_move(dir, &self.target)
                .map_err(|e| Error::sys("move overlay onto the mount point", &self.target, e))?,
        }
        let mounted = Mounted { target: self.target.clone(), armed: true };
        let Built { layers, upper, way, _ready, _upper, overlay } = b;
        // The overlay (a detached mount's fd) first: it holds every layer,
        // and releasing it before the layers' fds makes their close cheap.
        drop(overlay);
        drop(_ready);
        drop(_upper);
        drop(way);
        Ok(Outcome { mounted, layers, upper, mnt_id, published })
    }

    /// The chain as a read-only overlay that only the returned fd holds:
    /// in no mount tree (the scratch, if the way used one, is detached),
    /// gone with the fd, and with it the layers' loop devices (autoclear).
    /// `cache` keeps layer mounts across views where the way allows it.
    pub fn view(&self, cache: &LayerCache) -> Result<OwnedFd> {
        let b = self.build(Some(cache))?;
        let root = match &b.overlay {
            Overlay::Detached(mnt) => mnt.try_clone().map_err(|e| Error::io("dup", "(lower layers view)", &e))?,
            Overlay::InScratch(dir) => open_root(dir)?,
        };
        drop(b);
        Ok(root)
    }

    /// `f` for every layer, results in layer order. Layers with a device
    /// found in `idx` go first, one by one; the rest on a pool of threads.
    /// On a failure the others stop taking new layers, what was done is
    /// dropped (and so undone), and the error of the lowest failing index
    /// is returned.
    fn for_each_layer<T: Send>(
        &self,
        idx: &LoopIndex,
        f: impl Fn(usize, &Layer, Option<LoopDevice>) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        let n = self.layers.len();
        let slots: Vec<Mutex<Option<Result<T>>>> = (0..n).map(|_| Mutex::new(None)).collect();
        let put = |i: usize, r: Result<T>| *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        let mut pending = Vec::new();
        let mut failed = false;
        for (i, l) in self.layers.iter().enumerate() {
            let found = idx.find(&l.image, &l.image_path)?;
            match found {
                Some(dev) => {
                    let r = f(i, l, Some(dev));
                    failed = r.is_err();
                    put(i, r);
                    if failed {
                        break;
                    }
                }
                None => pending.push(i),
            }
        }
        if !failed && !pending.is_empty() {
            let next = AtomicUsize::new(0);
            let stop = AtomicBool::new(false);
            let workers = LAYER_THREADS.min(pending.len());
            let work = || {
                while !stop.load(Ordering::SeqCst) {
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&i) = pending.get(k) else { break };
                    let r = f(i, &self.layers[i], None);
                    if r.is_err() {
                        stop.store(true, Ordering::SeqCst);
                    }
                    put(i, r);
                }
            };
            if workers == 1 {
                work();
            } else {
                std::thread::scope(|sc| {
                    for _ in 0..workers {
                        sc.spawn(work);
                    }
                });
            }
        }
        let mut out = Vec::with_capacity(n);
        let mut first_err = None;
        for slot in slots {
            match slot.into_inner().unwrap_or_else(|p| p.into_inner()) {
                Some(Ok(v)) => out.push(v),
                Some(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                None => {}
            }
        }
        match first_err {
            Some(e) => Err(e),
            None if out.len() == n => Ok(out),
            None => Err(Error::Internal("layer setup stopped without an error".into())),
        }
    }

    /// Under the attach lock (which `rm` and `gc` take too): is every
    /// layer still in the store as the file we opened? A layer retired
    /// between our open and the lock must not be mounted from its unlinked
    /// file, which the store no longer lists.
    fn still_stored(&self) -> Result<()> {
        for l in &self.layers {
            let opened = rustix::fs::fstat(&l.image).map_err(|e| Error::sys("stat", &l.image_path, e))?;
            let same = std::fs::symlink_metadata(&l.image_path).is_ok_and(|m| {
                std::os::unix::fs::MetadataExt::ino(&m) == opened.st_ino && std::os::unix::fs::MetadataExt::dev(&m) == opened.st_dev
            });
            if !same {
                return Err(Error::Store(StoreError::Vanished {
                    what: format!("layer {}: removed from the store while this mount was being set up (rm or gc?)", l.meta.chain_id),
                    source: Box::new(Error::sys("stat", &l.image_path, rustix::io::Errno::NOENT)),
                }));
            }
        }
        Ok(())
    }

    /// The layer's loop device: the one found already attached, or a new one.
    fn layer_loop(&self, found: Option<LoopDevice>, layer: &Layer, i: usize) -> Result<LoopDevice> {
        step("layer-attach", Some(i))?;
        if let Some(dev) = found {
            log::trace!("layer {}: reusing /dev/loop{}", layer.meta.chain_id.short(), dev.number);
            return Ok(dev);
        }
        // A read lock on the description the device will hold marks the
        // layer in use for `rm`/`gc`, here and on other nodes, exactly as
        // long as the device is attached. Best effort: a store without
        // locking (ENOLCK) still mounts.
        if let Err(e) = crate::kernel::sys::ofd_try_read_lock(&layer.image) {
            log::debug!("layer {}: no in-use lock: {}", layer.meta.chain_id.short(), crate::error::Errno(e));
        }
        let dev = loopdev::attach(
            &layer.image,
            &layer.image_path,
            AttachOptions { read_only: true, direct_io: self.direct_io, configure: self.loop_configure },
        )
        .map_err(|e| e.context(&format!("layer {}", layer.meta.chain_id)))?;
        log::trace!("layer {}: attached /dev/loop{}", layer.meta.chain_id.short(), dev.number);
        Ok(dev)
    }

    fn layer_record(&self, layer: &Layer, dev: Option<&LoopDevice>) -> LayerRecord {
        LayerRecord {
            chain_id: layer.meta.chain_id,
            image: layer.image_path.clone(),
            store: layer.which,
            fstype: layer.meta.fstype.as_str().to_string(),
            loop_dev: dev.map(loop_record),
        }
    }

    /// Layer `i` as a detached read-only mount (fd and path ways).
    fn layer_detached(&self, found: Option<LoopDevice>, layer: &Layer, i: usize) -> Result<Ready> {
        let what = format!("layer {}", layer.meta.chain_id);
        let fstype = layer.meta.fstype.as_str();
        // Every format on a loop device, erofs too although 6.12+ could
        // mount it from the file: a file-backed erofs mount gets a
        // superblock (and so a page cache) of its own on every mount, while
        // one device gives one superblock per layer per node, whatever
        // number of mounts use it.
        let dev = self.layer_loop(found, layer, i)?;
        let ctx = FsContext::open(fstype, &what, dev.path())?;
        ctx.set_string("source", dev.path())?;
        let dev = Some(dev);
        step("layer-mount", Some(i))?;
        ctx.set_flag("ro")?;
        ctx.create().map_err(|e| explain_refusal(layer, e))?;
        let mnt = ctx.mount(attrs_for_layer())?;
        Ok(Ready { record: self.layer_record(layer, dev.as_ref()), mnt: Some(mnt), dir: None })
        // `dev` closes here: the mount now holds the device.
    }

    /// overlayfs wants two lowers when there is no upper: a one-layer
    /// read-only image gets an empty one below it.
    fn needs_empty_lower(&self, has_upper: bool) -> bool {
        !has_upper && self.layers.len() == 1
    }

    /// The overlay's fs_context with the options every new-API way sets.
    fn overlay_ctx(&self) -> Result<FsContext> {
        let ctx = FsContext::open("overlay", "overlay", &self.target)?;
        ctx.set_string("source", &self.source)?;
        for (k, v) in &self.overlay_opts {
            match v {
                Some(v) => ctx.set_string(k, v)?,
                None => ctx.set_flag(k)?,
            }
        }
        for (on, key) in [
            (self.flags.sync == Some(true), "sync"),
            (self.flags.dirsync == Some(true), "dirsync"),
            (self.flags.lazytime == Some(true), "lazytime"),
        ] {
            if on {
                ctx.set_flag(key)?;
            }
        }
        Ok(ctx)
    }

    /// Create the overlay from `ctx` as a detached mount.
    fn create_overlay(&self, ctx: &FsContext, read_only: bool) -> Result<OwnedFd> {
        if read_only {
            ctx.set_flag("ro")?;
        }
        ctx.create()?;
        ctx.mount(mount_attrs(&self.flags, read_only))
    }
}

fn open_root(dir: &Path) -> Result<OwnedFd> {
    rustix::fs::open(dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).map_err(|e| Error::sys("open overlay", dir, e))
}

/// Serialises "find or attach, then mount" of layers on this node, so
/// that concurrent mounts of one chain find each other's devices instead
/// of all attaching their own. Held until every layer is mounted (and so
/// visible to the next holder's scan); an flock, so it dies with us.
pub struct AttachLock(#[allow(dead_code)] OwnedFd);

impl AttachLock {
    pub fn take(state_dir: &Path) -> Result<AttachLock> {
        crate::store::mkdir_p(state_dir)?;
        let p = state_dir.join("attach.lock");
        let fd = rustix::fs::open(
            &p,
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CREATE | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .map_err(|e| Error::sys("open lock", &p, e))?;
        loop {
            match rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(AttachLock(fd)),
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    // Poll so a signal can still interrupt us.
                    step("layer-attach", None)?;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => return Err(Error::sys("lock", &p, e)),
            }
        }
    }
}

fn mount_attrs(f: &Flags, read_only: bool) -> MountAttrFlags {
    let mut a = MountAttrFlags::empty();
    let on = |o: Option<bool>| o == Some(true);
    if read_only || on(f.ro) {
        a |= MountAttrFlags::MOUNT_ATTR_RDONLY;
    }
    if on(f.nosuid) {
        a |= MountAttrFlags::MOUNT_ATTR_NOSUID;
    }
    if on(f.nodev) {
        a |= MountAttrFlags::MOUNT_ATTR_NODEV;
    }
    if on(f.noexec) {
        a |= MountAttrFlags::MOUNT_ATTR_NOEXEC;
    }
    if on(f.nosymfollow) {
        a |= MountAttrFlags::MOUNT_ATTR_NOSYMFOLLOW;
    }
    if on(f.nodiratime) {
        a |= MountAttrFlags::MOUNT_ATTR_NODIRATIME;
    }
    match f.atime {
        Some(Atime::Noatime) => a |= MountAttrFlags::MOUNT_ATTR_NOATIME,
        Some(Atime::Strictatime) => a |= MountAttrFlags::MOUNT_ATTR_STRICTATIME,
        Some(Atime::Relatime) | None => a |= MountAttrFlags::MOUNT_ATTR_RELATIME,
    }
    a
}

fn legacy_flags(f: &Flags) -> MountFlags {
    let mut m = MountFlags::empty();
    let on = |o: Option<bool>| o == Some(true);
    for (set, flag) in [
        (on(f.ro), MountFlags::RDONLY),
        (on(f.nosuid), MountFlags::NOSUID),
        (on(f.nodev), MountFlags::NODEV),
        (on(f.noexec), MountFlags::NOEXEC),
        (on(f.nosymfollow), MountFlags::NOSYMFOLLOW),
        (on(f.nodiratime), MountFlags::NODIRATIME),
        (on(f.sync), MountFlags::SYNCHRONOUS),
        (on(f.dirsync), MountFlags::DIRSYNC),
        (on(f.lazytime), MountFlags::LAZYTIME),
    ] {
        if set {
            m |= flag;
        }
    }
    match f.atime {
        Some(Atime::Noatime) => m |= MountFlags::NOATIME,
        Some(Atime::Strictatime) => m |= MountFlags::STRICTATIME,
        _ => {}
    }
    m
}

/// A layer mount the kernel refused, with the reason when it is that the
/// image is not the filesystem its metadata says (an erofs image in an
/// ext4 layer's place): the kernel only says EINVAL. The superblock is
/// read only here, after a failure.
fn explain_refusal(layer: &Layer, e: Error) -> Error {
    match crate::image::superblock::check(&layer.image, layer.meta.fstype) {
        Ok(()) => e,
        Err(why) => Error::Store(StoreError::WrongFormat {
            path: layer.image_path.clone(),
            found: why,
            expected: layer.meta.fstype.to_string(),
            source: Box::new(e),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `auto` is the best way the probes found; an explicit way the kernel
    /// lacks is refused naming the feature (this kernel has all three).
    #[test]
    fn api_by_probe() {
        let want = if Feature::LayersAsFds.have() {
            MountApi::Fd
        } else if Feature::LowerdirAdd.have() {
            MountApi::Path
        } else {
            MountApi::Legacy
        };
        assert_eq!(resolve_api(MountApi::Auto).unwrap(), want);
        assert_eq!(resolve_api(MountApi::Legacy).unwrap(), MountApi::Legacy);
        for (api, f) in [(MountApi::Fd, Feature::LayersAsFds), (MountApi::Path, Feature::LowerdirAdd)] {
            match resolve_api(api) {
                Ok(a) => assert!(f.have() && a == api),
                Err(e) => assert!(!f.have() && e.to_string().contains("needs"), "{e}"),
            }
        }
    }
}
