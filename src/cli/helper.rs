//! mount.sharedloop and umount.sharedloop: from argv to a mounted (or
//! unmounted) overlay, with util-linux's exit codes.

use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::io::Errno;
use rustix::mount::UnmountFlags;

use crate::cli::argv::{Info, MOUNT_USAGE, MountArgs, Parsed, UMOUNT_USAGE, UmountArgs};
use crate::kernel::Feature;
use crate::mount::{self, Plan};
use crate::cli::config;
use crate::error::{Error, Result};
use crate::store::ids::LayerRef;
use crate::interrupt::{self, step};
use crate::kernel::Version;
use crate::kernel::loopdev;
use crate::kernel::mountinfo::{self, MountInfo};
use crate::mount::opts::{DEFAULT_UPPER_SIZE, LoopApi, MountApi, MountOptions, Origin};
use crate::mount::state::{self, LayerRecord, MountRecord, UpperRecord};
use crate::store::{FsType, Store, now_secs};
use crate::upper::CreateOptions;
use crate::mount::utab::{self, UtabEntry};

/// How long umount waits, in all, for loop devices to be released.
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);
/// After this, a device whose filesystem is still mounted is taken to be in
/// use by another mount (teardown takes milliseconds: 128 layers in ~20 ms).
const DETACH_GRACE: Duration = Duration::from_millis(500);

/// Enter the mount namespace named by `-N` (a pid or a path).
fn enter_namespace(ns: &OsStr) -> Result<()> {
    let path = if !ns.is_empty() && ns.as_bytes().iter().all(|b| b.is_ascii_digit()) {
        PathBuf::from(format!("/proc/{}/ns/mnt", ns.to_string_lossy()))
    } else {
        PathBuf::from(ns)
    };
    let fd = rustix::fs::open(&path, rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC, rustix::fs::Mode::empty())
        .map_err(|e| Error::sys("open mount namespace", &path, e))?;
    rustix::thread::move_into_link_name_space(fd.as_fd(), Some(rustix::thread::LinkNameSpaceType::Mount))
        .map_err(|e| Error::sys("enter mount namespace", &path, e))
}

/// 500 layers need more than the default 1024 descriptors (one detached
/// mount each, plus images while they are set up).
pub fn raise_fd_limit() {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if let Some(max) = lim.maximum {
        let want = max.min(65536);
        if lim.current.is_some_and(|c| c < want) {
            let _ = rustix::process::setrlimit(
                rustix::process::Resource::Nofile,
                rustix::process::Rlimit { current: Some(want), maximum: lim.maximum },
            );
        }
    }
}

fn check_target(target: &Path) -> Result<PathBuf> {
    if !target.is_absolute() {
        return Err(Error::Usage(format!("{}: mount point must be an absolute path", target.display())));
    }
    let canon = std::fs::canonicalize(target).map_err(|e| Error::io("mount point", target, &e))?;
    if !canon.is_dir() {
        return Err(Error::sys("mount point", &canon, Errno::NOTDIR));
    }
    Ok(canon)
}

/// The SOURCE string becomes the overlay's source in mountinfo, which
/// umount(8) compares with what mount(8) saw: keep it printable and short.
fn check_source(s: &OsStr) -> Result<String> {
    let bad = || Error::Usage(format!("{s:?}: SOURCE must be at most 255 bytes without spaces or commas, UTF-8 without control characters"));
    let t = s.to_str().ok_or_else(bad)?;
    if t.len() > 255 || t.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',') {
        return Err(bad());
    }
    Ok(t.to_string())
}

/// Options from the configuration file under the command line's.
pub fn effective_options(cli: MountOptions) -> Result<(MountOptions, Vec<String>)> {
    let (cfg, warnings) = config::load()?;
    let merged = cli.over(cfg);
    merged.check()?;
    Ok((merged, warnings))
}

pub fn store_of(o: &MountOptions) -> Store {
    Store::new(
        o.loopback_root.clone().unwrap_or_else(|| crate::store::DEFAULT_ROOT.into()),
        o.loopback_fallback.clone().unwrap_or_else(|| crate::store::DEFAULT_FALLBACK.into()),
    )
}

fn print_info(prog: &str, usage: &str, what: &str, i: Info) {
    match i {
        Info::Version => println!("{prog} (sharedloop {})", env!("CARGO_PKG_VERSION")),
        Info::Help => println!(
            "{usage}\n\n{what}\n\nSee {prog}(8) for the options; `sharedloop --help` for the store commands."
        ),
    }
}

pub fn mount_main(args: &[OsString]) -> Result<()> {
    let a = match MountArgs::parse(args)? {
        Parsed::Run(a) => a,
        Parsed::Info(i) => {
            print_info(
                "mount.sharedloop",
                MOUNT_USAGE,
                "Mounts the image SOURCE (a chain ID, a unique ID prefix or a name in the store) at TARGET: each layer\n\
                 image attached read-only to a loop device, a writable upper, one overlayfs mount. mount(8) runs it\n\
                 for `mount -t sharedloop`.\n\n  -s  ignore unknown options (with a warning)\n  -f  check everything, mount nothing\n\
                 \x20 -n  do not write /run/mount/utab\n  -v  say each step\n  -o  options (comma-separated)\n\
                 \x20 -N  enter the mount namespace of a pid, or at a path, first",
                i,
            );
            return Ok(());
        }
    };
    crate::cli::logging::init("mount.sharedloop", a.verbose);
    raise_fd_limit();
    // setns(CLONE_NEWNS) wants a single-threaded process: before the
    // watchdog thread starts.
    if let Some(ns) = &a.namespace {
        enter_namespace(ns)?;
    }
    interrupt::install();
    let (cli, mut warnings) = MountOptions::parse(&a.options, Origin::CommandLine, a.sloppy)?;
    let (opts, w) = effective_options(cli)?;
    warnings.extend(w);
    for w in warnings {
        log::warn!("{w}");
    }
    let kernel = Version::running()?;
    if !kernel.has_multi_lower() && !opts.override_kernel_check {
        return Err(Error::Unsupported(format!(
            "kernel {kernel} is older than 4.0 and may lack multiple lower layers in overlayfs; use override_kernel_check if your distribution backported them"
        )));
    }
    let source = check_source(&a.source)?;
    let target = check_target(&a.target)?;
    let store = store_of(&opts);

    let t0 = std::time::Instant::now();
    step("resolve", None)?;
    // A way this kernel cannot do is refused before the store is read.
    if log::log_enabled!(log::Level::Info) {
        log::info!("kernel {}: {}", crate::kernel::release().unwrap_or_default(), crate::kernel::summary());
    }
    let api = mount::resolve_api(opts.mount_api.unwrap_or(MountApi::Auto))?;
    store.require()?;
    let layers = match &opts.layers {
        Some(refs) => store.explicit_chain(refs)?,
        None => {
            let r = LayerRef::parse(&source)?;
            let top = store.resolve(&r)?;
            store.chain(&top)?
        }
    };
    let loop_configure = match opts.loop_api.unwrap_or(LoopApi::Auto) {
        LoopApi::Auto => Feature::LoopConfigure.have(),
        LoopApi::Configure => true,
        LoopApi::SetFd => false,
    };
    let upper = opts.upper.clone().flatten();
    log::info!(
        "{}: {} layers (top {}), upper {}, mount api {}, loop {}",
        source,
        layers.len(),
        layers[0].meta.chain_id.short(),
        match &upper {
            None => "none (read-only)".to_string(),
            Some(u) => u.to_string(),
        },
        mount::api_name(api),
        if loop_configure { "LOOP_CONFIGURE" } else { "LOOP_SET_FD" }
    );
    for l in &layers {
        log::info!("  layer {} ({}, {}) {}", l.meta.chain_id, l.meta.fstype, l.which, l.image_path.display());
    }
    let mut plan = Plan {
        source: source.clone(),
        target: target.clone(),
        layers,
        upper,
        upper_create: CreateOptions {
            size: opts.upper_size.unwrap_or(DEFAULT_UPPER_SIZE),
            fstype: opts.upper_fstype.unwrap_or(FsType::Ext4),
            mmp: opts.upper_mmp.unwrap_or_default(),
            alloc: opts.upper_alloc.unwrap_or_default(),
        },
        api,
        loop_configure,
        direct_io: opts.direct_io.unwrap_or(true),
        overlay_opts: opts.overlay.clone(),
        flags: opts.flags.clone(),
        store,
        state_dir: state::dir(),
        loop_hints: Vec::new(),
    };
    if a.fake {
        log::info!("-f: not mounting {} at {}", source, target.display());
        return Ok(());
    }
    // What killed mounts and umounts left: scratch mounts, stale records
    // and their utab lines.
    let live = state::reconcile();
    // The devices this node's mounts hold, from their records: a mount of
    // a chain already in use finds its layers' devices there without a
    // scan of every loop device.
    plan.loop_hints = live.iter().flat_map(|r| r.chain.iter()).filter_map(|l| l.loop_dev.as_ref()).map(|d| (d.number, d.backing.clone())).collect();
    log::debug!("chain resolved: {:?}", t0.elapsed());
    let write_utab = !a.no_mtab;
    let (pid, pid_start) = crate::kernel::procs::me();
    // Called by the plan once the overlay exists, before it is attached:
    // the record and the utab line are there before anyone can see the
    // mount, so a SIGKILL at any point never leaves a sharedloop overlay
    // that umount and status cannot recognise (see `state`).
    let publish = |mnt_id: u64, chain: &[LayerRecord], upper: Option<&UpperRecord>| -> Result<Published> {
        step("state", None)?;
        let rec = MountRecord {
            source: source.clone(),
            target: target.clone(),
            chain: chain.to_vec(),
            upper: upper.cloned(),
            mount_api: mount::api_name(api).into(),
            mnt_id,
            mnt_ns: state::mnt_ns(),
            created: now_secs(),
            pid,
            pid_start,
            utab: write_utab,
        };
        state::write(&rec)?;
        let record = RecordGuard(Some(mnt_id));
        let mut utab_line = UtabGuard(None);
        if write_utab {
            step("utab", None)?;
            let mut o: Vec<u8> = b"helper=sharedloop".to_vec();
            for u in opts.userspace.iter().filter(|u| !u.as_bytes().starts_with(b"helper=")) {
                o.push(b',');
                o.extend_from_slice(u.as_bytes());
            }
            utab::add(&UtabEntry { source: source.clone().into(), target: target.clone(), root: "/".into(), options: OsString::from_vec(o) })
                .map_err(|e| match e {
                    // util-linux's 16 means "utab not written"; we also undo the
                    // mount, since umount(8) could not find our helper for it.
                    Error::Utab { path, errno, .. } => Error::Utab { path, errno, undone: true },
                    e => e,
                })?;
            utab_line.0 = Some(target.clone());
        }
        Ok(Published { rec, record, utab_line })
    };
    let out = plan.run(publish)?;
    log::debug!("assembled: {:?}", t0.elapsed());
    out.mounted.commit();
    let Published { rec, record, utab_line } = out.published;
    record.commit();
    utab_line.commit();
    log::info!("mounted {} at {} ({} loop devices) in {:?}", source, target.display(), rec.loops().count(), t0.elapsed());
    Ok(())
}

/// What `publish` wrote, each undone on drop unless committed.
struct Published {
    rec: MountRecord,
    record: RecordGuard,
    utab_line: UtabGuard,
}

/// Removes the mount record unless the whole mount succeeded.
struct RecordGuard(Option<u64>);
impl RecordGuard {
    fn commit(mut self) {
        self.0 = None;
    }
}
impl Drop for RecordGuard {
    fn drop(&mut self) {
        if let Some(id) = self.0 {
            state::remove(id);
        }
    }
}

/// Removes the utab line unless the whole mount succeeded.
struct UtabGuard(Option<PathBuf>);
impl UtabGuard {
    fn commit(mut self) {
        self.0 = None;
    }
}
impl Drop for UtabGuard {
    fn drop(&mut self) {
        if let Some(t) = self.0.take()
            && let Err(e) = utab::remove(&t)
        {
            log::warn!("{e}: the utab line of the undone mount at {} stays", t.display());
        }
    }
}

/// Why `m` is not a sharedloop mount, or None if it is one: an overlay
/// with our record (mount ID and target), or with our utab line (a mount
/// this node's state directory does not know, from another state
/// directory, say).
fn not_ours(m: &MountInfo, record: Option<&MountRecord>, utab: &[UtabEntry]) -> Option<String> {
    if m.fstype != "overlay" {
        return Some(format!("a {} mount (source {:?})", m.fstype, m.source));
    }
    if record.is_some() || utab.iter().any(|u| u.target == m.mount_point && u.is_sharedloop() && u.source == m.source) {
        return None;
    }
    Some(format!("an overlay (source {:?}) that sharedloop has no record of", m.source))
}

pub fn umount_main(args: &[OsString]) -> Result<()> {
    let a = match UmountArgs::parse(args)? {
        Parsed::Run(a) => a,
        Parsed::Info(i) => {
            print_info(
                "umount.sharedloop",
                UMOUNT_USAGE,
                "Unmounts the sharedloop mount at TARGET and waits until the loop devices no other mount needs are\n\
                 detached; refuses a mount that is not a sharedloop overlay. umount(8) runs it for a mount that\n\
                 mount.sharedloop made.\n\n  -n  do not update /run/mount/utab\n  -l  lazy: detach now, clean up when no longer busy\n\
                 \x20 -f  force (for unreachable network filesystems)\n  -r  if busy, remount read-only\n  -v  say each step\n\
                 \x20 -N  enter the mount namespace of a pid, or at a path, first",
                i,
            );
            return Ok(());
        }
    };
    crate::cli::logging::init("umount.sharedloop", a.verbose);
    if let Some(ns) = &a.namespace {
        enter_namespace(ns)?;
    }
    interrupt::install();
    let target = match std::fs::canonicalize(&a.target) {
        Ok(t) => t,
        Err(e) => {
            return Err(Error::Target(format!("{}: not mounted ({})", a.target.display(), crate::error::Errno::from_io(&e))));
        }
    };
    let mounts = mountinfo::read()?;
    let Some(m) = mountinfo::find_at(&mounts, &target) else {
        return Err(Error::Target(format!("{}: not mounted", target.display())));
    };
    let records = state::live(&mounts);
    let mine = records.iter().find(|r| r.mnt_id == m.id && r.target == target).cloned();
    let utab_now = utab::entries().unwrap_or_else(|e| {
        log::warn!("{e}");
        vec![]
    });
    if let Some(why) = not_ours(&m, mine.as_ref(), &utab_now) {
        return Err(Error::Target(format!(
            "{}: not a sharedloop mount ({why}); not unmounting it (umount -i unmounts without this helper)",
            target.display()
        )));
    }
    if mine.is_none() {
        log::info!("{}: no record in {} for this mount (another state directory?); unmounting it by its utab line", target.display(), state::dir().display());
    }
    step("umount", None)?;
    let mut flags = UnmountFlags::empty();
    if a.lazy {
        flags |= UnmountFlags::DETACH;
    }
    if a.force {
        flags |= UnmountFlags::FORCE;
    }
    if let Err(e) = rustix::mount::unmount(&target, flags) {
        if e == Errno::BUSY && a.remount_ro {
            rustix::mount::mount_remount(&target, rustix::mount::MountFlags::RDONLY, c"")
                .map_err(|e2| Error::sys("umount failed (busy) and remount read-only failed", &target, e2))?;
            log::warn!("{}: busy, remounted read-only", target.display());
            return Ok(());
        }
        return Err(Error::sys("umount", &target, e));
    }
    // The utab line before the record: a kill in between leaves a record
    // whose mount is gone, which the next command removes with its line.
    if !a.no_mtab {
        utab::remove(&target)?;
    }
    if let Some(rec) = mine {
        state::remove(rec.mnt_id);
        if !a.lazy {
            wait_for_loops(&rec, &records);
        }
    }
    log::info!("unmounted {}", target.display());
    Ok(())
}

/// Wait until the loop devices this mount used are detached by autoclear.
/// overlayfs drops its layer mounts from a workqueue, so that can come a
/// little after umount(2) returns. A device whose filesystem is still
/// mounted after a short grace is used by another mount (perhaps one this
/// node's records do not list: another state directory, another helper):
/// it is not waited for. One deadline for all devices, not one each.
fn wait_for_loops(rec: &MountRecord, all: &[MountRecord]) {
    let mut pending: Vec<(u32, PathBuf, String)> = rec
        .chain
        .iter()
        .filter_map(|l| l.loop_dev.as_ref().map(|d| (d.number, d.backing.clone(), l.fstype.clone())))
        .chain(rec.upper.iter().filter_map(|u| u.loop_dev.as_ref().map(|d| (d.number, d.backing.clone(), u.fstype.clone()))))
        .filter(|(n, b, _)| !all.iter().any(|o| o.mnt_id != rec.mnt_id && o.loops().any(|x| x.number == *n && &x.backing == b)))
        .collect();
    let start = std::time::Instant::now();
    let mut pause = Duration::from_micros(200);
    while !pending.is_empty() && !interrupt::interrupted() {
        // One read of /proc/partitions settles every device detached
        // since (it lists a device only while bound); sysfs is asked only
        // about those still listed, which may have been bound again.
        let listed = loopdev::listed_devices();
        pending.retain(|(n, b, _)| listed.contains(n) && loopdev::backing_file(*n).is_some_and(|now| &now == b));
        if start.elapsed() >= DETACH_GRACE {
            pending.retain(|(n, _, fs)| !loopdev::superblock_alive(*n, fs));
        }
        if pending.is_empty() {
            break;
        }
        if start.elapsed() >= DETACH_TIMEOUT {
            for (n, b, _) in &pending {
                log::warn!("/dev/loop{n} ({}) still attached after {DETACH_TIMEOUT:?}: something else holds it open", b.display());
            }
            break;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}
