//! The writable upper layer: an image file (found or created, locked,
//! attached read-write) or a throw-away tmpfs.
//!
//! One writer at a time: an OFD write lock is taken on the very open file
//! description handed to the loop device, so it is held exactly as long as
//! the device is attached, needs no daemon, and (on NFSv4, Lustre, GPFS
//! with locking) is seen by other nodes too.

pub mod mmp;

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::command::Cmd;
use crate::error::{Error, Result};
use crate::store::ids::Name;
use crate::upper::mmp::{self as ext4_mmp, MmpState};
use crate::kernel::mountinfo;
use crate::mount::opts::{Alloc, Mmp};
use crate::store::sharedfs::FsKind;
use crate::store::{FsType, Store, open_beneath, temp_name};
use crate::kernel::sys;

/// An upper image opened read-write and locked for us.
pub struct UpperImage {
    pub path: PathBuf,
    pub fd: OwnedFd,
    pub fstype: FsType,
    pub created: bool,
}

/// Removes a half-made image unless it was renamed into place.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub struct CreateOptions {
    pub size: u64,
    pub fstype: FsType,
    pub mmp: Mmp,
    pub alloc: Alloc,
}

/// The upper named `name` in the store: existing in root, else existing in
/// the fallback, else created in root, else (EROFS/EACCES/ENOENT) in the
/// fallback.
pub fn open_named(store: &Store, name: &Name, create: &CreateOptions) -> Result<UpperImage> {
    let rel = format!("uppers/{}.img", name.file_name());
    let found = store.with_fallback(|dir, _| {
        let fd = open_beneath(dir, &rel, OFlags::RDWR, Mode::empty())?;
        Ok((dir.join(&rel), fd))
    });
    match found {
        Ok((path, fd)) => finish_open(path, fd, false),
        Err(e) if e.errno() == Some(Errno::NOENT) => {
            crate::interrupt::step("upper-create", None)?;
            store
                .with_fallback(|dir, _| {
                    let uppers = dir.join("uppers");
                    std::fs::create_dir_all(&uppers).map_err(|e| Error::io("create directory", &uppers, &e))?;
                    create_image(&uppers.join(format!("{}.img", name.file_name())), create)
                })
                .map_err(|e| e.context(&format!("upper {name}")))
        }
        Err(e) => Err(e.context(&format!("upper {name}"))),
    }
}

/// An upper given by absolute path; created if missing.
pub fn open_path(path: &Path, create: &CreateOptions) -> Result<UpperImage> {
    match rustix::fs::open(path, OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW, Mode::empty()) {
        Ok(fd) => finish_open(path.to_path_buf(), fd, false),
        Err(Errno::NOENT) => {
            crate::interrupt::step("upper-create", None)?;
            create_image(path, create).map_err(|e| e.context(&format!("upper {}", path.display())))
        }
        Err(Errno::LOOP) => Err(Error::sys("upper image is a symlink, refusing", path, Errno::LOOP)),
        Err(e) => Err(Error::sys("open upper image", path, e)),
    }
}

fn finish_open(path: PathBuf, fd: OwnedFd, created: bool) -> Result<UpperImage> {
    let st = rustix::fs::fstat(&fd).map_err(|e| Error::sys("stat upper image", &path, e))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(Error::damaged_upper(path, "not a regular file"));
    }
    let fstype = probe_fstype(&fd, &path)?;
    Ok(UpperImage { path, fd, fstype, created })
}

/// Make a sparse image with a filesystem at a temporary name beside
/// `dest`, then move it into place without replacing: if a concurrent
/// mount (on this node or another) created it first, theirs is used (and
/// its lock decides).
fn create_image(dest: &Path, opts: &CreateOptions) -> Result<UpperImage> {
    let dir = dest.parent().unwrap_or(Path::new("/"));
    // Say which directory is missing rather than naming our temporary file.
    if let Err(e) = std::fs::metadata(dir) {
        return Err(Error::io("directory for the upper image", dir, &e));
    }
    let mmp = wants_mmp(dir, opts);
    let base = dest.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let label = format!(".{base}.tmp");
    sweep_dead_temps(dir, &label);
    let tmp = dir.join(temp_name(&label));
    let mut guard = TempFile(Some(tmp.clone()));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| Error::io("create upper image", &tmp, &e))?;
    f.set_len(opts.size).map_err(|e| Error::io("size upper image", &tmp, &e))?;
    drop(f);
    mkfs(&tmp, opts.fstype, mmp)?;
    if opts.alloc == Alloc::Full {
        reserve(&tmp, opts.size)?;
    }
    let placed = place_noreplace(&tmp, dest)?;
    if placed == Placed::Renamed {
        guard.0 = None; // renamed into place: nothing to remove
    }
    drop(guard);
    let fd = rustix::fs::open(dest, OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW, Mode::empty())
        .map_err(|e| Error::sys("open upper image", dest, e))?;
    finish_open(dest.to_path_buf(), fd, placed != Placed::Existed)
}

/// Remove the half-made images of this upper that processes of this node
/// which are gone left (a mount killed while it ran mkfs): each may hold
/// `upper_size` of the store. Other nodes' are theirs (or `gc`'s).
fn sweep_dead_temps(dir: &Path, label: &str) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(label) && crate::kernel::procs::left_by_dead_process(name, label) {
            match std::fs::remove_file(e.path()) {
                Ok(()) => log::info!("{}: removed, left by a process that is gone", e.path().display()),
                Err(err) => log::warn!("{}: left by a process that is gone, cannot remove it: {err}", e.path().display()),
            }
        }
    }
}

/// Take all of the image's blocks from the store now, so that it never
/// promises more than the store can give: after mkfs (mode 0 allocates
/// the holes and keeps what mkfs wrote, which a discard would not), before
/// the image is put in place, so a refusal leaves nothing.
fn reserve(img: &Path, size: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(img).map_err(|e| Error::io("open upper image", img, &e))?;
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, size).map_err(|e| {
        let why = match e {
            Errno::NOSPC | Errno::DQUOT => {
                let free = rustix::fs::fstatvfs(&f).map(|v| v.f_bavail * v.f_frsize).unwrap_or(0);
                format!(
                    "the store has {free} bytes free for a {size}-byte upper (a smaller upper_size, or upper_alloc=sparse to overcommit)"
                )
            }
            Errno::OPNOTSUPP => "the store's filesystem cannot preallocate (upper_alloc=sparse takes blocks as they are written)".into(),
            _ => "preallocate".into(),
        };
        Error::sys(format!("reserve {size} bytes: {why}"), img, e)
    })?;
    f.sync_all().map_err(|e| Error::io("sync upper image", img, &e))
}

/// Multi-mount protection for a new image: asked for, or (auto) for an
/// ext4 upper on storage other nodes share.
fn wants_mmp(dir: &Path, opts: &CreateOptions) -> bool {
    let shared = FsKind::of(dir).filter(|k| k.shared());
    match (opts.mmp, opts.fstype) {
        (Mmp::On, _) => true,
        (Mmp::Off, _) => false,
        (Mmp::Auto, FsType::Ext4) => shared.is_some(),
        (Mmp::Auto, _) => {
            if let Some(k) = shared {
                log::warn!(
                    "{}: new {} upper on shared storage ({}): xfs has no multi-mount protection, so only the \
                     filesystem's locks keep a second node from mounting it read-write (ext4 uppers get MMP)",
                    dir.display(),
                    opts.fstype,
                    k.name()
                );
            }
            false
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placed {
    /// `tmp` is now `dest`.
    Renamed,
    /// `dest` is a hard link to `tmp`, which is left to remove.
    Linked,
    /// `dest` was there already (someone else's); `tmp` is left to remove.
    Existed,
}

/// Move `tmp` to `dest` unless `dest` exists. renameat2(RENAME_NOREPLACE)
/// where the filesystem takes it; FUSE (GlusterFS, ...) and the NFS client
/// refuse rename flags with EINVAL (older filesystems: ENOSYS, EOPNOTSUPP),
/// and there link(2), which never replaces, does the same job.
fn place_noreplace(tmp: &Path, dest: &Path) -> Result<Placed> {
    use rustix::fs::{CWD, RenameFlags};
    match rustix::fs::renameat_with(CWD, tmp, CWD, dest, RenameFlags::NOREPLACE) {
        Ok(()) => return Ok(Placed::Renamed),
        Err(Errno::EXIST) => return Ok(Placed::Existed),
        Err(Errno::INVAL) | Err(Errno::NOSYS) | Err(Errno::OPNOTSUPP) => {}
        Err(e) => return Err(Error::sys("create upper image", dest, e)),
    }
    match rustix::fs::link(tmp, dest) {
        Ok(()) => Ok(Placed::Linked),
        // NFS may retransmit a LINK whose reply was lost and then report
        // EEXIST for our own success: the link count of our file tells
        // (the lock-file idiom of open(2)).
        Err(Errno::EXIST) => match rustix::fs::stat(tmp) {
            Ok(st) if st.st_nlink == 2 => Ok(Placed::Linked),
            _ => Ok(Placed::Existed),
        },
        Err(e) => Err(Error::sys("create upper image (rename flags refused, link)", dest, e)),
    }
}

fn mkfs(image: &Path, fstype: FsType, mmp: bool) -> Result<()> {
    let mut cmd = match fstype {
        FsType::Ext4 => {
            let mut c = Cmd::new("mkfs.ext4");
            c.args(["-q", "-F", "-m", "0", "-L", "sl-upper", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"]);
            if mmp {
                // The kernel's shortest check interval (5 s): a mount after
                // an unclean one waits 2 x 5 + 1 s; a clean one does not.
                c.args(["-O", "mmp", "-E", "mmp_update_interval=5"]);
            }
            c
        }
        FsType::Xfs => {
            let mut c = Cmd::new("mkfs.xfs");
            c.args(["-q", "-f", "-K", "-L", "sl-upper"]);
            c
        }
        FsType::Erofs => return Err(Error::Usage("an upper cannot be erofs (read-only)".into())),
    };
    cmd.arg(image);
    cmd.run("create upper filesystem")?;
    Ok(())
}

/// Recognise ext4 and xfs by their superblock magic (what blkid does, for
/// the two types we create).
fn probe_fstype(fd: &OwnedFd, path: &Path) -> Result<FsType> {
    let mut buf = [0u8; 1084];
    let n = rustix::io::pread(fd, &mut buf, 0).map_err(|e| Error::sys("read upper image", path, e))?;
    if n >= 4 && &buf[..4] == b"XFSB" {
        return Ok(FsType::Xfs);
    }
    if n >= 1082 && buf[1080] == 0x53 && buf[1081] == 0xEF {
        return Ok(FsType::Ext4);
    }
    Err(Error::damaged_upper(path, "no ext4 or xfs filesystem found (corrupt or not an image)"))
}

/// Take the writer's lock, or say where the upper is in use.
pub fn lock(img: &UpperImage) -> Result<()> {
    match sys::ofd_try_write_lock(img.fd.as_fd()) {
        Ok(()) => {
            note_unclean_mmp(img);
            Ok(())
        }
        Err(Errno::AGAIN) | Err(Errno::ACCESS) => Err(Error::InUse(format!(
            "upper image {}: already mounted read-write{}",
            img.path.display(),
            where_in_use(img)
        ))),
        Err(e) => Err(Error::sys("lock upper image", &img.path, e)),
    }
}

/// The MMP block, read through a description of our own: the one given to
/// the loop device may have O_DIRECT set, which wants aligned buffers.
fn mmp_of(img: &UpperImage) -> Option<ext4_mmp::MmpBlock> {
    if img.fstype != FsType::Ext4 {
        return None;
    }
    let fd = rustix::fs::open(&img.path, OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK, Mode::empty()).ok()?;
    ext4_mmp::read(&fd)
}

fn mmp_holder(b: &ext4_mmp::MmpBlock) -> String {
    let age = crate::store::now_secs().saturating_sub(b.time);
    format!("node {:?} (device {}, MMP block updated {age} s ago)", b.node, b.device)
}

/// A multi-mount protected image whose last writer did not unmount
/// cleanly makes the kernel wait two update intervals before it mounts:
/// say why the mount pauses.
fn note_unclean_mmp(img: &UpperImage) {
    // Only for -v: reading the block costs round trips to a file server.
    if !log::log_enabled!(log::Level::Info) {
        return;
    }
    if let Some(b) = mmp_of(img).filter(|b| b.state() == MmpState::Active) {
        log::info!(
            "upper image {}: multi-mount protection: last used by {} without a clean unmount; the kernel checks for {} s that no node still writes it",
            img.path.display(),
            mmp_holder(&b),
            2 * u64::from(b.interval.max(5)) + 1
        );
    }
}

/// What a failed mount of the upper's filesystem means: EBUSY from an ext4
/// image with multi-mount protection is another node writing it (the lock
/// service did not tell us: a server restart lost the lock, or the
/// filesystem does not pass locks between nodes).
pub fn explain_mount_failure(img: &UpperImage, e: Error) -> Error {
    if e.errno() != Some(Errno::BUSY) {
        return e;
    }
    match mmp_of(img) {
        Some(b) if b.state() == MmpState::Fsck => Error::InUse(format!(
            "upper image {}: e2fsck is running on it (or was killed: run e2fsck on the image, or `tune2fs -f -E clear_mmp`): {e}",
            img.path.display()
        )),
        Some(b) => Error::InUse(format!(
            "upper image {}: already mounted read-write on another node: ext4 multi-mount protection refused it, last update by {}: {e}",
            img.path.display(),
            mmp_holder(&b)
        )),
        None => e,
    }
}

fn where_in_use(img: &UpperImage) -> String {
    let mounts = mountinfo::read().unwrap_or_default();
    let recs = crate::mount::state::live(&mounts);
    let hit = recs.iter().find(|r| r.upper.as_ref().and_then(|u| u.image.as_deref()) == Some(img.path.as_path()));
    match (hit, mmp_of(img)) {
        (Some(r), _) => format!(" at {} (source {})", r.target.display(), r.source),
        (None, Some(b)) if b.state() == MmpState::Active => {
            format!(" by another process or node (it holds the lock; multi-mount protection names {})", mmp_holder(&b))
        }
        (None, _) => " by another process or node (it holds the lock)".into(),
    }
}

/// Make sure the upper filesystem has its `upper` and `work` directories.
pub fn ensure_dirs(root: impl AsFd, what: &Path) -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = Vec::new();
    for d in ["upper", "work"] {
        match rustix::fs::mkdirat(&root, d, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(Error::sys(format!("create {d} directory in upper"), what, e)),
        }
        let fd = rustix::fs::openat(&root, d, OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| Error::sys(format!("open {d} directory in upper"), what, e))?;
        fds.push(fd);
    }
    let work = fds.pop().expect("two");
    let upper = fds.pop().expect("two");
    Ok((upper, work))
}

