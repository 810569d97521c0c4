//! Putting a chain together: layer mounts, the upper, one overlay mount.
//!
//! Three ways to hand the layers to overlayfs, chosen by kernel version
//! (or `mount_api=` for tests and odd kernels):
//! - fd (6.13+): each layer is a detached mount, passed by fd as
//!   `lowerdir+`. Nothing but the overlay ever appears in mountinfo.
//! - path (6.8+): layers are mounted in a private tmpfs under the state
//!   directory and passed by path as `lowerdir+`; the tmpfs is detached
//!   right after, overlayfs keeps its own references.
//! - legacy (any): mount(2) with `lowerdir=0:1:2...` relative to that tmpfs
//!   (as docker's overlay2 shortens its paths), refused before the call if
//!   the option string would not fit in a page: mount(2) would cut it short
//!   silently and mount fewer layers.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rustix::mount::{MountAttrFlags, MountFlags, UnmountFlags};

use crate::error::{Error, Result};
use crate::interrupt::step;
use crate::kernel::Version;
use crate::loopdev::{self, AttachOptions, LoopDevice, LoopIndex};
use crate::mountapi::{FsContext, attach_at, mount_id};
use crate::opts::{Atime, Flags, MountApi, UpperSpec};
use crate::state::{LayerRecord, LoopRecord, UpperRecord};
use crate::store::{FsType, Layer, Store, unique_suffix};
use crate::upper::{self, CreateOptions};

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
    pub erofs_from_file: bool,
    pub overlay_opts: Vec<(String, Option<String>)>,
    pub flags: Flags,
    pub store: Store,
    pub state_dir: PathBuf,
}

/// Page size minus the NUL: mount(2) copies at most one page of options.
pub const LEGACY_OPTS_MAX: usize = 4095;

pub fn resolve_api(requested: MountApi, k: Version) -> MountApi {
    match requested {
        MountApi::Auto if k.has_layer_fds() => MountApi::Fd,
        MountApi::Auto if k.has_lowerdir_add() => MountApi::Path,
        MountApi::Auto => MountApi::Legacy,
        other => other,
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

/// A private tmpfs holding layer mounts for the path and legacy ways;
/// dropping it detaches the whole subtree and removes the directory.
struct Scratch {
    path: PathBuf,
    mounted: bool,
}

impl Scratch {
    fn new(state_dir: &Path) -> Result<Scratch> {
        let parent = state_dir.join("scratch");
        crate::store::mkdir_p(&parent)?;
        let me = std::process::id();
        let path = parent.join(format!("{me}-{}-{}", crate::procs::start_time(me).unwrap_or(0), unique_suffix()));
        std::fs::create_dir(&path).map_err(|e| Error::io("create scratch directory", &path, &e))?;
        let mut s = Scratch { path, mounted: false };
        rustix::mount::mount("sharedloop", &s.path, "tmpfs", MountFlags::NOSUID | MountFlags::NODEV, c"mode=0700,size=64k")
            .map_err(|e| Error::sys("mount scratch tmpfs", &s.path, e))?;
        s.mounted = true;
        // Private: layer mounts made below must not propagate to peers.
        rustix::mount::mount_change(&s.path, rustix::mount::MountPropagationFlags::PRIVATE)
            .map_err(|e| Error::sys("make scratch private", &s.path, e))?;
        Ok(s)
    }

    fn sub(&self, name: &str) -> Result<PathBuf> {
        let p = self.path.join(name);
        std::fs::create_dir(&p).map_err(|e| Error::io("create scratch directory", &p, &e))?;
        Ok(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.mounted {
            let _ = rustix::mount::unmount(&self.path, UnmountFlags::DETACH);
        }
        let _ = std::fs::remove_dir(&self.path);
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
struct LayerReady {
    record: LayerRecord,
    /// fd and path ways: the layer's detached mount.
    mnt: Option<OwnedFd>,
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
        backing: loopdev::backing_file(dev.number).unwrap_or_default(),
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
            let found = if self.uses_loop(l) { idx.find(&l.image, &l.image_path)? } else { None };
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
                return Err(Error::Store(format!(
                    "layer {}: removed from the store while this mount was being set up (rm or gc?): {}",
                    l.meta.chain_id,
                    l.image_path.display()
                )));
            }
        }
        Ok(())
    }

    fn uses_loop(&self, l: &Layer) -> bool {
        !(l.meta.fstype == FsType::Erofs && self.erofs_from_file && self.api != MountApi::Legacy)
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
        if let Err(e) = crate::sys::ofd_try_read_lock(&layer.image) {
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

    /// Layer `i` as a detached read-only mount (fd and path ways).
    fn layer_detached(&self, found: Option<LoopDevice>, layer: &Layer, i: usize) -> Result<LayerReady> {
        let what = format!("layer {}", layer.meta.chain_id);
        let fstype = layer.meta.fstype.as_str();
        let (ctx, dev) = if !self.uses_loop(layer) {
            // erofs reads the image file itself (6.12+): no loop device.
            step("layer-attach", Some(i))?;
            let src = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&layer.image));
            let ctx = FsContext::open(fstype, &what, &layer.image_path)?;
            ctx.set_string("source", &src)?;
            (ctx, None)
        } else {
            let dev = self.layer_loop(found, layer, i)?;
            let ctx = FsContext::open(fstype, &what, dev.path())?;
            ctx.set_string("source", dev.path())?;
            (ctx, Some(dev))
        };
        step("layer-mount", Some(i))?;
        ctx.set_flag("ro")?;
        ctx.create().map_err(|e| explain_refusal(layer, e))?;
        let mnt = ctx.mount(attrs_for_layer())?;
        Ok(LayerReady {
            record: LayerRecord {
                chain_id: layer.meta.chain_id,
                image: layer.image_path.clone(),
                store: layer.which,
                fstype: fstype.to_string(),
                loop_dev: dev.as_ref().map(loop_record),
            },
            mnt: Some(mnt),
        })
        // `dev` closes here: the mount now holds the device.
    }

    /// Layer `i` mounted with mount(2) at `dir` (legacy way).
    fn layer_legacy(&self, found: Option<LoopDevice>, layer: &Layer, i: usize, dir: &Path) -> Result<LayerReady> {
        let dev = self.layer_loop(found, layer, i)?;
        step("layer-mount", Some(i))?;
        rustix::mount::mount(
            dev.path(),
            dir,
            layer.meta.fstype.as_str(),
            MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID,
            c"",
        )
        .map_err(|e| Error::sys(format!("layer {}: mount {}", layer.meta.chain_id, layer.meta.fstype), dev.path(), e))
        .map_err(|e| explain_refusal(layer, e))?;
        Ok(LayerReady {
            record: LayerRecord {
                chain_id: layer.meta.chain_id,
                image: layer.image_path.clone(),
                store: layer.which,
                fstype: layer.meta.fstype.as_str().to_string(),
                loop_dev: Some(loop_record(&dev)),
            },
            mnt: None,
        })
    }

    /// Mount the chain. `publish` is called with the overlay's mount ID,
    /// the layers and the upper once the overlay exists but before it is
    /// attached at the target, so that whatever must find the mount later
    /// (its record, its utab line) is written before anyone can see it;
    /// if anything after fails, what `publish` returned is dropped.
    pub fn run<P>(&self, publish: impl FnOnce(u64, &[LayerRecord], Option<&UpperRecord>) -> Result<P>) -> Result<Outcome<P>> {
        match self.api {
            MountApi::Fd | MountApi::Auto => self.run_fd(publish),
            MountApi::Path => self.run_path(publish),
            MountApi::Legacy => self.run_legacy(publish),
        }
    }

    fn run_fd<P>(&self, publish: impl FnOnce(u64, &[LayerRecord], Option<&UpperRecord>) -> Result<P>) -> Result<Outcome<P>> {
        let t = std::time::Instant::now();
        let lock = AttachLock::take(&self.state_dir)?;
        self.still_stored()?;
        let idx = LoopIndex::scan();
        log::debug!("lock and loop index: {:?}", t.elapsed());
        let ready = self.for_each_layer(&idx, |i, l, found| self.layer_detached(found, l, i))?;
        drop(lock);
        log::debug!("layers ready: {:?}", t.elapsed());
        let upper = self.prepare_upper()?;
        log::debug!("upper ready: {:?}", t.elapsed());
        step("overlay", None)?;
        let ctx = self.overlay_ctx()?;
        for (r, l) in ready.iter().zip(&self.layers) {
            ctx.set_fd("lowerdir+", r.mnt.as_ref().expect("detached"))
                .map_err(|e| e.context(&format!("layer {}", l.meta.chain_id)))?;
        }
        // Must outlive create(): closing a detached mount's last fd dissolves it.
        let empty = if self.needs_empty_lower(upper.is_some()) { Some(empty_lower()?) } else { None };
        if let Some(e) = &empty {
            ctx.set_fd("lowerdir+", e)?;
        }
        if let Some(u) = &upper {
            ctx.set_fd("upperdir", &u.upper_dir)?;
            ctx.set_fd("workdir", &u.work_dir)?;
        }
        let records: Vec<_> = ready.iter().map(|r| r.record.clone()).collect();
        let upper_rec = upper.as_ref().map(|u| u.record.clone());
        let (mounted, mnt_id, published) = self.finish_overlay(&ctx, upper.is_none(), &records, upper_rec.as_ref(), publish)?;
        log::debug!("overlay mounted: {:?}", t.elapsed());
        // The context first: it holds a reference to every layer mount, and
        // releasing those before our fds makes the fds' close cheaper
        // (measured 1 ms instead of 4-5 for 128 layers).
        drop(ctx);
        drop(ready);
        log::debug!("layer mounts released: {:?}", t.elapsed());
        Ok(Outcome { mounted, layers: records, upper: upper_rec, mnt_id, published })
    }

    fn run_path<P>(&self, publish: impl FnOnce(u64, &[LayerRecord], Option<&UpperRecord>) -> Result<P>) -> Result<Outcome<P>> {
        let scratch = Scratch::new(&self.state_dir)?;
        let lock = AttachLock::take(&self.state_dir)?;
        self.still_stored()?;
        let idx = LoopIndex::scan();
        let pairs = self.for_each_layer(&idx, |i, l, found| {
            let r = self.layer_detached(found, l, i)?;
            let d = scratch.sub(&i.to_string())?;
            attach_at(r.mnt.as_ref().expect("detached"), &d)?;
            Ok((r, d))
        })?;
        drop(lock);
        let (ready, mut dirs): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
        let upper = self.prepare_upper()?;
        if self.needs_empty_lower(upper.is_some()) {
            dirs.push(scratch.sub("empty")?);
        }
        step("overlay", None)?;
        let ctx = self.overlay_ctx()?;
        for d in &dirs {
            ctx.set_string("lowerdir+", d)?;
        }
        if let Some(u) = &upper {
            let ud = scratch.sub("u")?;
            attach_at(&u.mnt, &ud)?;
            ctx.set_string("upperdir", ud.join("upper"))?;
            ctx.set_string("workdir", ud.join("work"))?;
        }
        let records: Vec<_> = ready.into_iter().map(|r| r.record).collect();
        let upper_rec = upper.as_ref().map(|u| u.record.clone());
        let (mounted, mnt_id, published) = self.finish_overlay(&ctx, upper.is_none(), &records, upper_rec.as_ref(), publish)?;
        drop(scratch);
        Ok(Outcome { mounted, layers: records, upper: upper_rec, mnt_id, published })
    }

    fn run_legacy<P>(&self, publish: impl FnOnce(u64, &[LayerRecord], Option<&UpperRecord>) -> Result<P>) -> Result<Outcome<P>> {
        let scratch = Scratch::new(&self.state_dir)?;
        let lock = AttachLock::take(&self.state_dir)?;
        self.still_stored()?;
        let idx = LoopIndex::scan();
        let ready = self.for_each_layer(&idx, |i, l, found| {
            let d = scratch.sub(&i.to_string())?;
            self.layer_legacy(found, l, i, &d)
        })?;
        drop(lock);
        let upper = self.prepare_upper()?;
        let mut lowers = self.layers.len();
        if self.needs_empty_lower(upper.is_some()) {
            // Named like the layers so the option string stays 0:1:...:N.
            scratch.sub(&lowers.to_string())?;
            lowers += 1;
        }
        step("overlay", None)?;
        if let Some(u) = &upper {
            let ud = scratch.sub("u")?;
            attach_at(&u.mnt, &ud)?;
        }
        let data = legacy_data(lowers, upper.is_some(), &self.overlay_opts)?;
        let mut flags = legacy_flags(&self.flags);
        if upper.is_none() {
            flags |= MountFlags::RDONLY;
        }
        let data_c = std::ffi::CString::new(data).map_err(|_| Error::Internal("NUL in overlay options".into()))?;
        // Mounted first in the (private) scratch directory, where nobody
        // looks, then moved onto the target once it is recorded.
        let ovl = scratch.sub("ovl")?;
        // Relative lowerdirs resolve against our cwd: the scratch tmpfs.
        let cwd = CwdGuard::enter(&scratch.path)?;
        let r = rustix::mount::mount(self.source.as_str(), &ovl, "overlay", flags, data_c.as_c_str());
        drop(cwd);
        r.map_err(|e| Error::sys("mount overlay", &self.target, e))?;
        let records: Vec<_> = ready.into_iter().map(|r| r.record).collect();
        let upper_rec = upper.as_ref().map(|u| u.record.clone());
        let root = rustix::fs::open(&ovl, rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC, rustix::fs::Mode::empty())
            .map_err(|e| Error::sys("open overlay", &ovl, e))?;
        let mnt_id = mount_id(&root, &self.target)?;
        drop(root);
        let published = publish(mnt_id, &records, upper_rec.as_ref())?;
        step("attach", None)?;
        rustix::mount::mount_move(&ovl, &self.target).map_err(|e| Error::sys("move overlay onto the mount point", &self.target, e))?;
        let mounted = Mounted { target: self.target.clone(), armed: true };
        drop(scratch);
        Ok(Outcome { mounted, layers: records, upper: upper_rec, mnt_id, published })
    }

    /// overlayfs wants two lowers when there is no upper: a one-layer
    /// read-only image gets an empty one below it.
    fn needs_empty_lower(&self, has_upper: bool) -> bool {
        !has_upper && self.layers.len() == 1
    }

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

    /// Create the overlay as a detached mount, `publish` it, attach it.
    fn finish_overlay<P>(
        &self,
        ctx: &FsContext,
        read_only: bool,
        layers: &[LayerRecord],
        upper: Option<&UpperRecord>,
        publish: impl FnOnce(u64, &[LayerRecord], Option<&UpperRecord>) -> Result<P>,
    ) -> Result<(Mounted, u64, P)> {
        if read_only {
            ctx.set_flag("ro")?;
        }
        ctx.create()?;
        let mnt = ctx.mount(mount_attrs(&self.flags, read_only))?;
        let id = mount_id(&mnt, &self.target)?;
        let published = publish(id, layers, upper)?;
        step("attach", None)?;
        attach_at(&mnt, &self.target)?;
        Ok((Mounted { target: self.target.clone(), armed: true }, id, published))
    }

    fn prepare_upper(&self) -> Result<Option<UpperReady>> {
        let Some(spec) = &self.upper else { return Ok(None) };
        match spec {
            UpperSpec::Tmpfs => {
                step("upper-mount", None)?;
                let ctx = FsContext::open("tmpfs", "tmpfs upper", &self.target)?;
                ctx.set_string("source", "sharedloop-upper")?;
                ctx.set_string("size", self.upper_create.size.to_string())?;
                ctx.set_string("mode", "0755")?;
                ctx.create()?;
                let mnt = ctx.mount(MountAttrFlags::empty())?;
                let (upper_dir, work_dir) = upper::ensure_dirs(&mnt, Path::new("tmpfs upper"))?;
                Ok(Some(UpperReady {
                    mnt,
                    upper_dir,
                    work_dir,
                    record: UpperRecord { kind: "tmpfs".into(), image: None, fstype: "tmpfs".into(), loop_dev: None },
                }))
            }
            UpperSpec::Named(n) => self.upper_image(upper::open_named(&self.store, n, &self.upper_create)?).map(Some),
            UpperSpec::Path(p) => self.upper_image(upper::open_path(p, &self.upper_create)?).map(Some),
        }
    }

    fn upper_image(&self, img: upper::UpperImage) -> Result<UpperReady> {
        upper::lock(&img)?;
        step("upper-attach", None)?;
        let dev = loopdev::attach(
            &img.fd,
            &img.path,
            AttachOptions { read_only: false, direct_io: self.direct_io, configure: self.loop_configure },
        )
        .map_err(|e| e.context("upper"))?;
        step("upper-mount", None)?;
        let what = format!("upper {}", img.path.display());
        let ctx = FsContext::open(img.fstype.as_str(), &what, dev.path())?;
        ctx.set_string("source", dev.path())?;
        ctx.create().map_err(|e| upper::explain_mount_failure(&img, e))?;
        let mnt = ctx.mount(MountAttrFlags::MOUNT_ATTR_NODEV)?;
        let (upper_dir, work_dir) = upper::ensure_dirs(&mnt, &img.path)?;
        let record = UpperRecord {
            kind: "image".into(),
            image: Some(img.path.clone()),
            fstype: img.fstype.as_str().into(),
            loop_dev: Some(loop_record(&dev)),
        };
        Ok(UpperReady { mnt, upper_dir, work_dir, record })
    }
}

/// An empty read-only directory as a detached mount.
fn empty_lower() -> Result<OwnedFd> {
    let ctx = FsContext::open("tmpfs", "empty lower layer", "tmpfs")?;
    ctx.set_string("source", "sharedloop-empty")?;
    ctx.set_string("size", "4k")?;
    ctx.set_string("mode", "0755")?;
    ctx.create()?;
    ctx.mount(MountAttrFlags::MOUNT_ATTR_RDONLY)
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

struct UpperReady {
    mnt: OwnedFd,
    upper_dir: OwnedFd,
    work_dir: OwnedFd,
    record: UpperRecord,
}

/// chdir for the legacy mount call, back to / afterwards whatever happens.
struct CwdGuard(PathBuf);

impl CwdGuard {
    fn enter(dir: &Path) -> Result<CwdGuard> {
        let old = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        std::env::set_current_dir(dir).map_err(|e| Error::io("chdir", dir, &e))?;
        Ok(CwdGuard(old))
    }
}

impl Drop for CwdGuard {
    fn drop(&mut self) {
        if std::env::set_current_dir(&self.0).is_err() {
            let _ = std::env::set_current_dir("/");
        }
    }
}

/// The option string for the legacy overlay mount: lowers named 0..N-1
/// relative to the scratch directory, upper at u/. Refused, never cut,
/// when it would not fit in the page mount(2) copies.
pub fn legacy_data(layers: usize, has_upper: bool, overlay_opts: &[(String, Option<String>)]) -> Result<String> {
    let lower: Vec<String> = (0..layers).map(|i| i.to_string()).collect();
    let mut data = format!("lowerdir={}", lower.join(":"));
    if has_upper {
        data.push_str(",upperdir=u/upper,workdir=u/work");
    }
    for (k, v) in overlay_opts {
        match v {
            Some(v) => data.push_str(&format!(",{k}={v}")),
            None => data.push_str(&format!(",{k}")),
        }
    }
    if data.len() > LEGACY_OPTS_MAX {
        return Err(Error::Store(format!(
            "overlay options would be {} bytes, more than the {LEGACY_OPTS_MAX} that mount(2) takes without cutting them short; use a kernel with lowerdir+ (6.8+) or fewer layers",
            data.len()
        )));
    }
    Ok(data)
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
    match crate::superblock::check(&layer.image, layer.meta.fstype) {
        Ok(()) => e,
        Err(why) => Error::Store(format!(
            "{e}; {}: {why}, its metadata says {} (image replaced? `sharedloop verify` checks the store)",
            layer.image_path.display(),
            layer.meta.fstype
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_options_never_cut() {
        let d = legacy_data(3, true, &[("metacopy".into(), Some("on".into())), ("volatile".into(), None)]).unwrap();
        assert_eq!(d, "lowerdir=0:1:2,upperdir=u/upper,workdir=u/work,metacopy=on,volatile");
        // 500 layers (overlayfs' maximum) fit with relative names...
        let d = legacy_data(500, true, &[]).unwrap();
        assert_eq!(d.matches(':').count(), 499);
        assert!(d.len() <= LEGACY_OPTS_MAX);
        // ...and a string past a page is refused, not truncated.
        let e = legacy_data(1100, false, &[]).unwrap_err().to_string();
        assert!(e.contains("more than the 4095"), "{e}");
    }

    #[test]
    fn api_by_kernel() {
        assert_eq!(resolve_api(MountApi::Auto, Version(6, 18, 0)), MountApi::Fd);
        assert_eq!(resolve_api(MountApi::Auto, Version(6, 8, 0)), MountApi::Path);
        assert_eq!(resolve_api(MountApi::Auto, Version(5, 15, 0)), MountApi::Legacy);
        assert_eq!(resolve_api(MountApi::Legacy, Version(6, 18, 0)), MountApi::Legacy);
    }
}
