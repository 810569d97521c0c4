//! mount.sharedloop and umount.sharedloop: from argv to a mounted (or
//! unmounted) overlay, with util-linux's exit codes.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::io::Errno;
use rustix::mount::UnmountFlags;

use crate::argv::{MountArgs, UmountArgs};
use crate::assemble::{self, Plan};
use crate::config;
use crate::error::{Error, Result};
use crate::ids::LayerRef;
use crate::interrupt::{self, step};
use crate::kernel::Version;
use crate::loopdev;
use crate::mountinfo;
use crate::opts::{DEFAULT_UPPER_SIZE, LoopApi, MountApi, MountOptions, Origin};
use crate::state::{self, MountRecord};
use crate::store::{FsType, Store, now_secs};
use crate::upper::CreateOptions;
use crate::utab::{self, UtabEntry};

/// How long umount waits, in all, for loop devices to be released.
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);
/// After this, a device whose filesystem is still mounted is taken to be in
/// use by another mount (teardown takes milliseconds: 128 layers in ~20 ms).
const DETACH_GRACE: Duration = Duration::from_millis(500);

/// Enter the mount namespace named by `-N` (a pid or a path).
fn enter_namespace(ns: &str) -> Result<()> {
    let path = if ns.bytes().all(|b| b.is_ascii_digit()) { format!("/proc/{ns}/ns/mnt") } else { ns.to_string() };
    let fd = rustix::fs::open(path.as_str(), rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC, rustix::fs::Mode::empty())
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

fn check_target(target: &str) -> Result<PathBuf> {
    let p = Path::new(target);
    if !p.is_absolute() {
        return Err(Error::Usage(format!("{target}: mount point must be an absolute path")));
    }
    let canon = std::fs::canonicalize(p).map_err(|e| Error::io("mount point", p, &e))?;
    if !canon.is_dir() {
        return Err(Error::sys("mount point", &canon, Errno::NOTDIR));
    }
    Ok(canon)
}

/// The SOURCE string becomes the overlay's source in mountinfo, which
/// umount(8) compares with what mount(8) saw: keep it printable and short.
fn check_source(s: &str) -> Result<()> {
    if s.len() > 255 || s.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',') {
        return Err(Error::Usage(format!("{s:?}: SOURCE must be at most 255 bytes without spaces or commas")));
    }
    Ok(())
}

/// Options from the configuration file under the command line's.
pub fn effective_options(cmdline: &str, sloppy: bool) -> Result<(MountOptions, Vec<String>)> {
    let (cfg, mut warnings) = config::load()?;
    let (cli, w) = MountOptions::parse(cmdline, Origin::CommandLine, sloppy)?;
    warnings.extend(w);
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

pub fn mount_main(args: &[String]) -> Result<()> {
    let a = MountArgs::parse(args)?;
    crate::logging::init("mount.sharedloop", a.verbose);
    interrupt::install();
    raise_fd_limit();
    if let Some(ns) = &a.namespace {
        enter_namespace(ns)?;
    }
    let (opts, warnings) = effective_options(&a.options, a.sloppy)?;
    for w in warnings {
        log::warn!("{w}");
    }
    let kernel = Version::running()?;
    if !kernel.has_multi_lower() && !opts.override_kernel_check {
        return Err(Error::Store(format!(
            "kernel {kernel} is older than 4.0 and may lack multiple lower layers in overlayfs; use override_kernel_check if your distribution backported them"
        )));
    }
    check_source(&a.source)?;
    let target = check_target(&a.target)?;
    let store = store_of(&opts);

    let t0 = std::time::Instant::now();
    step("resolve", None)?;
    let layers = match &opts.layers {
        Some(refs) => store.explicit_chain(refs)?,
        None => {
            let r = LayerRef::parse(&a.source)?;
            let top = store.resolve(&r)?;
            store.chain(&top)?
        }
    };
    let api = assemble::resolve_api(opts.mount_api.unwrap_or(MountApi::Auto), kernel);
    let loop_configure = match opts.loop_api.unwrap_or(LoopApi::Auto) {
        LoopApi::Auto => kernel.has_loop_configure(),
        LoopApi::Configure => true,
        LoopApi::SetFd => false,
    };
    let upper = opts.upper.clone().flatten();
    log::info!(
        "{}: {} layers (top {}), upper {}, mount api {}, loop {}",
        a.source,
        layers.len(),
        layers[0].meta.chain_id.short(),
        match &upper {
            None => "none (read-only)".to_string(),
            Some(u) => u.to_string(),
        },
        assemble::api_name(api),
        if loop_configure { "LOOP_CONFIGURE" } else { "LOOP_SET_FD" }
    );
    for l in &layers {
        log::info!("  layer {} ({}, {}) {}", l.meta.chain_id, l.meta.fstype, l.which, l.image_path.display());
    }
    let plan = Plan {
        source: a.source.clone(),
        target: target.clone(),
        layers,
        upper,
        upper_create: CreateOptions {
            size: opts.upper_size.unwrap_or(DEFAULT_UPPER_SIZE),
            fstype: opts.upper_fstype.unwrap_or(FsType::Ext4),
            mmp: opts.upper_mmp.unwrap_or_default(),
        },
        api,
        loop_configure,
        direct_io: opts.direct_io.unwrap_or(true),
        erofs_from_file: kernel.has_erofs_file_backed(),
        overlay_opts: opts.overlay.clone(),
        flags: opts.flags.clone(),
        store,
        state_dir: state::dir(),
    };
    if a.fake {
        log::info!("-f: not mounting {} at {}", a.source, target.display());
        return Ok(());
    }
    assemble::sweep_scratch(&plan.state_dir);
    log::debug!("chain resolved: {:?}", t0.elapsed());
    let out = plan.run()?;
    log::debug!("assembled: {:?}", t0.elapsed());
    // The mount now on top of the target is ours: its ID keys the record.
    let mnt_id = rustix::fs::statx(rustix::fs::CWD, &target, rustix::fs::AtFlags::empty(), rustix::fs::StatxFlags::MNT_ID)
        .map_err(|e| Error::sys("statx", &target, e))?
        .stx_mnt_id;
    step("state", None)?;
    let rec = MountRecord {
        source: a.source.clone(),
        target: target.clone(),
        chain: out.layers,
        upper: out.upper,
        mount_api: assemble::api_name(api).into(),
        mnt_id,
        mnt_ns: state::mnt_ns(),
        created: now_secs(),
    };
    state::write(&rec)?;
    let record_guard = RecordGuard(Some(mnt_id));
    if !a.no_mtab {
        step("utab", None)?;
        let mut o = vec!["helper=sharedloop".to_string()];
        o.extend(opts.userspace.iter().filter(|u| !u.starts_with("helper=")).cloned());
        utab::add(&UtabEntry {
            source: a.source.clone(),
            target: target.to_string_lossy().into_owned(),
            root: "/".into(),
            options: o.join(","),
        })
        .map_err(|e| match e {
            // util-linux's 16 means "utab not written"; we also undo the
            // mount, since umount(8) could not find our helper for it.
            Error::Utab { path, errno, .. } => Error::Utab { path, errno, undone: true },
            e => e,
        })?;
    }
    out.mounted.commit();
    record_guard.commit();
    log::info!("mounted {} at {} ({} loop devices) in {:?}", a.source, target.display(), rec.loops().count(), t0.elapsed());
    Ok(())
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

pub fn umount_main(args: &[String]) -> Result<()> {
    let a = UmountArgs::parse(args)?;
    crate::logging::init("umount.sharedloop", a.verbose);
    if let Some(ns) = &a.namespace {
        enter_namespace(ns)?;
    }
    assemble::sweep_scratch(&state::dir());
    let target = std::fs::canonicalize(&a.target).unwrap_or_else(|_| PathBuf::from(&a.target));
    let mounts = mountinfo::read()?;
    let Some(m) = mountinfo::find_at(&mounts, &target) else {
        return Err(Error::sys("umount", &target, Errno::INVAL).context("not mounted"));
    };
    let records = state::live(&mounts);
    let mine = records.iter().find(|r| r.mnt_id == m.id).cloned();
    if m.fstype != "overlay" || mine.is_none() {
        log::info!("{}: no sharedloop record for this mount; unmounting it all the same", target.display());
    }
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
    if !a.no_mtab {
        utab::remove(&target.to_string_lossy())?;
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
    let mut pending: Vec<(u32, String, String)> = rec
        .chain
        .iter()
        .filter_map(|l| l.loop_dev.as_ref().map(|d| (d.number, d.backing.clone(), l.fstype.clone())))
        .chain(rec.upper.iter().filter_map(|u| u.loop_dev.as_ref().map(|d| (d.number, d.backing.clone(), u.fstype.clone()))))
        .filter(|(n, b, _)| !all.iter().any(|o| o.mnt_id != rec.mnt_id && o.loops().any(|x| x.number == *n && &x.backing == b)))
        .collect();
    let start = std::time::Instant::now();
    let mut pause = Duration::from_micros(200);
    while !pending.is_empty() {
        pending.retain(|(n, b, _)| loopdev::backing_file(*n).is_some_and(|now| &now == b));
        if start.elapsed() >= DETACH_GRACE {
            pending.retain(|(n, _, fs)| !loopdev::superblock_alive(*n, fs));
        }
        if pending.is_empty() {
            break;
        }
        if start.elapsed() >= DETACH_TIMEOUT {
            for (n, b, _) in &pending {
                log::warn!("/dev/loop{n} ({b}) still attached after {DETACH_TIMEOUT:?}: something else holds it open");
            }
            break;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}
