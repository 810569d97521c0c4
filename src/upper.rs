//! The writable upper layer: an image file (found or created, locked,
//! attached read-write) or a throw-away tmpfs.
//!
//! One writer at a time: an OFD write lock is taken on the very open file
//! description handed to the loop device, so it is held exactly as long as
//! the device is attached, needs no daemon, and (on NFSv4, Lustre, GPFS
//! with locking) is seen by other nodes too.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::ids::Name;
use crate::mountinfo;
use crate::store::{FsType, Store, hostname, open_beneath, unique_suffix};
use crate::sys;

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
        return Err(Error::Store(format!("upper image {}: not a regular file", path.display())));
    }
    let fstype = probe_fstype(&fd, &path)?;
    Ok(UpperImage { path, fd, fstype, created })
}

/// Make a sparse image with a filesystem at a temporary name beside
/// `dest`, then rename it into place without replacing: if a concurrent
/// mount created it first, theirs is used (and its lock decides).
fn create_image(dest: &Path, opts: &CreateOptions) -> Result<UpperImage> {
    let dir = dest.parent().unwrap_or(Path::new("/"));
    // Say which directory is missing rather than naming our temporary file.
    if let Err(e) = std::fs::metadata(dir) {
        return Err(Error::io("directory for the upper image", dir, &e));
    }
    let base = dest.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{base}.tmp.{}.{}.{}", hostname(), std::process::id(), unique_suffix()));
    let mut guard = TempFile(Some(tmp.clone()));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| Error::io("create upper image", &tmp, &e))?;
    f.set_len(opts.size).map_err(|e| Error::io("size upper image", &tmp, &e))?;
    drop(f);
    mkfs(&tmp, opts.fstype)?;
    match rustix::fs::renameat_with(
        rustix::fs::CWD,
        &tmp,
        rustix::fs::CWD,
        dest,
        rustix::fs::RenameFlags::NOREPLACE,
    ) {
        Ok(()) => {
            guard.0 = None; // renamed into place: nothing to remove
            let fd = rustix::fs::open(dest, OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW, Mode::empty())
                .map_err(|e| Error::sys("open upper image", dest, e))?;
            finish_open(dest.to_path_buf(), fd, true)
        }
        Err(Errno::EXIST) => {
            drop(guard);
            let fd = rustix::fs::open(dest, OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW, Mode::empty())
                .map_err(|e| Error::sys("open upper image", dest, e))?;
            finish_open(dest.to_path_buf(), fd, false)
        }
        Err(e) => Err(Error::sys("create upper image", dest, e)),
    }
}

fn mkfs(image: &Path, fstype: FsType) -> Result<()> {
    let mut cmd = match fstype {
        FsType::Ext4 => {
            let mut c = Command::new(tool("mkfs.ext4"));
            c.args(["-q", "-F", "-m", "0", "-L", "sl-upper", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"]);
            c
        }
        FsType::Xfs => {
            let mut c = Command::new(tool("mkfs.xfs"));
            c.args(["-q", "-f", "-K", "-L", "sl-upper"]);
            c
        }
        FsType::Erofs => return Err(Error::Usage("an upper cannot be erofs (read-only)".into())),
    };
    cmd.arg(image);
    run(cmd, "create upper filesystem")
}

/// mount(8) runs helpers with a sanitized PATH that lacks /sbin: look in
/// the system directories first.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .into_iter()
        .map(String::from)
        .chain(path.split(':').filter(|d| !d.is_empty()).map(String::from))
        .map(|d| Path::new(&d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Run a command, turning failure into an error with its stderr tail.
pub fn run(mut cmd: Command, what: &str) -> Result<()> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("{what}: run"), cmd.get_program(), &e))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = err.lines().rev().take(3).collect();
    Err(Error::Command {
        what: what.into(),
        cmd: shown,
        status: out.status.to_string(),
        stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
    })
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
    Err(Error::Store(format!("upper image {}: no ext4 or xfs filesystem found (corrupt or not an image)", path.display())))
}

/// Take the writer's lock, or say where the upper is in use.
pub fn lock(img: &UpperImage) -> Result<()> {
    match sys::ofd_try_write_lock(img.fd.as_fd()) {
        Ok(()) => Ok(()),
        Err(Errno::AGAIN) | Err(Errno::ACCESS) => Err(Error::InUse(format!(
            "upper image {}: already mounted read-write{}",
            img.path.display(),
            where_in_use(&img.path)
        ))),
        Err(e) => Err(Error::sys("lock upper image", &img.path, e)),
    }
}

fn where_in_use(path: &Path) -> String {
    let mounts = mountinfo::read().unwrap_or_default();
    let recs = crate::state::live(&mounts);
    let hit = recs.iter().find(|r| r.upper.as_ref().and_then(|u| u.image.as_deref()) == Some(path));
    match hit {
        Some(r) => format!(" at {} (source {})", r.target.display(), r.source),
        None => " by another process or node (it holds the lock)".into(),
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

