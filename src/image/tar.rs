//! The layer's OCI diff ID: sha256 of a deterministic tar stream of the
//! directory, with overlay whiteouts translated back into OCI `.wh.`
//! entries, so the ID is what the image's own diff would be. Entries come
//! in walk order with the fields docker and GNU tar write: GNU long names,
//! PAX `SCHILY.xattr.` records, no user or group names.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::Metadata;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ::tar::{Builder, EntryType, Header};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};

use super::walk::{Entry, walk};
use super::xattr::{Xattrs, read_xattrs};
use crate::error::{Error, Result};
use crate::store::ids::Digest;

const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// tar's name and linkname fields; longer ones need a GNU long-name entry.
const TAR_NAME_MAX: usize = 100;

/// sha256 of a deterministic tar stream of `dir` (the layer's OCI diff ID).
pub fn diff_id_of_dir(dir: &Path) -> Result<Digest> {
    let hw = write_tar(dir, HashWriter(Sha256::new()))?;
    Ok(Digest::from_bytes(hw.0.finalize().into()))
}

fn is_opaque(xattrs: &Xattrs) -> bool {
    xattrs.iter().any(|(n, v)| n == OPAQUE_XATTR && v == b"y")
}

/// The xattrs an OCI layer tar carries; trusted.overlay.* was translated
/// into whiteout entries instead, and other namespaces are host-specific.
fn tar_xattrs(xattrs: &Xattrs) -> Vec<&(Vec<u8>, Vec<u8>)> {
    xattrs
        .iter()
        .filter(|(n, _)| n.starts_with(b"user.") || n == b"security.capability")
        .collect()
}

struct HashWriter(Sha256);

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Write the deterministic tar of `dir` into `out` and give `out` back.
fn write_tar<W: Write>(dir: &Path, out: W) -> Result<W> {
    let mut tw = TarWriter {
        b: Builder::new(out),
        links: HashMap::new(),
    };
    walk(dir, |e| tw.entry(e))?;
    tw.b.into_inner()
        .map_err(|e| Error::io("finish layer tar", dir, &e))
}

struct TarWriter<W: Write> {
    b: Builder<W>,
    /// First path seen for each multiply-linked inode.
    links: HashMap<(u64, u64), PathBuf>,
}

impl<W: Write> TarWriter<W> {
    fn entry(&mut self, e: &Entry) -> Result<()> {
        e.refuse_socket()?;
        if e.is_root() {
            // The top directory has no entry of its own, but can be opaque.
            let x = read_xattrs(e.path)?;
            return if is_opaque(&x) {
                self.opaque_marker(e)
            } else {
                Ok(())
            };
        }
        if e.is_whiteout() {
            return self.whiteout(e);
        }
        let xattrs = read_xattrs(e.path)?;
        self.pax_xattrs(e, &tar_xattrs(&xattrs))?;
        if let Some(first) = e.link_key().and_then(|k| self.first_link(k, e.rel)) {
            return self.hardlink(e, &first);
        }
        let ft = e.meta.file_type();
        if ft.is_dir() {
            self.dir(e)?;
            if is_opaque(&xattrs) {
                self.opaque_marker(e)?;
            }
            Ok(())
        } else if ft.is_file() {
            self.file(e)
        } else if ft.is_symlink() {
            self.symlink(e)
        } else {
            self.special(e)
        }
    }

    /// Some(first path) if this inode was already written.
    fn first_link(&mut self, key: (u64, u64), rel: &Path) -> Option<PathBuf> {
        match self.links.get(&key) {
            Some(p) => Some(p.clone()),
            None => {
                self.links.insert(key, rel.to_path_buf());
                None
            }
        }
    }

    fn dir(&mut self, e: &Entry) -> Result<()> {
        let mut h = header(e.meta, EntryType::Directory);
        // A trailing slash, as docker and GNU tar write directories.
        let mut name = e.rel.as_os_str().to_owned();
        name.push("/");
        self.append(e, &mut h, Path::new(&name), io::empty())
    }

    fn file(&mut self, e: &Entry) -> Result<()> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(e.path)
            .map_err(|err| Error::io("open", e.path, &err))?;
        let now = f
            .metadata()
            .map_err(|err| Error::io("stat", e.path, &err))?;
        if now.ino() != e.meta.ino() || now.dev() != e.meta.dev() {
            return Err(Error::sys(
                "file replaced while reading the layer",
                e.path,
                Errno::AGAIN,
            ));
        }
        let mut h = header(e.meta, EntryType::Regular);
        h.set_size(e.meta.len());
        self.append(
            e,
            &mut h,
            e.rel,
            Exact {
                inner: f,
                left: e.meta.len(),
            },
        )
    }

    fn symlink(&mut self, e: &Entry) -> Result<()> {
        let target =
            std::fs::read_link(e.path).map_err(|err| Error::io("read symlink", e.path, &err))?;
        let mut h = header(e.meta, EntryType::Symlink);
        self.link_name(e, &mut h, target.as_os_str().as_bytes())?;
        self.append(e, &mut h, e.rel, io::empty())
    }

    fn hardlink(&mut self, e: &Entry, first: &Path) -> Result<()> {
        let mut h = header(e.meta, EntryType::Link);
        self.link_name(e, &mut h, first.as_os_str().as_bytes())?;
        self.append(e, &mut h, e.rel, io::empty())
    }

    fn special(&mut self, e: &Entry) -> Result<()> {
        let ft = e.meta.file_type();
        let kind = if ft.is_char_device() {
            EntryType::Char
        } else if ft.is_block_device() {
            EntryType::Block
        } else {
            EntryType::Fifo
        };
        let mut h = header(e.meta, kind);
        if kind != EntryType::Fifo {
            let rdev = e.meta.rdev();
            let io_err = |err: io::Error| Error::io("add to layer tar", e.path, &err);
            h.set_device_major(rustix::fs::major(rdev))
                .map_err(io_err)?;
            h.set_device_minor(rustix::fs::minor(rdev))
                .map_err(io_err)?;
        }
        self.append(e, &mut h, e.rel, io::empty())
    }

    /// An overlay whiteout (char 0/0) is, in OCI terms, an empty regular
    /// file `.wh.NAME` (mode 0600, as docker's overlay differ writes it).
    fn whiteout(&mut self, e: &Entry) -> Result<()> {
        let mut h = header(e.meta, EntryType::Regular);
        h.set_mode(0o600);
        let mut name = OsString::from(WHITEOUT_PREFIX);
        name.push(e.rel.file_name().unwrap_or_default());
        let rel = e.rel.parent().unwrap_or(Path::new("")).join(name);
        self.append(e, &mut h, &rel, io::empty())
    }

    fn opaque_marker(&mut self, e: &Entry) -> Result<()> {
        let mut h = header(e.meta, EntryType::Regular);
        h.set_mode(e.meta.mode() & 0o777);
        self.append(e, &mut h, &e.rel.join(OPAQUE_MARKER), io::empty())
    }

    /// Set the link name byte for byte: the tar crate's set_link_name would
    /// normalise it ("a//b" -> "a/b"), and a symlink target is data.
    fn link_name(&mut self, e: &Entry, h: &mut Header, target: &[u8]) -> Result<()> {
        let io_err = |err: io::Error| Error::io("add to layer tar", e.path, &err);
        if target.len() > TAR_NAME_MAX {
            let mut data = target.to_vec();
            data.push(0);
            let k = gnu_long_header(b'K', data.len() as u64);
            self.b.append(&k, &data[..]).map_err(io_err)?;
        }
        h.set_link_name_literal(&target[..target.len().min(TAR_NAME_MAX)])
            .map_err(io_err)
    }

    /// PAX records `SCHILY.xattr.NAME`, as GNU tar and docker write them.
    fn pax_xattrs(&mut self, e: &Entry, xattrs: &[&(Vec<u8>, Vec<u8>)]) -> Result<()> {
        if xattrs.is_empty() {
            return Ok(());
        }
        let mut data = Vec::new();
        for (name, value) in xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(name);
            pax_record(&mut data, &key, value);
        }
        let mut h = Header::new_ustar();
        h.as_old_mut().name[..14].copy_from_slice(b"././@PaxHeader");
        h.set_entry_type(EntryType::XHeader);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.b
            .append(&h, &data[..])
            .map_err(|err| Error::io("add to layer tar", e.path, &err))
    }

    fn append(&mut self, e: &Entry, h: &mut Header, name: &Path, data: impl Read) -> Result<()> {
        self.b
            .append_data(h, name, data)
            .map_err(|err| Error::io("add to layer tar", e.path, &err))
    }
}

fn header(m: &Metadata, kind: EntryType) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(m.mode() & 0o7777);
    h.set_uid(u64::from(m.uid()));
    h.set_gid(u64::from(m.gid()));
    h.set_mtime(m.mtime().max(0) as u64);
    h.set_size(0);
    h
}

/// Header of a GNU long name ('L') or long link name ('K') entry, the same
/// fields GNU tar writes.
fn gnu_long_header(kind: u8, size: u64) -> Header {
    let mut h = Header::new_gnu();
    let name = b"././@LongLink";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h.set_entry_type(EntryType::new(kind));
    h.set_cksum();
    h
}

/// "LEN key=value\n", where LEN counts the whole record including itself.
/// (Public for the import tests, which write PAX headers of their own.)
pub fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Exactly `left` bytes: a file that shrank after stat would otherwise give
/// a tar whose header disagrees with its data.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while reading",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testutil::*;

    #[test]
    fn pax_records_count_their_own_length() {
        // The length field includes its own digits: 8, 9, then 11 (10 would
        // be wrong once the field itself grows to two digits).
        let cases: &[(&str, &str, &str)] = &[
            ("a", "bcd", "8 a=bcd\n"),
            ("a", "bcde", "9 a=bcde\n"),
            ("a", "bcdef", "11 a=bcdef\n"),
            ("path", &"x".repeat(92), ""),
        ];
        for (k, v, want) in cases {
            let mut out = Vec::new();
            pax_record(&mut out, k.as_bytes(), v.as_bytes());
            let text = String::from_utf8(out.clone()).unwrap();
            let stated: usize = text.split(' ').next().unwrap().parse().unwrap();
            assert_eq!(stated, out.len(), "{text:?}");
            if !want.is_empty() {
                assert_eq!(text, *want);
            }
        }
    }

    struct TarEnt {
        path: Vec<u8>,
        kind: EntryType,
        mode: u32,
        uid: u64,
        link: Option<Vec<u8>>,
        data: Vec<u8>,
        dev: (Option<u32>, Option<u32>),
        xattrs: Vec<(String, Vec<u8>)>,
        uname: Vec<u8>,
    }

    fn tar_of(dir: &Path) -> Vec<TarEnt> {
        let bytes = write_tar(dir, Vec::new()).unwrap();
        let mut ar = tar::Archive::new(&bytes[..]);
        let mut out = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let xattrs = match e.pax_extensions().unwrap() {
                Some(px) => px
                    .map(|x| x.unwrap())
                    .map(|x| (x.key().unwrap().to_string(), x.value_bytes().to_vec()))
                    .collect(),
                None => Vec::new(),
            };
            let h = e.header().clone();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.push(TarEnt {
                path: e.path_bytes().to_vec(),
                kind: h.entry_type(),
                mode: h.mode().unwrap(),
                uid: h.uid().unwrap(),
                link: e.link_name_bytes().map(|l| l.to_vec()),
                data,
                dev: match h.entry_type() {
                    EntryType::Block | EntryType::Char => {
                        (h.device_major().unwrap(), h.device_minor().unwrap())
                    }
                    _ => (None, None),
                },
                xattrs,
                uname: h.username_bytes().unwrap_or_default().to_vec(),
            });
        }
        out
    }

    fn find<'a>(ents: &'a [TarEnt], path: &[u8]) -> &'a TarEnt {
        ents.iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("no entry {}", String::from_utf8_lossy(path)))
    }

    #[test]
    fn diff_id_is_deterministic_and_content_sensitive() {
        let (a, b) = (TestDir::new("det-a"), TestDir::new("det-b"));
        sample_tree(&a.0);
        sample_tree(&b.0);
        let id = diff_id_of_dir(&a.0).unwrap();
        assert_eq!(id, diff_id_of_dir(&b.0).unwrap());
        // The hashing writer sees exactly the tar stream.
        assert_eq!(id, Digest::of_bytes(&write_tar(&a.0, Vec::new()).unwrap()));

        write(&b.join("a/opq/sub/inner"), b"innes");
        set_mtimes(&b.join("a/opq/sub/inner"), T);
        let changed = diff_id_of_dir(&b.0).unwrap();
        assert_ne!(id, changed);
        set_mtimes(&b.join("a/opq/sub/inner"), T + 1);
        assert_ne!(changed, diff_id_of_dir(&b.0).unwrap());
    }

    #[test]
    fn tar_entries_order_names_and_types() {
        let d = TestDir::new("tar");
        sample_tree(&d.0);
        let ents = tar_of(&d.0);
        let long_name = "l".repeat(150);
        let want: Vec<&[u8]> = vec![
            b"a/",
            b"a/blk",
            b"a/fifo",
            b"a/file.txt",
            b"a/.wh.gone",
            b"a/hard",
            b"a/longsym",
            b"a/opq/",
            b"a/opq/.wh..wh..opq",
            b"a/opq/sub/",
            b"a/opq/sub/inner",
            b"a/sym",
            b"caf\xe9",
            long_name.as_bytes(),
        ];
        assert_eq!(
            ents.iter().map(|e| e.path.as_slice()).collect::<Vec<_>>(),
            want
        );
        assert!(ents.iter().all(|e| e.uname.is_empty()));

        let f = find(&ents, b"a/file.txt");
        assert_eq!(
            (f.kind, f.mode, f.uid, f.data.as_slice()),
            (EntryType::Regular, 0o4755, 1234, &b"hello"[..])
        );
        assert_eq!(
            f.xattrs,
            vec![("SCHILY.xattr.user.foo".to_string(), b"bar".to_vec())]
        );
        let h = find(&ents, b"a/hard");
        assert_eq!(
            (h.kind, h.link.as_deref()),
            (EntryType::Link, Some(&b"a/file.txt"[..]))
        );
        let s = find(&ents, b"a/sym");
        assert_eq!(
            (s.kind, s.link.as_deref()),
            (EntryType::Symlink, Some(&b"../x//y"[..]))
        );
        let ls = find(&ents, b"a/longsym");
        assert_eq!(ls.link.as_deref(), Some("t".repeat(200).as_bytes()));
        let blk = find(&ents, b"a/blk");
        assert_eq!(
            (blk.kind, blk.dev),
            (EntryType::Block, (Some(7), Some(200)))
        );
        assert_eq!(find(&ents, b"a/fifo").kind, EntryType::Fifo);
        assert_eq!(find(&ents, b"caf\xe9").data, b"x");
        assert_eq!(find(&ents, long_name.as_bytes()).data, b"long");
        assert_eq!(find(&ents, b"a/").kind, EntryType::Directory);
    }

    #[test]
    fn tar_translates_whiteouts_and_opaque_dirs() {
        let d = TestDir::new("wh");
        sample_tree(&d.0);
        set_xattr(&d.0, "trusted.overlay.opaque", b"y");
        set_mtimes(&d.0, T);
        let ents = tar_of(&d.0);
        // An opaque top directory has no entry, only its marker, first.
        assert_eq!(ents[0].path, b".wh..wh..opq");
        let wh = find(&ents, b"a/.wh.gone");
        assert_eq!(
            (wh.kind, wh.mode, wh.data.len()),
            (EntryType::Regular, 0o600, 0)
        );
        let opq = find(&ents, b"a/opq/.wh..wh..opq");
        assert_eq!(
            (opq.kind, opq.mode, opq.data.len()),
            (EntryType::Regular, 0o755, 0)
        );
        assert!(
            ents.iter().all(|e| e.kind != EntryType::Char),
            "no char 0/0 left"
        );
        assert!(
            ents.iter()
                .all(|e| e.xattrs.iter().all(|(k, _)| !k.contains("trusted.")))
        );
    }
}
