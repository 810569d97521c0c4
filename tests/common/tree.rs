//! Whole trees compared path by path: type, mode, owner, size, content
//! hash, symlink target, device numbers, user.* and security.capability
//! xattrs, file mtimes (to the nanosecond), hardlink groups: the comparison
//! tests/import.rs and tests/registry.rs make.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest as _, Sha256};

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[derive(Debug, PartialEq, Eq)]
pub struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    sha: String,
    link: Vec<u8>,
    rdev: (u32, u32),
    xattrs: Vec<(String, Vec<u8>)>,
    mtime: Option<(i64, i64)>,
}

pub fn xattrs_of(p: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(p, &mut names[..]).unwrap_or(0);
    let mut out = vec![];
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if !(name.starts_with(b"user.") || name == b"security.capability") {
            continue;
        }
        let mut v = vec![0u8; 65536];
        let k = rustix::fs::lgetxattr(p, OsStr::from_bytes(name), &mut v[..]).unwrap();
        v.truncate(k);
        out.push((String::from_utf8_lossy(name).into_owned(), v));
    }
    out.sort();
    out
}

pub struct Tree {
    nodes: BTreeMap<Vec<u8>, Node>,
    links: BTreeSet<Vec<Vec<u8>>>,
}

/// Everything below `root` (the root itself as ""), and the sets of paths
/// that are one inode.
pub fn snapshot(root: &Path) -> Tree {
    let mut nodes = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<Vec<u8>>> = BTreeMap::new();
    let mut stack = vec![Vec::<u8>::new()];
    while let Some(rel) = stack.pop() {
        let p = if rel.is_empty() { root.to_path_buf() } else { root.join(OsStr::from_bytes(&rel)) };
        let m = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "socket"
        };
        let mut n = Node {
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            size: 0,
            sha: String::new(),
            link: vec![],
            rdev: (0, 0),
            xattrs: xattrs_of(&p),
            mtime: None,
        };
        match kind {
            "file" => {
                n.size = m.len();
                n.sha = sha256_hex(&std::fs::read(&p).unwrap());
                // Nanoseconds: every layer format keeps them (ext4 since
                // the mtime_extra pass after mke2fs -d).
                n.mtime = Some((m.mtime(), m.mtime_nsec()));
            }
            "symlink" => {
                n.link = std::fs::read_link(&p).unwrap().into_os_string().into_vec();
                n.mode = 0;
            }
            "char" | "block" => n.rdev = (rustix::fs::major(m.rdev()), rustix::fs::minor(m.rdev())),
            _ => {}
        }
        if kind == "dir" {
            let mut kids: Vec<Vec<u8>> = std::fs::read_dir(&p).unwrap().flatten().map(|e| e.file_name().into_vec()).collect();
            kids.sort();
            for k in kids.into_iter().rev() {
                let mut c = rel.clone();
                if !c.is_empty() {
                    c.push(b'/');
                }
                c.extend_from_slice(&k);
                stack.push(c);
            }
        } else {
            inodes.entry((m.dev(), m.ino())).or_default().push(rel.clone());
        }
        nodes.insert(rel, n);
    }
    let links = inodes.into_values().filter(|v| v.len() > 1).map(|mut v| {
        v.sort();
        v
    }).collect();
    Tree { nodes, links }
}

#[track_caller]
pub fn assert_same_tree(got: &Path, want: &Path) {
    let (g, w) = (snapshot(got), snapshot(want));
    let mut diffs = vec![];
    for (p, wn) in &w.nodes {
        match g.nodes.get(p) {
            None => diffs.push(format!("missing {:?}: {wn:?}", String::from_utf8_lossy(p))),
            Some(gn) if gn != wn => diffs.push(format!("{:?}:\n   got {gn:?}\n  want {wn:?}", String::from_utf8_lossy(p))),
            _ => {}
        }
    }
    for p in g.nodes.keys().filter(|p| !w.nodes.contains_key(*p)) {
        diffs.push(format!("unexpected {:?}", String::from_utf8_lossy(p)));
    }
    if g.links != w.links {
        diffs.push(format!("hardlink groups differ:\n   got {:?}\n  want {:?}", g.links, w.links));
    }
    assert!(diffs.is_empty(), "{} differences between {} and {}:\n{}", diffs.len(), got.display(), want.display(), diffs.join("\n"));
    assert!(w.nodes.len() > 1, "empty reference tree");
}
