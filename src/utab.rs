//! /run/mount/utab, libmount's record of userspace mount options. We write
//! `helper=sharedloop` there so a plain `umount TARGET` runs our helper.
//!
//! Format (one mount a line): `SRC=... TARGET=... ROOT=/ OPTS=a,b`, values
//! escaped as in mountinfo. Updates follow libmount: flock() on utab.lock,
//! write a temporary file beside it, rename it over utab. LIBMOUNT_UTAB
//! names another file, as it does for libmount.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode, OFlags};

use crate::error::{Errno, Error, Result};
use crate::mountinfo::unescape;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UtabEntry {
    pub source: String,
    pub target: String,
    pub root: String,
    pub options: String,
}

pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ' ' => o.push_str("\\040"),
            '\t' => o.push_str("\\011"),
            '\n' => o.push_str("\\012"),
            '\\' => o.push_str("\\134"),
            c => o.push(c),
        }
    }
    o
}

impl UtabEntry {
    pub fn parse_line(line: &str) -> Option<UtabEntry> {
        let mut e = UtabEntry { source: String::new(), target: String::new(), root: "/".into(), options: String::new() };
        let mut has_target = false;
        for field in line.split_whitespace() {
            let (k, v) = field.split_once('=')?;
            match k {
                "SRC" => e.source = unescape(v),
                "TARGET" => {
                    e.target = unescape(v);
                    has_target = true
                }
                "ROOT" => e.root = unescape(v),
                "OPTS" => e.options = unescape(v),
                _ => {} // ID=, ATTRS=, BINDSRC= of newer libmount: kept as text below
            }
        }
        has_target.then_some(e)
    }

    pub fn format(&self) -> String {
        format!(
            "SRC={} TARGET={} ROOT={} OPTS={}",
            escape(&self.source),
            escape(&self.target),
            escape(&self.root),
            escape(&self.options)
        )
    }
}

pub fn path() -> PathBuf {
    std::env::var_os("LIBMOUNT_UTAB").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/run/mount/utab"))
}

/// Rewrite utab under its lock: keep the lines `keep` accepts, then append
/// `add`. Lines we cannot parse are kept as they are.
fn update(keep: impl Fn(&UtabEntry) -> bool, add: Option<&UtabEntry>) -> Result<()> {
    let utab = path();
    let dir = utab.parent().unwrap_or(Path::new("/")).to_path_buf();
    let uerr = |p: &Path, e: rustix::io::Errno| Error::Utab { path: p.to_path_buf(), errno: Errno(e), undone: false };
    std::fs::create_dir_all(&dir).map_err(|e| Error::Utab { path: dir.clone(), errno: Errno::from_io(&e), undone: false })?;
    let lock_path = PathBuf::from(format!("{}.lock", utab.display()));
    let lock = rustix::fs::open(&lock_path, OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC, Mode::from_raw_mode(0o644))
        .map_err(|e| uerr(&lock_path, e))?;
    rustix::fs::flock(lock.as_fd(), FlockOperation::LockExclusive).map_err(|e| uerr(&lock_path, e))?;

    let old = match std::fs::read_to_string(&utab) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::Utab { path: utab, errno: Errno::from_io(&e), undone: false }),
    };
    let mut out = String::new();
    for line in old.lines() {
        match UtabEntry::parse_line(line) {
            Some(e) if !keep(&e) => {}
            _ if line.trim().is_empty() => {}
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if let Some(a) = add {
        out.push_str(&a.format());
        out.push('\n');
    }
    let tmp = dir.join(format!(".utab.sharedloop.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(out.as_bytes())?;
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
    // the lock goes with `lock`
}

/// Record a mount, replacing any older entry for the same target.
pub fn add(entry: &UtabEntry) -> Result<()> {
    update(|e| e.target != entry.target, Some(entry))
}

/// Forget the entry for `target`.
pub fn remove(target: &str) -> Result<()> {
    update(|e| e.target != target, None)
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let cases = [
            (
                "SRC=mysrc TARGET=/tmp/exp/t ROOT=/ OPTS=_netdev,helper=sltest",
                Some(("mysrc", "/tmp/exp/t", "_netdev,helper=sltest")),
            ),
            ("ID=64 SRC=a TARGET=/m\\040n ROOT=/ OPTS=helper=sharedloop", Some(("a", "/m n", "helper=sharedloop"))),
            ("SRC=a", None),
            ("garbage", None),
        ];
        for (l, want) in cases {
            let got = UtabEntry::parse_line(l);
            assert_eq!(
                got.as_ref().map(|e| (e.source.as_str(), e.target.as_str(), e.options.as_str())),
                want,
                "{l:?}"
            );
        }
        let e = UtabEntry { source: "a b".into(), target: "/m\\x".into(), root: "/".into(), options: "helper=sharedloop".into() };
        assert_eq!(e.format(), "SRC=a\\040b TARGET=/m\\134x ROOT=/ OPTS=helper=sharedloop");
        assert_eq!(UtabEntry::parse_line(&e.format()), Some(e));
    }
}
