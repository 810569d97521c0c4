//! Building an image: what every filesystem shares. The output is a new
//! file, removed again unless the build finishes; it is sized from the
//! plan, and ext4 and xfs builds retry once at twice the size when the
//! estimate was short. The builders themselves are in `ext4`, `xfs` and
//! `erofs`.

use std::path::Path;

use super::size::{Plan, plan};
use super::{erofs, ext4, xfs};
use crate::error::{Error, Result};
use crate::store::FsType;

/// The filesystem label of every layer image.
pub(super) const LABEL: &str = "sl-layer";

/// Build a read-only filesystem image of `dir` at `out` (a new file path that does not exist yet),
/// right-sized for the content. Returns the image size in bytes.
pub fn build_image(dir: &Path, fstype: FsType, out: &Path) -> Result<u64> {
    build_image_compressed(dir, fstype, false, out)
}

/// `build_image`, erofs files LZ4-compressed if `lz4` (the caller has
/// refused it for other formats).
pub fn build_image_compressed(dir: &Path, fstype: FsType, lz4: bool, out: &Path) -> Result<u64> {
    let plan = plan(dir)?;
    build_image_with(dir, fstype, lz4, out, &plan)
}

fn build_image_with(dir: &Path, fstype: FsType, lz4: bool, out: &Path, plan: &Plan) -> Result<u64> {
    let guard = OutFile::create(out)?;
    match fstype {
        FsType::Ext4 => retry_on_no_space(plan, |p| ext4::build(dir, out, p))?,
        FsType::Xfs => retry_on_no_space(plan, |p| xfs::build(dir, out, p))?,
        FsType::Erofs => erofs::build(dir, out, plan, lz4)?,
    }
    let size = std::fs::metadata(out)
        .map_err(|e| Error::io("stat image", out, &e))?
        .len();
    guard.keep();
    Ok(size)
}

/// The estimate is an estimate: one retry at twice the size.
fn retry_on_no_space(plan: &Plan, mut build: impl FnMut(&Plan) -> Result<()>) -> Result<()> {
    match build(plan) {
        Err(e) if is_no_space(&e) => build(&plan.doubled()),
        other => other,
    }
}

fn is_no_space(e: &Error) -> bool {
    match e {
        Error::Command { stderr, .. } => {
            let s = stderr.to_ascii_lowercase();
            ["could not allocate", "no space left", "no free space"]
                .iter()
                .any(|p| s.contains(p))
        }
        _ => false,
    }
}

/// A fresh sparse file of `size` bytes (an earlier attempt's blocks gone).
pub(super) fn set_size(out: &Path, size: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(out)
        .map_err(|e| Error::io("open image", out, &e))?;
    f.set_len(0)
        .and_then(|_| f.set_len(size))
        .map_err(|e| Error::io("size image", out, &e))
}

/// RFC 9562 version 8 (custom) UUID from 16 bytes of a hash.
/// A UUID from 16 bytes of a digest (version and variant bits set, as
/// for a name-based UUID): the same content, the same filesystem UUID.
pub(super) fn uuid_bytes(b: &[u8]) -> [u8; 16] {
    let mut u = [0u8; 16];
    u.copy_from_slice(&b[..16]);
    u[6] = (u[6] & 0x0f) | 0x80;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

pub(super) fn uuid_from(b: &[u8]) -> String {
    let h = hex::encode(uuid_bytes(b));
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The output image, removed on drop unless the build finished.
struct OutFile<'a> {
    path: &'a Path,
    keep: bool,
}

impl<'a> OutFile<'a> {
    fn create(path: &'a Path) -> Result<Self> {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io("create image", path, &e))?;
        Ok(OutFile { path, keep: false })
    }
    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for OutFile<'_> {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustix::io::Errno;

    use super::*;
    use crate::image::diff_id_of_dir;
    use crate::image::size::MIB;
    use crate::image::testutil::*;

    #[test]
    fn ext4_and_erofs_images_are_reproducible() {
        let d = TestDir::new("repro");
        let src = d.join("src");
        std::fs::create_dir(&src).unwrap();
        sample_tree(&src);
        // mke2fs copies atimes, and the first read of a file (relatime)
        // moves its atime; add_layer reads everything for the diff ID first.
        diff_id_of_dir(&src).unwrap();
        for fs in [FsType::Ext4, FsType::Erofs] {
            let one = d.join(format!("one.{fs}"));
            let two = d.join(format!("two.{fs}"));
            build_image(&src, fs, &one).unwrap();
            std::thread::sleep(Duration::from_millis(1100));
            build_image(&src, fs, &two).unwrap();
            assert!(
                std::fs::read(&one).unwrap() == std::fs::read(&two).unwrap(),
                "{fs} images differ"
            );
        }
    }

    #[test]
    fn ext4_retries_once_at_double_size_then_fails_cleanly() {
        let d = TestDir::new("nospace");
        let src = d.join("src");
        std::fs::create_dir(&src).unwrap();
        // Non-zero data: mke2fs skips all-zero blocks.
        write(&src.join("big"), &vec![0xa5; 20 * MIB as usize]);
        let mut p = plan(&src).unwrap();
        assert!(p.bytes >= 20 * MIB + 16 * MIB, "plan {p:?}");

        p.bytes = 16 * MIB;
        let img = d.join("retry.img");
        assert_eq!(
            build_image_with(&src, FsType::Ext4, false, &img, &p).unwrap(),
            32 * MIB
        );

        p.bytes = 8 * MIB;
        let img = d.join("fail.img");
        let e = build_image_with(&src, FsType::Ext4, false, &img, &p).unwrap_err();
        match &e {
            Error::Command {
                cmd,
                stderr,
                status,
                ..
            } => {
                assert!(cmd.starts_with("mkfs.ext4 -q -F"), "{cmd}");
                assert!(stderr.contains("Could not allocate block"), "{stderr}");
                assert_eq!(status, "status 1");
            }
            other => panic!("want Error::Command, got {other:?}"),
        }
        assert!(!img.exists(), "failed image removed");
    }

    #[test]
    fn build_image_never_overwrites() {
        let d = TestDir::new("exists");
        let src = d.join("src");
        std::fs::create_dir(&src).unwrap();
        let out = d.join("layer.img");
        write(&out, b"precious");
        let e = build_image(&src, FsType::Ext4, &out).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::EXIST));
        assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    }
}
