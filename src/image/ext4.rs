//! The ext4 image: mke2fs populates it from the tree (`-d`) with the
//! plan's inode count, UUID and hash seed, and the newest mtime as the
//! build time, so that the same tree gives the same image; no journal and
//! no resize inode, as a read-only image never grows and never replays a
//! journal. debugfs then fixes what mke2fs gets wrong: the top directory,
//! and sub-second mtimes, which `mke2fs -d` drops (it copies whole
//! seconds). Each inode's `mtime_extra` (nanoseconds << 2 | epoch bits)
//! is set through debugfs by inode number, the numbers found by reading
//! the image's directories ([`dirs`]), so a name never passes through a
//! debugfs command line and debugfs keeps the inode checksums right. atime
//! and ctime stay as mke2fs leaves them: overlayfs shows a lower file's
//! mtime, and nothing can set a ctime through the kernel.

mod dirs;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::io::Errno;

use super::build::{LABEL, set_size, uuid_from};
use super::size::Plan;
use super::walk;
use crate::command::Cmd;
use crate::error::{Error, Result};

pub(super) fn build(dir: &Path, out: &Path, plan: &Plan) -> Result<()> {
    set_size(out, plan.bytes)?;
    let uuid = uuid_from(&plan.fingerprint[..16]);
    let seed = uuid_from(&plan.fingerprint[16..]);
    let mut cmd = Cmd::new("mkfs.ext4");
    cmd.args([
        "-q", "-F", "-L", LABEL, "-T", "default", "-m", "0", "-b", "4096", "-I", "256",
    ])
    // Read-only images never grow and never replay a journal.
    .args(["-O", "^has_journal,^resize_inode", "-U", &uuid])
    .arg("-E")
    .arg(format!("root_owner=0:0,nodiscard,hash_seed={seed}"))
    .arg("-N")
    .arg(plan.inodes.to_string())
    .arg("-d")
    .arg(dir)
    .arg(out)
    .env("E2FSPROGS_FAKE_TIME", plan.newest.to_string());
    cmd.run("build ext4 image")?;
    let mtimes = mtime_script(dir, out)?;
    fix_ext4(out, plan, &mtimes)
}

/// The root inode's number in every ext4 filesystem.
const ROOT_INO: u32 = 2;

/// `mtime_extra` as ext4 stores it: nanoseconds above two epoch bits that
/// extend the 32-bit seconds field (1901..2446).
fn mtime_extra(sec: i64, nsec: i64) -> u32 {
    let epoch = ((sec - i64::from(sec as i32)) >> 32) & 3;
    ((nsec as u32) << 2) | epoch as u32
}

/// debugfs lines setting every inode's `mtime_extra` to the tree's, found
/// by walking the tree and the image side by side. A path the image lacks
/// is an error naming it (ENOENT): the image would not be the tree.
fn mtime_script(dir: &Path, out: &Path) -> Result<String> {
    let img = dirs::Image::open(out)?;
    let mut inos: HashMap<PathBuf, u32> = HashMap::new();
    let mut done = std::collections::HashSet::new();
    let mut script = String::new();
    walk::walk(dir, |e| {
        let ino = if e.is_root() {
            ROOT_INO
        } else {
            inos.remove(e.rel).ok_or_else(|| Error::sys("find in the built ext4 image", e.path, Errno::NOENT))?
        };
        if e.meta.is_dir() {
            let mut names = img.dir(ino).map_err(|err| err.context(&format!("ext4 directory of {}", e.path.display())))?;
            for c in e.children {
                let child = names
                    .remove(c.as_bytes())
                    .ok_or_else(|| Error::sys("find in the built ext4 image", e.path.join(c), Errno::NOENT))?;
                inos.insert(e.rel.join(c), child);
            }
        }
        // Hard links share an inode: set it once.
        if done.insert(ino) {
            let (sec, nsec) = if e.is_root() {
                // The root's seconds are set as fix_ext4 sets them.
                (e.meta.mtime().max(0), if e.meta.mtime() < 0 { 0 } else { e.meta.mtime_nsec() })
            } else {
                (e.meta.mtime(), e.meta.mtime_nsec())
            };
            let _ = writeln!(script, "sif <{ino}> mtime_extra {}", mtime_extra(sec, nsec));
        }
        Ok(())
    })?;
    Ok(script)
}

/// mke2fs 1.47.0 -d neither copies the top directory's owner, mode and
/// mtime nor leaves out lost+found, which would show up in every container
/// using the layer, nor keeps sub-second mtimes; one debugfs run fixes all
/// three (`mtimes` from [`mtime_script`], after the root's seconds so the
/// root's nanoseconds survive).
fn fix_ext4(out: &Path, plan: &Plan, mtimes: &str) -> Result<()> {
    let r = &plan.root;
    let mut script = String::new();
    if !plan.has_lost_found {
        script.push_str("rmdir lost+found\n");
    }
    script.push_str(&format!(
        "sif / mode 0{:o}\nsif / uid {}\nsif / gid {}\nsif / mtime @{}\n",
        0o40000 | r.mode,
        r.uid,
        r.gid,
        r.mtime.max(0)
    ));
    script.push_str(mtimes);
    let mut cmd = Cmd::new("debugfs");
    cmd.args(["-w", "-f", "-"])
        .arg(out)
        .env("E2FSPROGS_FAKE_TIME", plan.newest.to_string());
    let stderr = cmd.run_with_input("fix ext4 image", script.as_bytes())?;
    // debugfs exits 0 even when a command fails; its only normal stderr
    // line is the version banner.
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with("debugfs "))
        .collect();
    if !errors.is_empty() {
        return Err(Error::Command {
            what: "fix ext4 image".into(),
            cmd: cmd.render(),
            status: "errors".into(),
            stderr: errors.join("; "),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;

    use rustix::fs::{AtFlags, CWD, Timespec, Timestamps};

    use super::mtime_extra;
    use crate::image::build_image;
    use crate::image::size::MIB;
    use crate::image::testutil::{TestDir, build_and_check, mount_ro, sample_tree, write};
    use crate::image::walk;
    use crate::store::FsType;

    #[test]
    fn mtime_extra_is_nanoseconds_above_the_epoch_bits() {
        assert_eq!(mtime_extra(1_700_000_000, 123_456_789), 123_456_789 << 2);
        assert_eq!(mtime_extra(-1, 999_999_999), 999_999_999 << 2);
        assert_eq!(mtime_extra(1 << 31, 5), (5 << 2) | 1);
        assert_eq!(mtime_extra((1 << 32) + (1 << 31), 0), 2);
    }

    /// Every inode keeps its own nanosecond mtime: all the kinds of entry
    /// in the sample tree (whiteouts, devices, fifos, symlinks, hard links,
    /// non-UTF-8 and long names) and 20,000 files in one directory (an
    /// htree spread over many blocks); the image passes `e2fsck -fn`.
    #[test]
    fn ext4_image_keeps_nanosecond_mtimes_of_every_inode() {
        let d = TestDir::new("ext4-ns");
        let src = d.join("src");
        std::fs::create_dir(&src).unwrap();
        sample_tree(&src);
        std::fs::create_dir(src.join("many")).unwrap();
        for i in 0..20_000 {
            write(&src.join(format!("many/file with a longer name {i}")), b"");
        }
        let mut paths: Vec<PathBuf> = Vec::new();
        walk::walk(&src, |e| {
            paths.push(e.path.to_path_buf());
            Ok(())
        })
        .unwrap();
        // Children before parents, each its own nanoseconds; a.hard shares
        // a/file.txt's inode and so its time (set last, as file.txt's).
        for (i, p) in paths.iter().enumerate().rev() {
            let ts = Timespec { tv_sec: 1_700_000_000 + i as i64, tv_nsec: 1 + i as i64 * 37_813 };
            let times = Timestamps { last_access: ts, last_modification: ts };
            rustix::fs::utimensat(CWD, p, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
        }
        let img = d.join("layer.img");
        build_image(&src, FsType::Ext4, &img).unwrap();
        let fsck = std::process::Command::new("e2fsck").arg("-fn").arg(&img).output().unwrap();
        assert!(fsck.status.success(), "e2fsck: {}", String::from_utf8_lossy(&fsck.stdout));
        let m = mount_ro(&img, FsType::Ext4, &d.join("mnt"));
        for p in &paths {
            let rel = p.strip_prefix(&src).unwrap();
            let (want, got) = (std::fs::symlink_metadata(p).unwrap(), std::fs::symlink_metadata(m.view.join(rel)).unwrap());
            assert_eq!((got.mtime(), got.mtime_nsec()), (want.mtime(), want.mtime_nsec()), "{}", rel.display());
        }
        m.unmount();
    }

    #[test]
    fn ext4_image_keeps_files_whiteouts_and_opaque_dirs() {
        let size = build_and_check(FsType::Ext4);
        // Tiny tree: the 16 MiB floor plus the inode table, rounded to MiB.
        assert_eq!(size, 17 * MIB);
    }
}
