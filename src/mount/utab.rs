//! /run/mount/utab, libmount's record of userspace mount options. We write
//! `helper=sharedloop` there so a plain `umount TARGET` runs our helper.
//!
//! Format (one mount a line): `SRC=... TARGET=... ROOT=/ OPTS=a,b`, values
//! escaped as in mountinfo, bytes kept as they are (a target need not be
//! UTF-8). Updates follow libmount: flock() on utab.lock, write a temporary
//! file beside it, rename it over utab. LIBMOUNT_UTAB names another file,
//! as it does for libmount.

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode, OFlags};

use crate::bytes::{mount_escape, mount_unescape, os_from, path_from};
use crate::error::{Errno, Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UtabEntry {
    pub source: OsString,
    pub target: PathBuf,
    pub root: OsString,
    pub options: OsString,
}

impl UtabEntry {
    pub fn parse_line(line: &[u8]) -> Option<UtabEntry> {
        let mut e = UtabEntry { source: OsString::new(), target: PathBuf::new(), root: "/".into(), options: OsString::new() };
        let mut has_target = false;
        for field in line.split(|b| b.is_ascii_whitespace()).filter(|f| !f.is_empty()) {
            let eq = field.iter().position(|&b| b == b'=')?;
            let (k, v) = (&field[..eq], mount_unescape(&field[eq + 1..]));
            match k {
                b"SRC" => e.source = os_from(v),
                b"TARGET" => {
                    e.target = path_from(&v);
                    has_target = true
                }
                b"ROOT" => e.root = os_from(v),
                b"OPTS" => e.options = os_from(v),
                _ => {} // ID=, ATTRS=, BINDSRC= of newer libmount: the line is kept as it is
            }
        }
        has_target.then_some(e)
    }

    pub fn format(&self) -> Vec<u8> {
        let mut o = Vec::new();
        for (k, v) in [
            ("SRC=", self.source.as_bytes()),
            (" TARGET=", self.target.as_os_str().as_bytes()),
            (" ROOT=", self.root.as_bytes()),
            (" OPTS=", self.options.as_bytes()),
        ] {
            o.extend_from_slice(k.as_bytes());
            o.extend_from_slice(&mount_escape(v));
        }
        o
    }

    /// Is this line ours, written by mount.sharedloop?
    pub fn is_sharedloop(&self) -> bool {
        self.options.as_bytes().split(|&b| b == b',').any(|o| o == b"helper=sharedloop")
    }
}

pub fn path() -> PathBuf {
    std::env::var_os("LIBMOUNT_UTAB").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/run/mount/utab"))
}

/// The entries utab holds now (unparsable lines skipped); none if there
/// is no utab.
pub fn entries() -> Result<Vec<UtabEntry>> {
    let utab = path();
    match std::fs::read(&utab) {
        Ok(b) => Ok(b.split(|&c| c == b'\n').filter_map(UtabEntry::parse_line).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(Error::Utab { path: utab, errno: Errno::from_io(&e), undone: false }),
    }
}

/// Take utab.lock, waiting for whoever holds it, but never past a signal:
/// a process stuck with the lock must not make a mount ignore SIGTERM.
fn lock(lock_path: &Path) -> Result<std::os::fd::OwnedFd> {
    let uerr = |e: rustix::io::Errno| Error::Utab { path: lock_path.to_path_buf(), errno: Errno(e), undone: false };
    let lock = rustix::fs::open(lock_path, OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NOFOLLOW, Mode::from_raw_mode(0o644))
        .map_err(uerr)?;
    let mut pause = std::time::Duration::from_micros(100);
    loop {
        match rustix::fs::flock(lock.as_fd(), FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(lock),
            Err(rustix::io::Errno::WOULDBLOCK) => {
                if crate::interrupt::interrupted() {
                    return Err(Error::Interrupted);
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(uerr(e)),
        }
    }
}

/// Rewrite utab under its lock: keep the lines `keep` accepts, then append
/// `add`. Lines we cannot parse are kept as they are.
fn update(keep: impl Fn(&UtabEntry) -> bool, add: Option<&UtabEntry>) -> Result<()> {
    let utab = path();
    let dir = utab.parent().unwrap_or(Path::new("/")).to_path_buf();
    let uerr = |p: &Path, e: rustix::io::Errno| Error::Utab { path: p.to_path_buf(), errno: Errno(e), undone: false };
    std::fs::create_dir_all(&dir).map_err(|e| Error::Utab { path: dir.clone(), errno: Errno::from_io(&e), undone: false })?;
    let mut lock_path = utab.clone().into_os_string();
    lock_path.push(".lock");
    let _lock = lock(Path::new(&lock_path))?;

    let old = match std::fs::read(&utab) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::Utab { path: utab, errno: Errno::from_io(&e), undone: false }),
    };
    let mut out = Vec::new();
    let mut changed = add.is_some();
    for line in old.split(|&b| b == b'\n') {
        match UtabEntry::parse_line(line) {
            Some(e) if !keep(&e) => changed = true,
            _ if line.trim_ascii().is_empty() => {}
            _ => {
                out.extend_from_slice(line);
                out.push(b'\n');
            }
        }
    }
    if !changed {
        return Ok(());
    }
    if let Some(a) = add {
        out.extend_from_slice(&a.format());
        out.push(b'\n');
    }
    let tmp = dir.join(format!(".utab.sharedloop.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Utab { path: tmp, errno: Errno::from_io(&e), undone: false });
    }
    rustix::fs::rename(&tmp, &utab).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        uerr(&utab, e)
    })
    // the lock goes with `_lock`
}

/// Record a mount, replacing any older entry for the same target.
pub fn add(entry: &UtabEntry) -> Result<()> {
    update(|e| e.target != entry.target, Some(entry))
}

/// Forget the entry for `target`.
pub fn remove(target: &Path) -> Result<()> {
    update(|e| e.target != target, None)
}

/// Forget our (`helper=sharedloop`) entry for `target`, if `gone` still
/// says, under the lock, that nothing is mounted there. For entries a
/// killed mount or umount left behind.
pub fn remove_stale(target: &Path, gone: impl FnOnce() -> bool) -> Result<()> {
    // Judged once, under the lock, and only if there is such a line: a
    // mount writes its record before its utab line and takes this lock to
    // write the line, so what `gone` sees cannot be overtaken by a line
    // being written.
    let gone = std::cell::RefCell::new(Some(gone));
    let verdict = std::cell::OnceCell::new();
    update(
        |e| {
            if e.target != target || !e.is_sharedloop() {
                return true;
            }
            !*verdict.get_or_init(|| gone.borrow_mut().take().is_some_and(|f| f()))
        },
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn lines() {
        type Want<'a> = Option<(&'a [u8], &'a [u8], &'a [u8])>;
        let cases: &[(&[u8], Want)] = &[
            (b"SRC=mysrc TARGET=/tmp/exp/t ROOT=/ OPTS=_netdev,helper=sltest", Some((b"mysrc", b"/tmp/exp/t", b"_netdev,helper=sltest"))),
            (b"ID=64 SRC=a TARGET=/m\\040n ROOT=/ OPTS=helper=sharedloop", Some((b"a", b"/m n", b"helper=sharedloop"))),
            (b"SRC=a TARGET=/caf\xe9 ROOT=/ OPTS=comment=\xff", Some((b"a", b"/caf\xe9", b"comment=\xff"))),
            (b"SRC=a", None),
            (b"garbage", None),
        ];
        for (l, want) in cases {
            let got = UtabEntry::parse_line(l);
            assert_eq!(
                got.as_ref().map(|e| (e.source.as_bytes(), e.target.as_os_str().as_bytes(), e.options.as_bytes())),
                *want,
                "{l:?}"
            );
        }
        let e = UtabEntry {
            source: "a b".into(),
            target: path_from(b"/m\\x\xe9"),
            root: "/".into(),
            options: OsString::from_vec(b"helper=sharedloop,comment=\xff".to_vec()),
        };
        assert_eq!(e.format(), b"SRC=a\\040b TARGET=/m\\134x\xe9 ROOT=/ OPTS=helper=sharedloop,comment=\xff");
        assert_eq!(UtabEntry::parse_line(&e.format()), Some(e.clone()));
        assert!(e.is_sharedloop());
        assert!(!UtabEntry { options: "helper=sharedloopx,a".into(), ..e }.is_sharedloop());
    }
}
