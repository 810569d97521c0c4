//! The writer against the kernel and fsck.erofs: images built from
//! entry lists covering every case a layer has, checked by `fsck.erofs`,
//! mounted read-only in a private mount namespace (testutil) and compared
//! path by path with what was given; bad entries refused; builds
//! reproducible; and a timing against mkfs.erofs, printed.

#![allow(clippy::type_complexity)] // the tables of cases

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::*;
use crate::image::testutil::{TestDir, assert_no_loop, mount_ro};
use crate::image::xattr::read_xattrs;
use crate::store::FsType;

const T: i64 = 1_700_000_000;
const UUID: [u8; 16] = *b"sharedloop-erofs";

#[derive(Clone, Debug)]
enum Content {
    Bytes(Vec<u8>),
    /// Zeros with a few marks: large sparse files without storing them.
    Pattern {
        size: u64,
        marks: Vec<(u64, Vec<u8>)>,
    },
    Path(PathBuf),
}

#[derive(Clone, Debug)]
enum SKind {
    Dir,
    File(Content),
    Symlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
    Socket,
    Link(Vec<u8>),
}

#[derive(Clone, Debug)]
struct Spec {
    path: Vec<u8>,
    kind: SKind,
    meta: Meta,
}

struct PatternReader {
    pos: u64,
    size: u64,
    marks: Vec<(u64, Vec<u8>)>,
}

impl Read for PatternReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.size - self.pos) as usize;
        let buf = &mut buf[..n];
        buf.fill(0);
        let end = self.pos + n as u64;
        for (at, m) in &self.marks {
            for (i, b) in m.iter().enumerate() {
                let o = at + i as u64;
                if o >= self.pos && o < end {
                    buf[(o - self.pos) as usize] = *b;
                }
            }
        }
        self.pos = end;
        Ok(n)
    }
}

fn content_reader(c: &Content) -> (u64, Box<dyn Read>) {
    match c {
        Content::Bytes(b) => (b.len() as u64, Box::new(std::io::Cursor::new(b.clone()))),
        Content::Pattern { size, marks } => (
            *size,
            Box::new(PatternReader {
                pos: 0,
                size: *size,
                marks: marks.clone(),
            }),
        ),
        Content::Path(p) => {
            let f = std::fs::File::open(p).unwrap();
            (
                f.metadata().unwrap().len(),
                Box::new(std::io::BufReader::new(f)),
            )
        }
    }
}

fn meta(mode: u32, i: u32) -> Meta {
    Meta {
        mode,
        uid: if i.is_multiple_of(3) {
            70000 + i
        } else {
            i % 1000
        },
        gid: if i.is_multiple_of(5) { 80000 } else { 0 },
        mtime: T + i64::from(i),
        // Every digit of the nanoseconds counts.
        mtime_nsec: (i.wrapping_mul(7919) + 123_456_789) % 1_000_000_000,
        xattrs: Vec::new(),
    }
}

fn spec(path: &[u8], kind: SKind, meta: Meta) -> Spec {
    Spec {
        path: path.to_vec(),
        kind,
        meta,
    }
}

fn build(specs: &[Spec], out: &Path) -> Result<u64> {
    build_with(specs, out, false)
}

fn build_with(specs: &[Spec], out: &Path, lz4: bool) -> Result<u64> {
    let mut w = Writer::create(out, UUID)?;
    w.compress_lz4(lz4);
    for s in specs {
        let (kind, mut data): (Kind, Box<dyn Read>) = match &s.kind {
            SKind::Dir => (Kind::Dir, Box::new(std::io::empty())),
            SKind::File(c) => {
                let (size, r) = content_reader(c);
                (Kind::File { size }, r)
            }
            SKind::Symlink(t) => (Kind::Symlink(t), Box::new(std::io::empty())),
            SKind::Char(a, b) => (
                Kind::CharDev {
                    major: *a,
                    minor: *b,
                },
                Box::new(std::io::empty()),
            ),
            SKind::Block(a, b) => (
                Kind::BlockDev {
                    major: *a,
                    minor: *b,
                },
                Box::new(std::io::empty()),
            ),
            SKind::Fifo => (Kind::Fifo, Box::new(std::io::empty())),
            SKind::Socket => (Kind::Socket, Box::new(std::io::empty())),
            SKind::Link(t) => (Kind::HardLink(t), Box::new(std::io::empty())),
        };
        w.add(
            &Entry {
                path: &s.path,
                kind,
                meta: s.meta.clone(),
            },
            &mut data,
        )?;
    }
    w.finish()
}

/// A name of `len` bytes, every byte but NUL and '/' used across lengths.
fn odd_name(len: usize) -> Vec<u8> {
    let mut n: Vec<u8> = (0..len)
        .map(|j| match ((len * 7 + j * 13) % 254 + 1) as u8 {
            b'/' => 0xff,
            b => b,
        })
        .collect();
    if n == b"." || n == b".." {
        n[0] = b'x';
    }
    n
}

fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut b = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&perm.to_le_bytes());
        b.extend_from_slice(&id.to_le_bytes());
    }
    b
}

/// Every case a layer has, small enough to build in a second.
fn every_case() -> Vec<Spec> {
    let mut v = Vec::new();
    let mut root = meta(0o755, 1);
    root.uid = 0;
    v.push(spec(b"", SKind::Dir, root));
    // Names of 1 to 255 bytes, odd bytes included, sizes 0..255.
    v.push(spec(b"names", SKind::Dir, meta(0o700, 2)));
    for len in 1..=255usize {
        let mut p = b"names/".to_vec();
        p.extend(odd_name(len));
        let data = (0..len as u8).collect();
        v.push(spec(
            &p,
            SKind::File(Content::Bytes(data)),
            meta(0o644, len as u32),
        ));
    }
    // A directory over many blocks: 10,000 entries of varied name length.
    v.push(spec(b"big", SKind::Dir, meta(0o755, 3)));
    for i in 0..10_000u32 {
        let mut p = format!("big/e{i:05}").into_bytes();
        p.extend(std::iter::repeat_n(b'x', (i % 200) as usize));
        let kind = match i % 50 {
            0 => SKind::Dir,
            7 => SKind::File(Content::Bytes(vec![i as u8; i as usize])),
            _ => SKind::File(Content::Bytes(Vec::new())),
        };
        v.push(spec(
            &p,
            kind,
            meta(if i % 50 == 0 { 0o755 } else { 0o640 }, i),
        ));
    }
    // Hard links, within and across directories, to files and specials.
    v.push(spec(b"links", SKind::Dir, meta(0o755, 4)));
    let pat: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
    v.push(spec(
        b"links/a",
        SKind::File(Content::Bytes(pat)),
        meta(0o4755, 5),
    ));
    v.push(spec(
        b"links/b",
        SKind::Link(b"links/a".to_vec()),
        Meta::default(),
    ));
    v.push(spec(
        b"links/c",
        SKind::Link(b"/links/a".to_vec()),
        Meta::default(),
    ));
    v.push(spec(
        b"big/linked",
        SKind::Link(b"links/a".to_vec()),
        Meta::default(),
    ));
    v.push(spec(b"links/fifo", SKind::Fifo, meta(0o600, 6)));
    v.push(spec(
        b"links/fifo2",
        SKind::Link(b"links/fifo".to_vec()),
        Meta::default(),
    ));
    // Xattrs of every namespace erofs has.
    v.push(spec(b"x", SKind::Dir, meta(0o755, 7)));
    let cap = {
        let mut c = 0x0200_0000u32.to_le_bytes().to_vec(); // VFS_CAP_REVISION_2
        c.extend_from_slice(&[0x00, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        c
    };
    let access = acl(&[
        (0x01, 7, u32::MAX),
        (0x02, 5, 1000),
        (0x04, 5, u32::MAX),
        (0x10, 5, u32::MAX),
        (0x20, 4, u32::MAX),
    ]);
    let mut m = meta(0o755, 8);
    m.xattrs = vec![
        (b"user.a".to_vec(), b"1".to_vec()),
        (b"user.empty".to_vec(), Vec::new()),
        (b"trusted.overlay.redirect".to_vec(), b"/elsewhere".to_vec()),
        (b"security.capability".to_vec(), cap),
        (b"system.posix_acl_access".to_vec(), access.clone()),
    ];
    v.push(spec(
        b"x/file",
        SKind::File(Content::Bytes(b"capable".to_vec())),
        m,
    ));
    let mut m = meta(0o755, 9);
    m.xattrs = vec![
        (b"trusted.overlay.opaque".to_vec(), b"y".to_vec()),
        (b"system.posix_acl_default".to_vec(), access),
        (
            b"user."
                .to_vec()
                .into_iter()
                .chain(odd_name(200).into_iter().filter(|&b| b != 0))
                .collect(),
            b"long name".to_vec(),
        ),
    ];
    v.push(spec(b"x/opaque", SKind::Dir, m));
    let mut m = meta(0o644, 10);
    // The largest value the format holds, and a tail that cannot be inline.
    m.xattrs = vec![(
        b"user.big".to_vec(),
        (0..65535u32).map(|i| (i % 253) as u8).collect(),
    )];
    v.push(spec(
        b"x/bigxattr",
        SKind::File(Content::Bytes(vec![7; 5000])),
        m,
    ));
    let mut m = meta(0o644, 11);
    m.xattrs = (0..100)
        .map(|i| (format!("user.k{i:03}").into_bytes(), vec![i as u8; i]))
        .collect();
    v.push(spec(
        b"x/many",
        SKind::File(Content::Bytes(vec![1; 3000])),
        m,
    ));
    let mut m = meta(0o777, 12);
    m.xattrs = vec![(b"trusted.sym".to_vec(), b"on a symlink".to_vec())];
    v.push(spec(b"x/sym", SKind::Symlink(b"file".to_vec()), m));
    let mut m = meta(0o644, 13);
    m.xattrs = vec![(b"trusted.dev".to_vec(), b"on a device".to_vec())];
    v.push(spec(b"x/dev", SKind::Char(5, 1), m));
    // Devices, whiteouts, fifos, sockets.
    v.push(spec(b"dev", SKind::Dir, meta(0o755, 14)));
    v.push(spec(b"dev/null", SKind::Char(1, 3), meta(0o666, 15)));
    v.push(spec(b"dev/whiteout", SKind::Char(0, 0), meta(0o000, 16)));
    v.push(spec(b"dev/blk", SKind::Block(8, 300), meta(0o660, 17)));
    v.push(spec(
        b"dev/maxdev",
        SKind::Char(0xfff, 0xfffff),
        meta(0o600, 18),
    ));
    v.push(spec(b"dev/fifo", SKind::Fifo, meta(0o644, 19)));
    v.push(spec(b"dev/sock", SKind::Socket, meta(0o755, 20)));
    // Symlinks of 1 to 4095 bytes, around the inline limits.
    v.push(spec(b"syms", SKind::Dir, meta(0o755, 21)));
    for len in [
        1usize, 2, 3, 60, 100, 1000, 2047, 3000, 4000, 4020, 4031, 4032, 4033, 4095,
    ] {
        let t: Vec<u8> = b"ab/.".iter().copied().cycle().take(len).collect();
        v.push(spec(
            format!("syms/l{len}").as_bytes(),
            SKind::Symlink(t),
            meta(0o777, len as u32),
        ));
    }
    // Sizes around block boundaries, an empty file, a negative mtime.
    v.push(spec(b"sizes", SKind::Dir, meta(0o755, 22)));
    for size in [
        0usize,
        1,
        4031,
        4032,
        4033,
        4095,
        4096,
        4097,
        8192,
        1 << 20,
        (1 << 20) + 1,
        3 * 4096 + 100,
    ] {
        let data = (0..size).map(|i| (i % 241) as u8 + 1).collect();
        v.push(spec(
            format!("sizes/s{size}").as_bytes(),
            SKind::File(Content::Bytes(data)),
            meta(0o644, size as u32),
        ));
    }
    let mut m = meta(0o644, 23);
    (m.mtime, m.mtime_nsec) = (-86_399, 999_999_999);
    v.push(spec(
        b"sizes/old",
        SKind::File(Content::Bytes(Vec::new())),
        m,
    ));
    // At the newest mtime (the build time): compact inodes where ids, nlink
    // and size allow, extended ones beside them.
    let newest = |mode, uid| Meta {
        mode,
        uid,
        gid: 7,
        mtime: T + 5_000_000,
        mtime_nsec: 42,
        xattrs: Vec::new(),
    };
    v.push(spec(b"same", SKind::Dir, newest(0o755, 0)));
    for i in 0..20u32 {
        let data = vec![i as u8; (i * 300) as usize];
        v.push(spec(
            format!("same/f{i}").as_bytes(),
            SKind::File(Content::Bytes(data)),
            newest(0o644, i),
        ));
    }
    v.push(spec(
        b"same/link",
        SKind::Link(b"same/f3".to_vec()),
        Meta::default(),
    ));
    v.push(spec(
        b"same/bigid",
        SKind::File(Content::Bytes(b"x".to_vec())),
        newest(0o644, 70000),
    ));
    v.push(spec(
        b"same/sym",
        SKind::Symlink(b"f1".to_vec()),
        newest(0o777, 1),
    ));
    v.push(spec(b"same/dev", SKind::Block(8, 1), newest(0o600, 0)));
    let mut m = newest(0o644, 5);
    m.xattrs = vec![(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())];
    v.push(spec(b"same/sub", SKind::Dir, m));
    // Zero blocks inside data (holes in the image file), a parent never given.
    let mut z = vec![0u8; 5 * 4096];
    z[4096 * 2] = 9;
    v.push(spec(
        b"implicit/deeper/zeros",
        SKind::File(Content::Bytes(z)),
        meta(0o644, 24),
    ));
    v
}

/// fsck.erofs, and with `extract` its `--extract` check of every file's
/// data. erofs-utils 1.5 reads a file's extent in one pread, which fails
/// from 2 GiB on (its own mkfs.erofs images of a 4 GiB file fail alike),
/// so images holding such a file skip that part.
fn run_fsck(img: &Path, extract: bool) {
    let modes: &[&[&str]] = if extract {
        &[&[], &["--extract"]]
    } else {
        &[&[]]
    };
    for args in modes {
        let out = Command::new("fsck.erofs")
            .args(*args)
            .arg(img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fsck.erofs {args:?} {}: {}{}",
            img.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn os(p: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(p))
}

/// Normalized paths as the image holds them.
fn norm(p: &[u8]) -> Vec<u8> {
    split_path(p).unwrap().join(&b'/')
}

fn same_content(view: &Path, c: &Content) {
    let (size, mut want) = content_reader(c);
    let mut got = std::fs::File::open(view).unwrap();
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut done = 0u64;
    while done < size {
        let n = ((size - done) as usize).min(a.len());
        want.read_exact(&mut a[..n]).unwrap();
        got.read_exact(&mut b[..n]).unwrap();
        assert!(
            a[..n] == b[..n],
            "{} differs in bytes {done}..{}",
            view.display(),
            done + n as u64
        );
        done += n as u64;
    }
    assert_eq!(
        got.read(&mut b).unwrap(),
        0,
        "{} longer than {size}",
        view.display()
    );
}

/// Every path of the mounted image against the specs (the last given of
/// a path wins; implicit parents 0755 0:0 mtime 0).
fn compare(view: &Path, specs: &[Spec]) {
    let mut by_path: BTreeMap<Vec<u8>, &Spec> = BTreeMap::new();
    for s in specs {
        by_path.insert(norm(&s.path), s);
    }
    // Implicit parents.
    let implicit = Spec {
        path: Vec::new(),
        kind: SKind::Dir,
        meta: Meta {
            mode: 0o755,
            ..Meta::default()
        },
    };
    let mut all: BTreeSet<Vec<u8>> = BTreeSet::new();
    for p in by_path.keys() {
        let c = split_path(p).unwrap();
        for i in 0..=c.len() {
            all.insert(c[..i].join(&b'/'));
        }
    }
    // Hard-link groups: a link counts as its target.
    let target = |p: &Vec<u8>| -> Vec<u8> {
        match &by_path[p].kind {
            SKind::Link(t) => norm(t),
            _ => p.clone(),
        }
    };
    let mut group_size: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut subdirs: HashMap<Vec<u8>, u64> = HashMap::new();
    for p in &all {
        if let Some(s) = by_path.get(p)
            && !matches!(s.kind, SKind::Dir)
        {
            *group_size.entry(target(p)).or_default() += 1;
            continue;
        }
        if !p.is_empty() {
            let parent = p.rsplitn(2, |&b| b == b'/').nth(1).unwrap_or(b"").to_vec();
            *subdirs.entry(parent).or_default() += 1;
        }
    }
    let mut ino_of: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut group_of: HashMap<u64, Vec<u8>> = HashMap::new();
    for p in &all {
        let vp = view.join(os(p));
        let st = std::fs::symlink_metadata(&vp).unwrap_or_else(|e| panic!("{}: {e}", vp.display()));
        let s = by_path.get(p).map(|s| {
            if let SKind::Link(t) = &s.kind {
                by_path[&norm(t)]
            } else {
                *s
            }
        });
        let s = s.unwrap_or(&implicit);
        let m = &s.meta;
        let what = format!("{:?}", String::from_utf8_lossy(p));
        assert_eq!(
            (
                st.mode() & 0o7777,
                st.uid(),
                st.gid(),
                st.mtime(),
                st.mtime_nsec()
            ),
            (m.mode, m.uid, m.gid, m.mtime, i64::from(m.mtime_nsec)),
            "{what}: mode uid gid mtime"
        );
        let mut want_x = m.xattrs.clone();
        want_x.sort();
        assert_eq!(read_xattrs(&vp).unwrap(), want_x, "{what}: xattrs");
        let ft = st.file_type();
        match &s.kind {
            SKind::Dir => {
                assert!(ft.is_dir(), "{what}");
                assert_eq!(
                    st.nlink(),
                    2 + subdirs.get(p).copied().unwrap_or(0),
                    "{what}: nlink"
                );
            }
            SKind::File(c) => {
                assert!(ft.is_file(), "{what}");
                let (size, _) = content_reader(c);
                assert_eq!(st.size(), size, "{what}: size");
                same_content(&vp, c);
            }
            SKind::Symlink(t) => {
                assert!(ft.is_symlink(), "{what}");
                assert_eq!(
                    std::fs::read_link(&vp).unwrap().as_os_str().as_bytes(),
                    &t[..],
                    "{what}"
                );
                assert_eq!(st.size(), t.len() as u64);
            }
            SKind::Char(a, b) | SKind::Block(a, b) => {
                assert!(
                    if matches!(s.kind, SKind::Char(..)) {
                        ft.is_char_device()
                    } else {
                        ft.is_block_device()
                    },
                    "{what}"
                );
                assert_eq!(
                    (rustix::fs::major(st.rdev()), rustix::fs::minor(st.rdev())),
                    (*a, *b),
                    "{what}: rdev"
                );
            }
            SKind::Fifo => assert!(ft.is_fifo(), "{what}"),
            SKind::Socket => assert!(ft.is_socket(), "{what}"),
            SKind::Link(_) => unreachable!(),
        }
        if !ft.is_dir() {
            let g = target(p);
            assert_eq!(st.nlink(), group_size[&g], "{what}: nlink");
            let ino = *ino_of.entry(g.clone()).or_insert(st.ino());
            assert_eq!(
                st.ino(),
                ino,
                "{what}: not the same inode as the rest of its group"
            );
            let owner = group_of.entry(st.ino()).or_insert(g.clone());
            assert_eq!(*owner, g, "{what}: shares an inode with another group");
        }
    }
    // Nothing more in the image.
    let mut seen = BTreeSet::new();
    list(view, Vec::new(), &mut seen);
    assert_eq!(seen, all, "the image holds exactly the paths given");
}

fn list(dir: &Path, rel: Vec<u8>, out: &mut BTreeSet<Vec<u8>>) {
    out.insert(rel.clone());
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let mut r = rel.clone();
        if !r.is_empty() {
            r.push(b'/');
        }
        r.extend_from_slice(e.file_name().as_bytes());
        if e.file_type().unwrap().is_dir() {
            list(&e.path(), r, out);
        } else {
            out.insert(r);
        }
    }
}

fn build_check(d: &TestDir, name: &str, specs: &[Spec]) -> PathBuf {
    build_check_with(d, name, specs, false)
}

fn build_check_with(d: &TestDir, name: &str, specs: &[Spec], lz4: bool) -> PathBuf {
    let huge = specs
        .iter()
        .any(|s| matches!(&s.kind, SKind::File(c) if content_reader(c).0 >= 2 << 30));
    let img = d.join(format!("{name}.img"));
    let size = build_with(specs, &img, lz4).unwrap();
    assert_eq!(size, std::fs::metadata(&img).unwrap().len());
    assert_eq!(size % 4096, 0);
    run_fsck(&img, !huge);
    let m = mount_ro(&img, FsType::Erofs, &d.join(format!("{name}.mnt")));
    compare(&m.view, specs);
    m.unmount();
    assert_no_loop(&img);
    img
}

#[test]
fn every_kind_of_entry_survives_fsck_and_the_kernel() {
    let d = TestDir::new("erofsw-all");
    let specs = every_case();
    let img = build_check(&d, "all", &specs);
    // Mounted from the file itself (6.12+), as sharedloop mounts erofs
    // layers where it can (mount(8) would set up a loop device): a
    // detached mount, in no namespace's tree, gone with its fd.
    if crate::kernel::Feature::ErofsFromFile.have() {
        use crate::kernel::mountapi::FsContext;
        let fc = FsContext::open("erofs", "test image", &img).unwrap();
        fc.set_string("source", &img).unwrap();
        fc.set_flag("ro").unwrap();
        fc.create().unwrap();
        let mnt = fc
            .mount(rustix::mount::MountAttrFlags::MOUNT_ATTR_RDONLY)
            .unwrap();
        let view = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&mnt)
        ));
        compare(&view, &specs);
        drop(mnt);
        assert_no_loop(&img);
    } else {
        eprintln!("no erofs from a file on this kernel: loop device only");
    }
}

#[test]
fn builds_are_reproducible() {
    let d = TestDir::new("erofsw-repro");
    let specs = every_case();
    let (a, b) = (d.join("a.img"), d.join("b.img"));
    build(&specs, &a).unwrap();
    build(&specs, &b).unwrap();
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "two builds differ"
    );
    // The order entries come in is part of the input (data goes in that
    // order), but the same order is the same image; another UUID is
    // another superblock only.
    let c = d.join("c.img");
    let mut w = Writer::create(&c, *b"another-uuid-16b").unwrap();
    w.add(
        &Entry {
            path: b"f",
            kind: Kind::File { size: 2 },
            meta: Meta::default(),
        },
        &mut &b"hi"[..],
    )
    .unwrap();
    w.finish().unwrap();
    let e = d.join("e.img");
    let mut w = Writer::create(&e, UUID).unwrap();
    w.add(
        &Entry {
            path: b"f",
            kind: Kind::File { size: 2 },
            meta: Meta::default(),
        },
        &mut &b"hi"[..],
    )
    .unwrap();
    w.finish().unwrap();
    let (c, e) = (std::fs::read(&c).unwrap(), std::fs::read(&e).unwrap());
    let diff: Vec<usize> = (0..c.len()).filter(|&i| c[i] != e[i]).collect();
    assert!(
        diff.iter()
            .all(|&i| (1024 + 4..1024 + 8).contains(&i) || (1024 + 48..1024 + 64).contains(&i)),
        "{diff:?}"
    );
}

/// Inodes at the build time take 32 bytes, not 64: 200 empty files fit
/// one metadata block less.
#[test]
fn compact_inodes_where_they_fit() {
    let d = TestDir::new("erofsw-compact");
    let tree = |same: bool| -> Vec<Spec> {
        let root = Meta {
            mode: 0o755,
            mtime: T,
            ..Meta::default()
        };
        let mut v = vec![spec(b"", SKind::Dir, root)];
        for i in 0..200u32 {
            let mut m = meta(0o644, i);
            (m.uid, m.gid) = (i, i);
            (m.mtime, m.mtime_nsec) = if same { (T, 0) } else { (T - 1, i) };
            v.push(spec(
                format!("f{i:03}").as_bytes(),
                SKind::File(Content::Bytes(Vec::new())),
                m,
            ));
        }
        v
    };
    let a = build_check(&d, "compact", &tree(true));
    let b = build_check(&d, "extended", &tree(false));
    let (a, b) = (
        std::fs::metadata(a).unwrap().len(),
        std::fs::metadata(b).unwrap().len(),
    );
    assert!(a + 4096 <= b, "compact {a}, extended {b}");
}

#[test]
fn replaced_paths_and_implicit_parents() {
    let d = TestDir::new("erofsw-replace");
    let specs = vec![
        spec(
            b"a/b/file",
            SKind::File(Content::Bytes(b"first".to_vec())),
            meta(0o644, 1),
        ),
        spec(
            b"a/b/file",
            SKind::File(Content::Bytes(b"second, longer".to_vec())),
            meta(0o600, 2),
        ),
        spec(b"a/b", SKind::Dir, meta(0o711, 3)),
        spec(b"a/x", SKind::Dir, meta(0o755, 4)),
        spec(b"a/x/inner", SKind::Fifo, meta(0o644, 5)),
        spec(b"a/x", SKind::Symlink(b"b".to_vec()), meta(0o777, 6)),
        spec(b"./c/", SKind::Dir, meta(0o700, 7)),
        spec(b"/c//d", SKind::Socket, meta(0o700, 8)),
    ];
    // What is left: a/b/file second, a/b 0711 (kept its child), a/x a
    // symlink (the fifo went with the directory), c and c/d, a implicit.
    let img = d.join("r.img");
    build(&specs, &img).unwrap();
    run_fsck(&img, true);
    let m = mount_ro(&img, FsType::Erofs, &d.join("mnt"));
    let mut want = specs.clone();
    want.retain(|s| s.path != b"a/x/inner" && !(s.path == b"a/x" && matches!(s.kind, SKind::Dir)));
    compare(&m.view, &want);
    m.unmount();
}

#[test]
fn large_sparse_file() {
    let d = TestDir::new("erofsw-sparse");
    const G: u64 = 1 << 30;
    // 5 GiB if the image's filesystem takes files that big (the image is
    // sparse: only the marked blocks take space), else 4 GiB + 1.
    let st = rustix::fs::statvfs(&d.0).unwrap();
    let size = if st.f_bavail * st.f_frsize > 8 * G {
        5 * G + 123
    } else {
        4 * G + 1
    };
    let marks = vec![
        (0, b"HEAD".to_vec()),
        (4 * G - 2, b"WXYZ".to_vec()),
        (size - 3, b"END".to_vec()),
    ];
    let specs = vec![
        spec(b"", SKind::Dir, meta(0o755, 1)),
        spec(
            b"sparse",
            SKind::File(Content::Pattern { size, marks }),
            meta(0o644, 2),
        ),
        // A multiple of the block size: FLAT_PLAIN, no tail.
        spec(
            b"plain",
            SKind::File(Content::Pattern {
                size: 4 * G + 4096,
                marks: vec![(4 * G + 4095, b"P".to_vec())],
            }),
            meta(0o600, 4),
        ),
        spec(
            b"after",
            SKind::File(Content::Bytes(b"after the big one".to_vec())),
            meta(0o644, 3),
        ),
    ];
    let img = build_check(&d, "sparse", &specs);
    let st = std::fs::metadata(&img).unwrap();
    assert!(st.len() > size + 4 * G);
    assert!(
        st.blocks() * 512 < 1 << 20,
        "zero blocks are holes: {} bytes allocated",
        st.blocks() * 512
    );
    eprintln!(
        "sparse: a {size}-byte file, image {} bytes apparent, {} allocated",
        st.len(),
        st.blocks() * 512
    );
}

#[test]
fn bad_entries_are_refused_and_leave_no_image() {
    let d = TestDir::new("erofsw-bad");
    let f = |size| Kind::File { size };
    let m = Meta::default();
    let mx = |name: &[u8], len: usize| Meta {
        xattrs: vec![(name.to_vec(), vec![0; len])],
        ..Meta::default()
    };
    let long = vec![b'n'; 256];
    let cases: Vec<(&[u8], Kind, Meta, &[u8], &str)> = vec![
        (b"a/../b", f(0), m.clone(), b"", "\"..\" component"),
        (b"a\0b", f(0), m.clone(), b"", "NUL"),
        (&long, f(0), m.clone(), b"", "a name of 256 bytes"),
        (
            b"f",
            f(0),
            mx(b"foo.bar", 1),
            b"",
            "namespace erofs cannot hold",
        ),
        (
            b"f",
            f(0),
            mx(b"system.nfs4_acl", 1),
            b"",
            "namespace erofs cannot hold",
        ),
        (
            b"f",
            f(0),
            mx(b"user.v", 65536),
            b"",
            "value of 65536 bytes",
        ),
        (
            b"f",
            f(10),
            m.clone(),
            b"short",
            "content ends before its size",
        ),
        (
            b"s",
            Kind::Symlink(b""),
            m.clone(),
            b"",
            "symlink target of 0 bytes",
        ),
        (
            b"s",
            Kind::Symlink(&[b'a'; 4096]),
            m.clone(),
            b"",
            "symlink target of 4096 bytes",
        ),
        (
            b"h",
            Kind::HardLink(b"nothing"),
            m.clone(),
            b"",
            "not given before",
        ),
        (
            b"h",
            Kind::HardLink(b"dir"),
            m.clone(),
            b"",
            "hard link to directory",
        ),
        (
            b"file/x",
            f(0),
            m.clone(),
            b"",
            "on its path is not a directory",
        ),
        (b"", f(0), m.clone(), b"", "the root must be a directory"),
        (
            b"f",
            f(0),
            Meta {
                mode: 0o100644,
                ..Meta::default()
            },
            b"",
            "bits beyond 07777",
        ),
        (
            b"c",
            Kind::CharDev {
                major: 4096,
                minor: 0,
            },
            m.clone(),
            b"",
            "12-bit major",
        ),
        (
            b"c",
            Kind::BlockDev {
                major: 0,
                minor: 1 << 20,
            },
            m.clone(),
            b"",
            "20-bit minor",
        ),
        (
            b"t",
            Kind::Fifo,
            Meta {
                mtime_nsec: 1_000_000_000,
                ..Meta::default()
            },
            b"",
            "nanoseconds 1000000000",
        ),
    ];
    for (path, kind, meta, data, want) in cases {
        let img = d.join("bad.img");
        let mut w = Writer::create(&img, UUID).unwrap();
        w.add(
            &Entry {
                path: b"dir",
                kind: Kind::Dir,
                meta: Meta::default(),
            },
            &mut std::io::empty(),
        )
        .unwrap();
        w.add(
            &Entry {
                path: b"file",
                kind: f(0),
                meta: Meta::default(),
            },
            &mut std::io::empty(),
        )
        .unwrap();
        let e = w
            .add(&Entry { path, kind, meta }, &mut &data[..])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(want) && e.contains(&img.display().to_string()),
            "{e} (want {want})"
        );
        drop(w);
        assert!(!img.exists(), "an unfinished image is removed");
    }
    // Where the image cannot be made: the path and errno.
    let e = Writer::create(&d.join("no/such/dir.img"), UUID)
        .err()
        .unwrap();
    assert_eq!(e.errno(), Some(rustix::io::Errno::NOENT));
    assert!(e.to_string().contains("no/such/dir.img"), "{e}");
}

/// Random trees: every type, names of 1..255 bytes, xattrs of 0..3000
/// bytes, files around the inline limits, long symlinks, hard links: the
/// best-fit placement and tail packing meet every mix of sizes.
#[test]
fn random_trees() {
    let d = TestDir::new("erofsw-random");
    for seed in 1..=6u64 {
        let mut s = seed;
        let mut rnd = move |n: u64| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) % n
        };
        let mut v = vec![spec(b"", SKind::Dir, meta(0o755, 0))];
        let mut dirs: Vec<Vec<u8>> = vec![Vec::new()];
        let mut files: Vec<Vec<u8>> = Vec::new();
        for i in 0..400u32 {
            let parent = dirs[rnd(dirs.len() as u64) as usize].clone();
            let mut p = parent.clone();
            if !p.is_empty() {
                p.push(b'/');
            }
            // Unique in its directory: the index first.
            let mut name = format!("{i}-").into_bytes();
            let len = 1 + rnd(255) as usize;
            name.extend(
                odd_name(len)
                    .into_iter()
                    .take(len.saturating_sub(name.len())),
            );
            name.truncate(255);
            p.extend(name);
            let mut m = meta([0o644, 0o755, 0o4711, 0o1777, 0][rnd(5) as usize], i);
            let nx = rnd(4);
            for k in 0..nx {
                let vlen = [0, 1, 50, 700, 3000][rnd(5) as usize];
                let ns = ["trusted.", "security.", "trusted.overlay."][rnd(3) as usize];
                m.xattrs
                    .push((format!("{ns}k{k}").into_bytes(), vec![rnd(256) as u8; vlen]));
            }
            let kind = match rnd(10) {
                0 | 1 => {
                    dirs.push(p.clone());
                    SKind::Dir
                }
                2 => SKind::Symlink(
                    b"x/"
                        .iter()
                        .copied()
                        .cycle()
                        .take(1 + rnd(4095) as usize)
                        .collect(),
                ),
                3 if !files.is_empty() => {
                    SKind::Link(files[rnd(files.len() as u64) as usize].clone())
                }
                4 => SKind::Char(rnd(4096) as u32, rnd(1 << 20) as u32),
                5 => [SKind::Fifo, SKind::Socket][rnd(2) as usize].clone(),
                _ => {
                    let size = match rnd(4) {
                        0 => rnd(100),
                        1 => 4096 * rnd(3) + 3900 + rnd(200),
                        _ => rnd(40_000),
                    } as usize;
                    files.push(p.clone());
                    SKind::File(Content::Bytes(
                        (0..size).map(|k| (k as u64 * seed) as u8).collect(),
                    ))
                }
            };
            v.push(spec(&p, kind, m));
        }
        build_check(&d, &format!("r{seed}"), &v);
    }
}

/// A tree on disk as specs (hard links by inode), for mkfs.erofs too.
fn specs_of_tree(root: &Path) -> Vec<Spec> {
    fn walk(root: &Path, rel: &[u8], out: &mut Vec<Spec>, seen: &mut HashMap<u64, Vec<u8>>) {
        let p = root.join(os(rel));
        let st = std::fs::symlink_metadata(&p).unwrap();
        let meta = Meta {
            mode: st.mode() & 0o7777,
            uid: st.uid(),
            gid: st.gid(),
            mtime: st.mtime(),
            mtime_nsec: st.mtime_nsec() as u32,
            xattrs: read_xattrs(&p).unwrap(),
        };
        let ft = st.file_type();
        if !ft.is_dir() && st.nlink() > 1 {
            if let Some(t) = seen.get(&st.ino()) {
                out.push(spec(rel, SKind::Link(t.clone()), Meta::default()));
                return;
            }
            seen.insert(st.ino(), rel.to_vec());
        }
        let dev = (rustix::fs::major(st.rdev()), rustix::fs::minor(st.rdev()));
        let kind = if ft.is_dir() {
            SKind::Dir
        } else if ft.is_file() {
            SKind::File(Content::Path(p.clone()))
        } else if ft.is_symlink() {
            SKind::Symlink(
                std::fs::read_link(&p)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else if ft.is_char_device() {
            SKind::Char(dev.0, dev.1)
        } else if ft.is_block_device() {
            SKind::Block(dev.0, dev.1)
        } else if ft.is_fifo() {
            SKind::Fifo
        } else {
            SKind::Socket
        };
        out.push(spec(rel, kind, meta));
        if ft.is_dir() {
            let mut names: Vec<_> = std::fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names {
                let mut r = rel.to_vec();
                if !r.is_empty() {
                    r.push(b'/');
                }
                r.extend_from_slice(n.as_bytes());
                walk(root, &r, out, seen);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, b"", &mut out, &mut HashMap::new());
    out
}

/// Not a check: the writer and mkfs.erofs (uncompressed) on one tree,
/// timed and printed. The writer's image is also checked as above.
#[test]
fn timing_against_mkfs_erofs() {
    let d = TestDir::new("erofsw-bench");
    let src = d.join("src");
    let mut seed = 12345u64;
    let mut rnd = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed >> 33
    };
    for i in 0..40 {
        let dir = src.join(format!("d{i:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for j in 0..100 {
            let len = (rnd() % 16384) as usize;
            let data: Vec<u8> = (0..len).map(|k| (k as u64 ^ rnd()) as u8).collect();
            std::fs::write(dir.join(format!("file-{j:03}.dat")), data).unwrap();
        }
    }
    let big: Vec<u8> = (0..64u64 << 20)
        .map(|k| ((k * 2654435761) >> 13) as u8)
        .collect();
    std::fs::write(src.join("big.bin"), big).unwrap();
    std::fs::hard_link(src.join("big.bin"), src.join("big.link")).unwrap();
    std::os::unix::fs::symlink("d00/file-000.dat", src.join("sym")).unwrap();
    // Warm the page cache for both.
    let specs = specs_of_tree(&src);
    for s in &specs {
        if let SKind::File(c) = &s.kind {
            std::io::copy(&mut content_reader(c).1, &mut std::io::sink()).unwrap();
        }
    }
    let ours = d.join("ours.img");
    let t = Instant::now();
    let specs = specs_of_tree(&src);
    let size = build(&specs, &ours).unwrap();
    let t_ours = t.elapsed();
    let theirs = d.join("mkfs.img");
    let t = Instant::now();
    let out = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&theirs)
        .arg(&src)
        .output()
        .unwrap();
    let t_mkfs = t.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs_size = std::fs::metadata(&theirs).unwrap().len();
    eprintln!(
        "erofs writer ({} build) vs mkfs.erofs (uncompressed), {} entries, 4,000 files + 64 MiB: writer {:.1} ms, {} bytes; mkfs.erofs {:.1} ms, {} bytes; mkfs/writer time {:.2}x",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        specs.len(),
        t_ours.as_secs_f64() * 1e3,
        size,
        t_mkfs.as_secs_f64() * 1e3,
        theirs_size,
        t_mkfs.as_secs_f64() / t_ours.as_secs_f64()
    );
    run_fsck(&ours, true);
    let m = mount_ro(&ours, FsType::Erofs, &d.join("mnt"));
    compare(&m.view, &specs);
    m.unmount();
}

/// `write_dir` on the tree every builder is checked with, plus what
/// mkfs.erofs 1.5 and mke2fs lose: a 255-byte name, nanoseconds, ids over
/// 65535.
#[test]
fn a_directory_tree_through_write_dir() {
    use crate::image::testutil::{T as ST, check_image_tree, sample_tree, write};
    let d = TestDir::new("erofsw-dir");
    let src = d.join("src");
    std::fs::create_dir(&src).unwrap();
    sample_tree(&src);
    let long = src.join("n".repeat(255));
    write(&long, b"255 bytes of name");
    std::os::unix::fs::lchown(&long, Some(70000), Some(70001)).unwrap();
    let ts = rustix::fs::Timespec {
        tv_sec: ST,
        tv_nsec: 123_456_789,
    };
    let times = rustix::fs::Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    for p in [&long, &src.join("a/file.txt")] {
        rustix::fs::utimensat(
            rustix::fs::CWD,
            p,
            &times,
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }
    let img = d.join("dir.img");
    let size = write_dir(&src, &img, UUID, false).unwrap();
    assert_eq!(size, std::fs::metadata(&img).unwrap().len());
    run_fsck(&img, true);
    let m = mount_ro(&img, FsType::Erofs, &d.join("mnt"));
    check_image_tree(&m.view, &src);
    compare(&m.view, &specs_of_tree(&src));
    m.unmount();
    // A socket is refused, as `add` refuses it, and no image is left.
    let _l = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    let e = write_dir(&src, &img, UUID, false).unwrap_err();
    assert_eq!(e.errno(), Some(rustix::io::Errno::OPNOTSUPP), "{e}");
    assert!(!img.exists());
}

/// Deterministic incompressible bytes (xorshift64).
fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn text_bytes(n: usize) -> Vec<u8> {
    let line = b"sharedloop stores layers as erofs images; lz4 trades CPU for space.\n";
    line.iter().copied().cycle().take(n).collect()
}

/// Every size and kind of content the LZ4 path splits differently, with
/// xattrs and a hard link, and the tree every_case covers.
fn lz4_cases() -> Vec<Spec> {
    let mut specs = every_case();
    let mut i = 0u32;
    let mut file = |name: String, c: Content, specs: &mut Vec<Spec>| {
        i += 1;
        specs.push(spec(
            format!("z/{name}").as_bytes(),
            SKind::File(c),
            meta(0o644, i),
        ));
    };
    specs.push(spec(b"z", SKind::Dir, meta(0o755, 0)));
    for n in [
        1usize,
        4095,
        4096,
        4097,
        8192,
        65535,
        65536,
        65537,
        3 << 20,
        70_001,
    ] {
        file(
            format!("text-{n}"),
            Content::Bytes(text_bytes(n)),
            &mut specs,
        );
        file(format!("zero-{n}"), Content::Bytes(vec![0; n]), &mut specs);
        file(
            format!("rand-{n}"),
            Content::Bytes(random_bytes(n, n as u64)),
            &mut specs,
        );
        // Half random, half text, in 20 KiB runs: some pclusters kept
        // compressed, some plain, in one file.
        let mixed: Vec<u8> = (0..n)
            .map(|k| {
                if (k / 20_000) % 2 == 0 {
                    (k % 7) as u8
                } else {
                    random_bytes(1, k as u64 + 9)[0]
                }
            })
            .collect();
        file(format!("mixed-{n}"), Content::Bytes(mixed), &mut specs);
    }
    file(
        "sparse".into(),
        Content::Pattern {
            size: (8 << 20) + 123,
            marks: vec![(0, text_bytes(100_000)), (5 << 20, b"mark".to_vec())],
        },
        &mut specs,
    );
    let mut x = meta(0o600, 99);
    x.xattrs = vec![(b"user.a".to_vec(), b"value".to_vec())];
    specs.push(spec(
        b"z/xattr-text",
        SKind::File(Content::Bytes(text_bytes(200_000))),
        x.clone(),
    ));
    x.xattrs.push((b"user.bb".to_vec(), b"v2".to_vec()));
    specs.push(spec(
        b"z/xattr2-text",
        SKind::File(Content::Bytes(text_bytes(9000))),
        x,
    ));
    specs.push(spec(
        b"z/link",
        SKind::Link(b"z/text-65537".to_vec()),
        meta(0o644, 0),
    ));
    specs
}

#[test]
fn lz4_images_survive_fsck_and_the_kernel() {
    let d = TestDir::new("erofsw-lz4");
    let specs = lz4_cases();
    let img = build_check_with(&d, "lz4", &specs, true);
    let plain = d.join("plain.img");
    build(&specs, &plain).unwrap();
    let (z, p) = (
        std::fs::metadata(&img).unwrap().len(),
        std::fs::metadata(&plain).unwrap().len(),
    );
    assert!(z < p, "lz4 image {z} bytes, uncompressed {p}");
    let sb = std::fs::read(&img).unwrap();
    assert_eq!(
        le32(&sb, 1024 + 80),
        0x3,
        "incompat: zero padding, big pcluster"
    );
}

#[test]
fn lz4_builds_are_reproducible() {
    let d = TestDir::new("erofsw-lz4-repro");
    let specs = lz4_cases();
    let (a, b) = (d.join("a.img"), d.join("b.img"));
    build_with(&specs, &a, true).unwrap();
    build_with(&specs, &b, true).unwrap();
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "two builds differ"
    );
}

/// Nothing compressible: a FLAT_PLAIN file (its tail in a block of its
/// own, one block more than the inline tail of an uncompressed build at
/// most) and a superblock that asks for no compression support.
#[test]
fn lz4_on_incompressible_files_keeps_a_plain_image() {
    let d = TestDir::new("erofsw-lz4-rand");
    let specs = vec![spec(
        b"r",
        SKind::File(Content::Bytes(random_bytes(300_000, 5))),
        meta(0o644, 1),
    )];
    let (a, b) = (d.join("a.img"), d.join("b.img"));
    build_with(&specs, &a, true).unwrap();
    build(&specs, &b).unwrap();
    let (a, b) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(le32(&a, 1024 + 80), 0, "no incompat feature");
    assert!(a.len() <= b.len() + 4096, "{} against {}", a.len(), b.len());
    build_check_with(&d, "r", &specs, true);
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
