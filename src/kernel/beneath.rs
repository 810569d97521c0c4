//! Opening a path below a directory fd without ever following a symlink
//! or leaving the directory: what the store and the import's trees need
//! from every lookup, since anyone who can write to a shared store can
//! plant a symlink or a `..` in it.
//!
//! On 5.6+ this is one openat2 with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
//! | RESOLVE_NO_MAGICLINKS (| RESOLVE_NO_XDEV). Where openat2 is missing
//! (RHEL 8's 4.18, or a seccomp policy that hides it: ENOSYS) the same
//! guarantees come from a walk one component at a time, each an openat
//! relative to the fd of the one before with O_NOFOLLOW: a symlink
//! anywhere is refused (ELOOP, as openat2 says), `..` and absolute paths
//! are refused (EXDEV), and since every step starts from an fd, renaming
//! things in between cannot send the walk elsewhere. Crossing into
//! another mount is told by the st_dev of each directory on the way (a
//! bind mount of the same filesystem, or of a single file, is not seen;
//! openat2 sees both).

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::kernel::Feature;

/// Whether the lookup may cross into another mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mounts {
    /// Mount points may be crossed (a store whose directories are mounts).
    Cross,
    /// Stay on the directory's mount (RESOLVE_NO_XDEV).
    Stay,
}

/// Open `rel` below `dir` with `flags` (O_CLOEXEC is added), refusing
/// any symlink (ELOOP), `..` or absolute path (EXDEV) and, with
/// `Mounts::Stay`, another mount (EXDEV). A symlink as the last component
/// is opened itself with O_PATH|O_NOFOLLOW, as openat2 does; otherwise
/// refused. An empty `rel` or "." opens `dir` itself.
pub fn open(dir: impl AsFd, rel: impl AsRef<OsStr>, flags: OFlags, mode: Mode, mounts: Mounts) -> Result<OwnedFd, Errno> {
    let rel = rel.as_ref();
    if Feature::Openat2.have() {
        let mut resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        if mounts == Mounts::Stay {
            resolve |= ResolveFlags::NO_XDEV;
        }
        let target = if rel.is_empty() { OsStr::new(".") } else { rel };
        match rustix::fs::openat2(dir.as_fd(), target, flags | OFlags::CLOEXEC, mode, resolve) {
            // Probed present, yet refused (a seccomp policy applied since):
            // the walk gives the same answer.
            Err(Errno::NOSYS) => {}
            r => return r,
        }
    }
    walk(dir.as_fd(), rel.as_bytes(), flags, mode, mounts)
}

/// The components of `rel`, or EXDEV for an absolute path or a `..`.
fn components(rel: &[u8]) -> Result<Vec<&[u8]>, Errno> {
    if rel.first() == Some(&b'/') {
        return Err(Errno::XDEV);
    }
    let parts: Vec<&[u8]> = rel.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".").collect();
    if parts.contains(&&b".."[..]) {
        return Err(Errno::XDEV);
    }
    Ok(parts)
}

fn is_symlink(dir: BorrowedFd<'_>, name: &[u8]) -> bool {
    rustix::fs::statat(dir, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
}

/// EXDEV if the directory `fd` is on another filesystem than `dev`. Only
/// directories are compared: a mount point is a directory, and overlayfs
/// reports a file's st_dev as that of the layer holding it, which differs
/// from its directories' without any mount being crossed.
fn same_mount(fd: impl AsFd, dev: Option<u64>) -> Result<(), Errno> {
    let Some(d) = dev else { return Ok(()) };
    let st = rustix::fs::fstat(fd)?;
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory && st.st_dev != d {
        return Err(Errno::XDEV);
    }
    Ok(())
}

fn walk(dir: BorrowedFd<'_>, rel: &[u8], flags: OFlags, mode: Mode, mounts: Mounts) -> Result<OwnedFd, Errno> {
    let parts = components(rel)?;
    let dev = if mounts == Mounts::Stay { Some(rustix::fs::fstat(dir)?.st_dev) } else { None };
    let Some((last, dirs)) = parts.split_last() else {
        return rustix::fs::openat(dir, ".", flags | OFlags::CLOEXEC, mode);
    };
    let mut held: Option<OwnedFd> = None;
    for name in dirs {
        let at = held.as_ref().map_or(dir, |f| f.as_fd());
        let next = match rustix::fs::openat(at, OsStr::from_bytes(name), OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            // O_NOFOLLOW|O_DIRECTORY on a symlink says ENOTDIR; openat2
            // says ELOOP, and callers tell the two apart.
            Err(Errno::NOTDIR) if is_symlink(at, name) => return Err(Errno::LOOP),
            Err(e) => return Err(e),
        };
        same_mount(&next, dev)?;
        held = Some(next);
    }
    let at = held.as_ref().map_or(dir, |f| f.as_fd());
    let fd = match rustix::fs::openat(at, OsStr::from_bytes(last), flags | OFlags::NOFOLLOW | OFlags::CLOEXEC, mode) {
        Ok(fd) => fd,
        Err(Errno::NOTDIR) if flags.contains(OFlags::DIRECTORY) && is_symlink(at, last) => return Err(Errno::LOOP),
        Err(e) => return Err(e),
    };
    // O_PATH with O_NOFOLLOW (which we add) opens a symlink itself; openat2
    // does that only if the caller asked for O_NOFOLLOW, else ELOOP.
    if flags.contains(OFlags::PATH)
        && !flags.contains(OFlags::NOFOLLOW)
        && FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) == FileType::Symlink
    {
        return Err(Errno::LOOP);
    }
    same_mount(&fd, dev)?;
    Ok(fd)
}

/// Open `rel` below `dir` (an image's root), following the symlinks the
/// image has as long as they stay inside it: RESOLVE_BENEATH refuses any
/// that leads out (an absolute target, or `..` past `dir`) with EXDEV;
/// magic links and other mounts are refused too. Without openat2 every
/// symlink is refused (the walk of `open`): stricter, never looser.
pub fn open_in_tree(dir: impl AsFd, rel: impl AsRef<OsStr>, flags: OFlags) -> Result<OwnedFd, Errno> {
    let rel = rel.as_ref();
    if Feature::Openat2.have() {
        let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV;
        match rustix::fs::openat2(dir.as_fd(), rel, flags | OFlags::CLOEXEC, Mode::empty(), resolve) {
            Err(Errno::NOSYS) => {}
            r => return r,
        }
    }
    open(dir, rel, flags, Mode::empty(), Mounts::Stay)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tree(std::path::PathBuf);
    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tree() -> (Tree, OwnedFd) {
        let d = std::env::temp_dir().join(format!("sl-beneath-{}-{}", std::process::id(), crate::store::unique_suffix()));
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/b/f"), b"x").unwrap();
        std::fs::write(d.join("top"), b"y").unwrap();
        std::os::unix::fs::symlink("b", d.join("a/lnk")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("a/abs")).unwrap();
        std::os::unix::fs::symlink("../..", d.join("a/up")).unwrap();
        let fd = rustix::fs::open(&d, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).unwrap();
        (Tree(d), fd)
    }

    /// The walk gives what openat2 gives, case by case: the fallback is
    /// checked against the call it replaces, on this kernel.
    #[test]
    fn walk_agrees_with_openat2() {
        let (_t, root) = tree();
        let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        let rd = OFlags::RDONLY;
        let cases: &[(&str, OFlags, Result<(), Errno>)] = &[
            ("a/b/f", rd, Ok(())),
            ("./a//b/./f", rd, Ok(())),
            ("top", rd, Ok(())),
            ("", OFlags::PATH, Ok(())),
            ("a", OFlags::DIRECTORY, Ok(())),
            ("a/lnk/f", rd, Err(Errno::LOOP)),
            ("a/lnk", rd, Err(Errno::LOOP)),
            ("a/lnk", OFlags::DIRECTORY, Err(Errno::LOOP)),
            ("a/abs", rd, Err(Errno::LOOP)),
            ("a/up/x", rd, Err(Errno::LOOP)),
            // O_PATH|O_NOFOLLOW opens the symlink itself, in both; O_PATH
            // alone refuses it.
            ("a/lnk", OFlags::PATH | OFlags::NOFOLLOW, Ok(())),
            ("a/lnk", OFlags::PATH, Err(Errno::LOOP)),
            ("a/abs", OFlags::PATH, Err(Errno::LOOP)),
            ("/etc/passwd", rd, Err(Errno::XDEV)),
            ("../x", rd, Err(Errno::XDEV)),
            ("missing", rd, Err(Errno::NOENT)),
            ("top/x", rd, Err(Errno::NOTDIR)),
        ];
        for (rel, flags, want) in cases {
            let walked = walk(root.as_fd(), rel.as_bytes(), *flags, Mode::empty(), Mounts::Cross).map(|_| ());
            assert_eq!(&walked, want, "walk {rel:?}");
            if Feature::Openat2.have() {
                let t: &str = if rel.is_empty() { "." } else { rel };
                let direct = rustix::fs::openat2(&root, t, *flags | OFlags::CLOEXEC, Mode::empty(), resolve).map(|_| ());
                assert_eq!(&direct, want, "openat2 {rel:?}");
            }
        }
    }

    #[test]
    fn walk_stays_on_its_mount() {
        // /proc is another mount than /: both refuse to enter it.
        let root = rustix::fs::open("/", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).unwrap();
        assert_eq!(walk(root.as_fd(), b"proc/self", OFlags::PATH, Mode::empty(), Mounts::Stay).map(|_| ()), Err(Errno::XDEV));
        assert!(walk(root.as_fd(), b"proc", OFlags::PATH, Mode::empty(), Mounts::Cross).is_ok());
        // The fd of a file below is a file of that tree, whatever the way.
        let (t, fd) = tree();
        let f = walk(fd.as_fd(), b"a/b/f", OFlags::RDONLY, Mode::empty(), Mounts::Stay).unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(f), &mut s).unwrap();
        assert_eq!(s, "x");
        drop(t);
    }
}
