//! Fixtures for the image tests: scratch directories, a sample tree with
//! every kind of entry a layer can hold, and images mounted read-only in a
//! private mount namespace to compare with the tree they were built from.

use std::ffi::OsStr;
use std::io::BufRead;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps, XattrFlags};

use super::build_image;
use super::walk::sorted_children;
use super::xattr::get_xattr;
use crate::store::{self, FsType};

pub(super) const T: i64 = 1_600_000_000;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A scratch directory, removed with everything in it on drop. Images
/// are only ever mounted in private namespaces, so nothing below it is a
/// mount point in ours.
pub(super) struct TestDir(pub(super) PathBuf);

impl TestDir {
    pub(super) fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!(
            "sharedloop-lb-{tag}.{}.{n}.{}",
            std::process::id(),
            store::unique_suffix()
        ));
        std::fs::create_dir(&p).unwrap();
        TestDir(p)
    }
    pub(super) fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn write(p: &Path, data: &[u8]) {
    std::fs::write(p, data).unwrap();
}

pub(super) fn mknod(p: &Path, ft: FileType, dev: (u32, u32)) {
    let mode = Mode::from_raw_mode(0o644);
    rustix::fs::mknodat(CWD, p, ft, mode, rustix::fs::makedev(dev.0, dev.1)).unwrap();
}

pub(super) fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, XattrFlags::empty()).unwrap();
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    get_xattr(p, name.as_bytes()).unwrap()
}

pub(super) fn set_mtimes(p: &Path, t: i64) {
    let ts = Timespec {
        tv_sec: t,
        tv_nsec: 0,
    };
    let times = Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    rustix::fs::utimensat(CWD, p, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
    if std::fs::symlink_metadata(p).unwrap().is_dir() {
        for c in std::fs::read_dir(p).unwrap() {
            set_mtimes(&c.unwrap().path(), t);
        }
    }
}

fn non_utf8() -> &'static OsStr {
    OsStr::from_bytes(b"caf\xe9")
}

/// Every kind of entry a layer can hold, all mtimes T.
pub(super) fn sample_tree(root: &Path) {
    let a = root.join("a");
    std::fs::create_dir_all(a.join("opq/sub")).unwrap();
    write(&a.join("file.txt"), b"hello");
    lchown(a.join("file.txt"), Some(1234), Some(5678)).unwrap();
    // After chown, which clears set-user-ID.
    std::fs::set_permissions(a.join("file.txt"), std::fs::Permissions::from_mode(0o4755))
        .unwrap();
    set_xattr(&a.join("file.txt"), "user.foo", b"bar");
    std::fs::hard_link(a.join("file.txt"), a.join("hard")).unwrap();
    mknod(&a.join("gone"), FileType::CharacterDevice, (0, 0));
    set_xattr(&a.join("opq"), "trusted.overlay.opaque", b"y");
    write(&a.join("opq/sub/inner"), b"inner");
    symlink("../x//y", a.join("sym")).unwrap();
    symlink("t".repeat(200), a.join("longsym")).unwrap();
    mknod(&a.join("fifo"), FileType::Fifo, (0, 0));
    mknod(&a.join("blk"), FileType::BlockDevice, (7, 200));
    write(&root.join("l".repeat(150)), b"long");
    write(&root.join(non_utf8()), b"x");
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o750)).unwrap();
    set_mtimes(root, T);
}

/// An image mounted read-only in a private mount namespace, seen from
/// here through /proc/PID/root. Closing the shell's stdin unmounts; the
/// loop device has AUTOCLEAR.
pub(super) struct Mounted {
    child: Child,
    pub(super) view: PathBuf,
    img: PathBuf,
}

const PROBE: &str = r#"mount -n -t "$3" -o ro,loop -- "$1" "$2" || exit 1
echo ready
read x
umount -n -- "$2""#;

pub(super) fn mount_ro(img: &Path, fstype: FsType, mnt: &Path) -> Mounted {
    std::fs::create_dir(mnt).unwrap();
    let mut child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", PROBE, "sh"])
        .arg(img)
        .arg(mnt)
        .arg(fstype.as_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let view = PathBuf::from(format!("/proc/{}/root{}", child.id(), mnt.display()));
    let m = Mounted {
        child,
        view,
        img: img.to_path_buf(),
    };
    assert_eq!(line.trim(), "ready", "mount of {} failed", img.display());
    m
}

impl Mounted {
    pub(super) fn unmount(mut self) {
        drop(self.child.stdin.take());
        assert!(self.child.wait().unwrap().success(), "umount failed");
        assert_no_loop(&self.img);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// AUTOCLEAR detaches after the last close, not always at once.
pub(super) fn assert_no_loop(img: &Path) {
    let start = Instant::now();
    loop {
        let out = Command::new("losetup").arg("-j").arg(img).output().unwrap();
        if out.stdout.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "loop device left: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(super) fn check_image_tree(view: &Path, src: &Path) {
    let lstat = |p: &str| std::fs::symlink_metadata(view.join(p)).unwrap();
    assert_eq!(std::fs::read(view.join("a/file.txt")).unwrap(), b"hello");
    let f = lstat("a/file.txt");
    assert_eq!(
        (f.mode() & 0o7777, f.uid(), f.gid(), f.mtime(), f.nlink()),
        (0o4755, 1234, 5678, T, 2)
    );
    assert_eq!(lstat("a/hard").ino(), f.ino());
    let wh = lstat("a/gone");
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "whiteout kept as char 0/0"
    );
    assert_eq!(
        xattr(&view.join("a/opq"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        xattr(&view.join("a/file.txt"), "user.foo").as_deref(),
        Some(&b"bar"[..])
    );
    assert_eq!(
        std::fs::read_link(view.join("a/sym")).unwrap(),
        Path::new("../x//y")
    );
    assert_eq!(
        std::fs::read_link(view.join("a/longsym"))
            .unwrap()
            .as_os_str()
            .len(),
        200
    );
    let blk = lstat("a/blk");
    assert!(blk.file_type().is_block_device());
    assert_eq!(
        (rustix::fs::major(blk.rdev()), rustix::fs::minor(blk.rdev())),
        (7, 200)
    );
    assert!(lstat("a/fifo").file_type().is_fifo());
    assert_eq!(std::fs::read(view.join(non_utf8())).unwrap(), b"x");
    assert_eq!(std::fs::read(view.join("l".repeat(150))).unwrap(), b"long");
    assert_eq!(
        std::fs::read(view.join("a/opq/sub/inner")).unwrap(),
        b"inner"
    );
    let root = std::fs::metadata(view).unwrap();
    assert_eq!((root.mode() & 0o7777, root.uid()), (0o750, 0));
    // Nothing added at the top, lost+found included.
    assert_eq!(
        sorted_children(view).unwrap(),
        sorted_children(src).unwrap()
    );
}

pub(super) fn build_and_check(fstype: FsType) -> u64 {
    let d = TestDir::new(fstype.as_str());
    let src = d.join("src");
    std::fs::create_dir(&src).unwrap();
    sample_tree(&src);
    let img = d.join("layer.img");
    let size = build_image(&src, fstype, &img).unwrap();
    assert_eq!(size, std::fs::metadata(&img).unwrap().len());
    assert_no_loop(&img);
    let m = mount_ro(&img, fstype, &d.join("mnt"));
    check_image_tree(&m.view, &src);
    m.unmount();
    size
}
