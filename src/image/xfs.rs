//! The xfs image: mkfs.xfs makes an empty filesystem and the tree is
//! copied in through a loop mount that lives only in private mount and
//! PID namespaces (see `build`).

use std::path::{Path, PathBuf};

use super::build::{LABEL, set_size};
use super::size::Plan;
use crate::command::Cmd;
use crate::error::{Error, Result};
use crate::store;

/// mkfs.xfs cannot populate, so the tree is copied in through a mount. The
/// mount lives in a private mount namespace and its loop device has
/// AUTOCLEAR (mount -o loop sets it). The copy runs as init of a new PID
/// namespace: unshare dies with us (as every command we run does), its
/// forked child with it (--kill-child), and with a namespace's init the
/// kernel kills everything in it (mount, cp). So whatever happens to us,
/// even SIGKILL, nothing goes on writing, and the kernel takes the mount
/// and the loop device down with the namespaces. The image gets
/// mkfs.xfs's random UUID: two xfs filesystems with one UUID cannot be
/// mounted at the same time.
pub(super) fn build(dir: &Path, out: &Path, plan: &Plan) -> Result<()> {
    set_size(out, plan.xfs_bytes())?;
    let mut mkfs = Cmd::new("mkfs.xfs");
    mkfs.args(["-q", "-f", "-m", "reflink=0", "-L", LABEL])
        .arg(out);
    mkfs.run("build xfs image")?;
    let mnt = TempDir::create("sharedloop-build")?;
    let src = std::path::absolute(dir).map_err(|e| Error::io("layer directory", dir, &e))?;
    let img = std::path::absolute(out).map_err(|e| Error::io("image", out, &e))?;
    let mut cp = Cmd::new("unshare");
    cp.args([
        "-m",
        "-p",
        "--fork",
        "--kill-child",
        "--propagation",
        "private",
        "sh",
        "-c",
        XFS_COPY_SCRIPT,
        "sh",
    ])
    .arg(&img)
    .arg(&mnt.0)
    .arg(&src);
    cp.run("copy layer into xfs image")?;
    Ok(())
}

/// `--preserve=xattr` after -a makes a lost xattr an error rather than a
/// warning; -n keeps the private mount out of /run/mount/utab.
const XFS_COPY_SCRIPT: &str = r#"mount -n -t xfs -o loop -- "$1" "$2" || exit
rc=0
cp -a --preserve=xattr -- "$3/." "$2/" || rc=$?
umount -n -- "$2" || rc=$?
exit $rc"#;

/// A private (0700) empty directory, removed on drop. Only ever a mount
/// point inside a private namespace, so plain rmdir is enough and can
/// never delete anything below a mount.
struct TempDir(PathBuf);

impl TempDir {
    fn create(tag: &str) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        use std::sync::atomic::{AtomicU64, Ordering};
        // Two builds in one process can start within the clock's resolution.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "{tag}.{}.{}.{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            store::unique_suffix()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| Error::io("create temporary directory", &path, &e))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use crate::image::size::XFS_MIN;
    use crate::image::testutil::build_and_check;
    use crate::store::FsType;

    #[test]
    fn xfs_image_keeps_files_whiteouts_and_opaque_dirs() {
        assert_eq!(build_and_check(FsType::Xfs), XFS_MIN);
    }
}
