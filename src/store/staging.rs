//! Node-local staging for `add` and `import`.
//!
//! A layer's unpacked tree and the image built from it are written, read
//! back by mkfs and deleted: on a store on shared storage all of that
//! would cross the network (measured on GlusterFS: 72 s against 10 s
//! locally for a 100 MB image). So the work happens in a [`WorkDir`] on
//! node-local disk: `staging_dir=` in the configuration file or
//! `--staging-dir`, by default `tmp/` of the fallback store (node-local by
//! design). Only the finished `layer.img` goes into a staging directory in
//! the destination store's `tmp/` ([`crate::store::Staging::put_image`]:
//! a rename when both are on one filesystem, else [`copy_sparse`]), and is
//! published from there with one rename.
//!
//! If the default place cannot be used (a read-only or missing fallback
//! directory, say), the work moves to the destination store's own `tmp/`,
//! as before, with a warning; a staging directory that was asked for is
//! never replaced silently: its error is reported.
//!
//! Work directories are named `<label>.<host>.<pid>.<uniq>` like every
//! staging directory (`gc` judges them by that name when they are in a
//! store's `tmp/`), are private (0700: an image's setuid files live in
//! them), and are removed on every way out by their guard.

use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{Mode, OFlags, SeekFrom};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::interrupt::step;
use crate::store::{self, Store};

/// Where `add` and `import` stage their work.
pub struct Workspace<'a> {
    store: &'a Store,
    dir: PathBuf,
    /// Asked for (option or configuration) rather than the default.
    explicit: bool,
    /// The default place failed once: use the store's tmp from then on.
    in_store: AtomicBool,
}

/// A private directory for one piece of work, removed with all it holds
/// when dropped.
pub struct WorkDir {
    pub path: PathBuf,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

impl<'a> Workspace<'a> {
    /// `configured`: `--staging-dir` or `staging_dir=`; `None` for the
    /// default, `tmp/` of the fallback store.
    pub fn new(store: &'a Store, configured: Option<&Path>) -> Workspace<'a> {
        let (dir, explicit) = match configured {
            Some(d) => (d.to_path_buf(), true),
            None => (store.fallback.join("tmp"), false),
        };
        Workspace {
            store,
            dir,
            explicit,
            in_store: AtomicBool::new(false),
        }
    }

    /// The node-local staging directory (whether or not usable).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new work directory `<label>.<host>.<pid>.<uniq>`, mode 0700.
    pub fn create(&self, label: &str) -> Result<WorkDir> {
        if !self.in_store.load(Ordering::Relaxed) {
            match self.create_local(label) {
                Ok(w) => return Ok(w),
                Err(e) if self.explicit => return Err(e.context("staging directory")),
                Err(e) => {
                    log::warn!(
                        "node-local staging unusable ({e}); staging in the store's own tmp/ instead"
                    );
                    self.in_store.store(true, Ordering::Relaxed);
                }
            }
        }
        self.store.with_fallback(|dir, _| {
            let tmp = store::store_subdir(dir, "tmp", 0o700)?;
            make_work_dir(&tmp, &dir.join("tmp"), label)
        })
    }

    fn create_local(&self, label: &str) -> Result<WorkDir> {
        let parent = if self.explicit {
            // The administrator's path, symlinks and all; created private
            // if missing.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(|e| Error::io("create directory", &self.dir, &e))?;
            rustix::fs::open(
                &self.dir,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::sys("open directory", &self.dir, e))?
        } else {
            // tmp/ of the fallback store, as the store opens it: no symlinks.
            store::store_subdir(&self.store.fallback, "tmp", 0o700)?
        };
        make_work_dir(&parent, &self.dir, label)
    }
}

fn make_work_dir(parent: &OwnedFd, parent_path: &Path, label: &str) -> Result<WorkDir> {
    let name = store::temp_name(label);
    let path = parent_path.join(&name);
    rustix::fs::mkdirat(parent, name.as_str(), Mode::from_raw_mode(0o700))
        .map_err(|e| Error::sys("create staging directory", &path, e))?;
    Ok(WorkDir { path })
}

/// Bytes per copy_file_range or read/write call: large enough that a
/// network filesystem sees big writes, small enough that a signal is seen
/// within a fraction of a second.
const CHUNK: usize = 8 << 20;

/// What a copy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes of data copied (holes are not).
    pub data: u64,
    /// Whether copy_file_range did (part of) it.
    pub copy_file_range: bool,
}

/// Copy the regular file `src` to the new file `dst` (which must not
/// exist), keeping its holes: only the data regions SEEK_DATA/SEEK_HOLE
/// report are copied, with copy_file_range where the kernel takes it for
/// these two files (same filesystem type, or NFS/CIFS server side) and
/// read/write otherwise. `dst` gets `src`'s permission bits and is
/// fsynced; its directory is the caller's to sync. A signal
/// (`interrupt::step`) stops it; `dst` is removed on any failure.
pub fn copy_sparse(src: &Path, dst: &Path) -> Result<CopyStats> {
    copy_sparse_with(src, dst, true)
}

fn copy_sparse_with(src: &Path, dst: &Path, try_cfr: bool) -> Result<CopyStats> {
    let input = std::fs::File::open(src).map_err(|e| Error::io("open", src, &e))?;
    let meta = input.metadata().map_err(|e| Error::io("stat", src, &e))?;
    if !meta.is_file() {
        return Err(Error::sys("copy", src, Errno::INVAL));
    }
    let output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| Error::io("create", dst, &e))?;
    let r = copy_data(&input, &output, meta.len(), src, dst, try_cfr).and_then(|stats| {
        output
            .set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o777))
            .and_then(|_| output.sync_all())
            .map_err(|e| Error::io("sync", dst, &e))?;
        Ok(stats)
    });
    if r.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    r
}

fn copy_data(
    input: &std::fs::File,
    output: &std::fs::File,
    len: u64,
    src: &Path,
    dst: &Path,
    try_cfr: bool,
) -> Result<CopyStats> {
    // The whole size first: what is never written stays a hole.
    output
        .set_len(len)
        .map_err(|e| Error::io("size", dst, &e))?;
    let mut stats = CopyStats::default();
    let mut cfr = try_cfr;
    let mut buf: Vec<u8> = Vec::new();
    let mut off = 0u64;
    while off < len {
        let data = match rustix::fs::seek(input, SeekFrom::Data(off)) {
            Ok(d) => d,
            // No data after `off`: the rest is a hole.
            Err(Errno::NXIO) => break,
            // No SEEK_DATA here: all of it is data.
            Err(Errno::INVAL) | Err(Errno::OPNOTSUPP) => off,
            Err(e) => return Err(Error::sys("seek data", src, e)),
        };
        if data >= len {
            break;
        }
        let end = match rustix::fs::seek(input, SeekFrom::Hole(data)) {
            Ok(h) => h.min(len),
            Err(_) => len,
        };
        let mut at = data;
        while at < end {
            step("stage-copy", None)?;
            let want = (end - at).min(CHUNK as u64) as usize;
            let n = if cfr {
                let (mut i, mut o) = (at, at);
                match rustix::fs::copy_file_range(input, Some(&mut i), output, Some(&mut o), want) {
                    Ok(0) => return Err(Error::sys("copy (file shrank?)", src, Errno::NODATA)),
                    Ok(n) => {
                        stats.copy_file_range = true;
                        n
                    }
                    // Not between these files (different filesystem
                    // types, no support): plain reads and writes.
                    Err(Errno::XDEV)
                    | Err(Errno::INVAL)
                    | Err(Errno::OPNOTSUPP)
                    | Err(Errno::NOSYS) => {
                        cfr = false;
                        continue;
                    }
                    Err(e) => return Err(Error::sys(format!("copy to {}", dst.display()), src, e)),
                }
            } else {
                if buf.len() < want {
                    buf.resize(want.min(CHUNK), 0);
                }
                let n = rustix::io::pread(input, &mut buf[..want], at)
                    .map_err(|e| Error::sys("read", src, e))?;
                if n == 0 {
                    return Err(Error::sys("read (file shrank?)", src, Errno::NODATA));
                }
                let mut w = 0;
                while w < n {
                    w += rustix::io::pwrite(output, &buf[w..n], at + w as u64)
                        .map_err(|e| Error::sys("write", dst, e))?;
                }
                n
            };
            at += n as u64;
            stats.data += n as u64;
        }
        off = end;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    struct TestDir(PathBuf);
    impl TestDir {
        fn new(tag: &str) -> TestDir {
            let d = std::env::temp_dir().join(format!(
                "sl-staging-{tag}-{}-{}",
                std::process::id(),
                store::unique_suffix()
            ));
            std::fs::create_dir_all(&d).unwrap();
            TestDir(d)
        }
    }
    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// (offset, length) of each data region, as SEEK_DATA/SEEK_HOLE see it.
    fn data_map(p: &Path) -> Vec<(u64, u64)> {
        let f = std::fs::File::open(p).unwrap();
        let len = f.metadata().unwrap().len();
        let mut out = vec![];
        let mut off = 0;
        while off < len {
            let Ok(d) = rustix::fs::seek(&f, SeekFrom::Data(off)) else {
                break;
            };
            let h = rustix::fs::seek(&f, SeekFrom::Hole(d)).unwrap().min(len);
            out.push((d, h - d));
            off = h;
        }
        out
    }

    #[test]
    fn sparse_copy_keeps_data_holes_and_mode_both_ways() {
        let t = TestDir::new("copy");
        const M: u64 = 1 << 20;
        // (file size, data regions (offset, length)): empty, all hole,
        // data at both ends, a region larger than a chunk, unaligned ends.
        let cases: &[(u64, &[(u64, u64)])] = &[
            (0, &[]),
            (64 * M, &[]),
            (32 * M, &[(0, 4096), (31 * M, M)]),
            (40 * M, &[(3 * M, 20 * M)]),
            (10 * M + 123, &[(M, 5000), (10 * M, 123)]),
        ];
        for (i, (size, regions)) in cases.iter().enumerate() {
            let src = t.0.join(format!("src{i}"));
            let f = std::fs::File::create(&src).unwrap();
            f.set_len(*size).unwrap();
            for (j, (at, n)) in regions.iter().enumerate() {
                let data: Vec<u8> = (0..*n)
                    .map(|k| (k as u8).wrapping_mul(31).wrapping_add(j as u8 + 1))
                    .collect();
                f.write_all_at(&data, *at).unwrap();
            }
            f.set_permissions(std::fs::Permissions::from_mode(0o640))
                .unwrap();
            drop(f);
            for try_cfr in [true, false] {
                let dst = t.0.join(format!("dst{i}-{try_cfr}"));
                let st = copy_sparse_with(&src, &dst, try_cfr).unwrap();
                assert_eq!(
                    std::fs::read(&dst).unwrap(),
                    std::fs::read(&src).unwrap(),
                    "case {i}"
                );
                assert_eq!(
                    data_map(&dst),
                    data_map(&src),
                    "case {i}, copy_file_range {try_cfr}"
                );
                let want: u64 = regions.iter().map(|r| r.1).sum();
                // Data regions are whole blocks: at least what was written.
                assert!(
                    st.data >= want && st.data <= want + 2 * 4096 * regions.len() as u64,
                    "case {i}: {st:?}"
                );
                assert_eq!(st.copy_file_range, try_cfr && want > 0, "case {i}");
                let (ms, md) = (
                    std::fs::metadata(&src).unwrap(),
                    std::fs::metadata(&dst).unwrap(),
                );
                assert_eq!(md.permissions().mode() & 0o777, 0o640);
                assert_eq!(md.blocks(), ms.blocks(), "case {i}: equally sparse");
            }
        }
    }

    #[test]
    fn copy_never_overwrites_and_leaves_nothing_on_failure() {
        let t = TestDir::new("copyfail");
        let src = t.0.join("src");
        std::fs::write(&src, b"data").unwrap();
        let dst = t.0.join("dst");
        std::fs::write(&dst, b"precious").unwrap();
        assert_eq!(
            copy_sparse(&src, &dst).unwrap_err().errno(),
            Some(Errno::EXIST)
        );
        assert_eq!(std::fs::read(&dst).unwrap(), b"precious");
        let e = copy_sparse(&t.0.join("missing"), &t.0.join("out")).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOENT));
        assert!(!t.0.join("out").exists());
        let e = copy_sparse(&t.0, &t.0.join("out")).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::INVAL), "{e}");
        assert!(!t.0.join("out").exists());
    }

    #[test]
    fn workspace_default_explicit_and_unusable() {
        let t = TestDir::new("ws");
        let store = Store::new(t.0.join("root"), t.0.join("fallback"));
        // Default: tmp/ of the fallback store, private, removed on drop.
        let ws = Workspace::new(&store, None);
        let w = ws.create("import-x").unwrap();
        assert_eq!(w.path.parent().unwrap(), t.0.join("fallback/tmp"));
        let name = w.path.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            name.starts_with(&format!(
                "import-x.{}.{}.",
                store::hostname(),
                std::process::id()
            )),
            "{name}"
        );
        assert_eq!(std::fs::metadata(&w.path).unwrap().mode() & 0o777, 0o700);
        assert_eq!(
            std::fs::metadata(t.0.join("fallback/tmp")).unwrap().mode() & 0o777,
            0o700
        );
        std::fs::write(w.path.join("f"), b"x").unwrap();
        let p = w.path.clone();
        drop(w);
        assert!(!p.exists());
        assert!(!t.0.join("root").exists(), "the root is not touched");

        // Explicit, created (private) if missing.
        let mine = t.0.join("scratch/deeper");
        let ws = Workspace::new(&store, Some(&mine));
        let w = ws.create("add-y").unwrap();
        assert_eq!(w.path.parent().unwrap(), mine);
        assert_eq!(std::fs::metadata(&mine).unwrap().mode() & 0o777, 0o700);
        drop(w);
        assert_eq!(std::fs::read_dir(&mine).unwrap().count(), 0);

        // An explicit one that cannot be used is an error naming it.
        std::fs::write(t.0.join("file"), b"").unwrap();
        let bad = t.0.join("file/sub");
        let e = Workspace::new(&store, Some(&bad))
            .create("add-z")
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOTDIR), "{e}");
        assert!(
            e.to_string().starts_with("staging directory: ")
                && e.to_string().contains(&bad.display().to_string()),
            "{e}"
        );

        // The default, unusable (fallback is a file): the store's tmp/.
        let store2 = Store::new(t.0.join("root2"), t.0.join("file"));
        let ws = Workspace::new(&store2, None);
        for _ in 0..2 {
            let w = ws.create("import-q").unwrap();
            assert_eq!(w.path.parent().unwrap(), t.0.join("root2/tmp"));
            assert_eq!(std::fs::metadata(&w.path).unwrap().mode() & 0o777, 0o700);
        }
        assert_eq!(std::fs::read_dir(t.0.join("root2/tmp")).unwrap().count(), 0);
    }
}
