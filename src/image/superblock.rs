//! Superblocks, read from an image file. Which filesystem an image holds,
//! by its superblock magic: for `verify`, and to explain a layer mount the
//! kernel refused (an image replaced by one of another format). And the
//! few fields of an ext4 superblock that `mmp` needs to find the MMP
//! block. Read only on those paths, never on a mount that works: on shared
//! storage each read is a round trip. Layout: the kernel's
//! Documentation/filesystems/ext4/super.rst.

use std::os::fd::AsFd;

use crate::store::FsType;

/// Bytes from the start of an image that hold every magic we know.
const HEAD: usize = 1084;

/// The ext4 superblock is 1024 bytes at byte 1024.
const EXT4_SB_OFFSET: usize = 1024;
const EXT4_SB_LEN: usize = 1024;
/// `s_magic`, and where in the superblock it is.
const EXT4_MAGIC: [u8; 2] = 0xEF53u16.to_le_bytes();
const EXT4_MAGIC_AT: usize = 0x38;

/// Where each filesystem keeps its magic, and what it is.
fn magic(fstype: FsType) -> (usize, &'static [u8]) {
    match fstype {
        FsType::Ext4 => (EXT4_SB_OFFSET + EXT4_MAGIC_AT, &EXT4_MAGIC),
        FsType::Xfs => (0, b"XFSB"),
        FsType::Erofs => (1024, &[0xE2, 0xE1, 0xF5, 0xE0]),
    }
}

/// Does `head` (the first bytes of an image) carry `fstype`'s magic?
pub fn has_magic(head: &[u8], fstype: FsType) -> bool {
    let (at, want) = magic(fstype);
    head.get(at..at + want.len()) == Some(want)
}

/// The filesystem whose magic `head` carries, if any.
pub fn detect(head: &[u8]) -> Option<FsType> {
    [FsType::Ext4, FsType::Xfs, FsType::Erofs].into_iter().find(|&f| has_magic(head, f))
}

/// Whether an erofs image's superblock (in `head`, 1152 bytes at least)
/// declares LZ4-compressed inodes: the `ZERO_PADDING` incompat bit sharedloop's writer sets only
/// when some file was kept compressed (mkfs.erofs sets it on every image
/// it writes with `-z lz4`).
pub fn erofs_lz4(head: &[u8]) -> bool {
    has_magic(head, FsType::Erofs)
        && head.get(1024 + 80..1024 + 84).is_some_and(|b| u32::from_le_bytes(b.try_into().unwrap()) & 0x1 != 0)
}

/// The first bytes of the image open at `fd` (fewer if it is shorter).
pub fn read_head(fd: impl AsFd) -> rustix::io::Result<Vec<u8>> {
    read_at(fd, 0, HEAD)
}

/// `len` bytes at `offset` of the file open at `fd` (fewer at its end).
pub fn read_at(fd: impl AsFd, offset: u64, len: usize) -> rustix::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut n = 0;
    while n < buf.len() {
        match rustix::io::pread(&fd, &mut buf[n..], offset + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    buf.truncate(n);
    Ok(buf)
}

/// The fields of an ext4 superblock that sharedloop reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ext4Super {
    /// `s_log_block_size`: blocks are `1024 << log_block_size` bytes.
    pub log_block_size: u32,
    /// `s_feature_incompat`.
    pub feature_incompat: u32,
    /// `s_mmp_block`: the MMP block's number, with the `mmp` feature.
    pub mmp_block: u64,
}

impl Ext4Super {
    /// The `s_feature_incompat` bit of multi-mount protection.
    pub const INCOMPAT_MMP: u32 = 0x100;
    /// The superblock bytes that hold every field read.
    const LEN: usize = 0x170;

    /// From the superblock's bytes (from its byte 0): None when they are
    /// too few or not ext4.
    pub fn parse(sb: &[u8]) -> Option<Ext4Super> {
        if sb.len() < Self::LEN || sb[EXT4_MAGIC_AT..EXT4_MAGIC_AT + EXT4_MAGIC.len()] != EXT4_MAGIC {
            return None;
        }
        Some(Ext4Super { log_block_size: le32(sb, 0x18), feature_incompat: le32(sb, 0x60), mmp_block: le64(sb, 0x168) })
    }

    /// Bytes per block; None over 64 KiB: not a filesystem we made.
    pub fn block_size(&self) -> Option<u64> {
        (self.log_block_size <= 6).then(|| 1024u64 << self.log_block_size)
    }

    pub fn has_mmp(&self) -> bool {
        self.feature_incompat & Self::INCOMPAT_MMP != 0
    }
}

/// The ext4 superblock of the image open at `fd`; None if it is not ext4.
pub fn read_ext4(fd: impl AsFd) -> rustix::io::Result<Option<Ext4Super>> {
    Ok(Ext4Super::parse(&read_at(fd, EXT4_SB_OFFSET as u64, EXT4_SB_LEN)?))
}

/// Little-endian fields at byte `at` of an on-disk structure.
pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Err saying what the image at `fd` holds unless it is `fstype`.
pub fn check(fd: impl AsFd, fstype: FsType) -> Result<(), String> {
    let head = read_head(fd).map_err(|e| format!("read superblock: {}", crate::error::Errno(e)))?;
    if has_magic(&head, fstype) {
        return Ok(());
    }
    let (at, want) = magic(fstype);
    Err(match detect(&head) {
        Some(other) => format!("the image holds {other}, not {fstype}"),
        None if head.len() < at + want.len() => format!("image too short ({} bytes) for a {fstype} superblock", head.len()),
        None => format!("no {fstype} superblock magic at byte {at}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(at: usize, bytes: &[u8], len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[at..at + bytes.len()].copy_from_slice(bytes);
        v
    }

    #[test]
    fn table() {
        let ext4 = image(1080, &[0x53, 0xEF], HEAD);
        let xfs = image(0, b"XFSB", HEAD);
        let erofs = image(1024, &[0xE2, 0xE1, 0xF5, 0xE0], HEAD);
        let cases: &[(&[u8], Option<FsType>)] =
            &[(&ext4, Some(FsType::Ext4)), (&xfs, Some(FsType::Xfs)), (&erofs, Some(FsType::Erofs)), (&[0u8; HEAD], None), (&[], None), (&ext4[..1081], None)];
        for (head, want) in cases {
            assert_eq!(detect(head), *want, "{} bytes", head.len());
        }
    }

    /// An ext4 superblock's first `len` bytes.
    fn ext4_sb(magic: u16, incompat: u32, log: u32, block: u64, len: usize) -> Vec<u8> {
        let mut s = vec![0u8; EXT4_SB_LEN];
        s[0x38..0x3a].copy_from_slice(&magic.to_le_bytes());
        s[0x60..0x64].copy_from_slice(&incompat.to_le_bytes());
        s[0x18..0x1c].copy_from_slice(&log.to_le_bytes());
        s[0x168..0x170].copy_from_slice(&block.to_le_bytes());
        s.truncate(len);
        s
    }

    #[test]
    fn ext4_superblocks() {
        let fields = |log, incompat, mmp| Some(Ext4Super { log_block_size: log, feature_incompat: incompat, mmp_block: mmp });
        let cases: &[(Vec<u8>, Option<Ext4Super>)] = &[
            (ext4_sb(0xEF53, 0x102, 2, 7986, EXT4_SB_LEN), fields(2, 0x102, 7986)),
            (ext4_sb(0xEF53, 0, 0, 0, 0x170), fields(0, 0, 0)), // just long enough
            (ext4_sb(0xEF53, 0x100, 2, 7986, 0x16f), None),     // short read
            (ext4_sb(0x1234, 0x100, 2, 7986, EXT4_SB_LEN), None), // not ext4
            (ext4_sb(0x53EF, 0x100, 2, 7986, EXT4_SB_LEN), None), // big-endian magic
            (vec![], None),
        ];
        for (i, (sb, want)) in cases.iter().enumerate() {
            assert_eq!(Ext4Super::parse(sb), *want, "case {i}");
        }
        // The magic `detect` looks for is the one `parse` checks.
        let mut head = vec![0u8; EXT4_SB_OFFSET];
        head.extend(ext4_sb(0xEF53, 0, 2, 0, EXT4_SB_LEN));
        assert_eq!((detect(&head), Ext4Super::parse(&head[EXT4_SB_OFFSET..]).is_some()), (Some(FsType::Ext4), true));
    }

    #[test]
    fn ext4_block_sizes_and_mmp() {
        let cases: &[(u32, u32, Option<u64>, bool)] = &[
            (0, 0x100, Some(1024), true),
            (2, 0x102, Some(4096), true),
            (6, 0x2, Some(65536), false),
            (7, 0, None, false),
            (40, 0x100, None, true),
        ];
        for &(log, incompat, size, mmp) in cases {
            let sb = Ext4Super { log_block_size: log, feature_incompat: incompat, mmp_block: 1 };
            assert_eq!((sb.block_size(), sb.has_mmp()), (size, mmp), "log {log}, incompat {incompat:#x}");
        }
    }

    #[test]
    fn reads_stop_at_the_end_of_the_file() {
        let path = std::env::temp_dir().join(format!("sl-superblock-{}", std::process::id()));
        let mut data = vec![0u8; EXT4_SB_OFFSET];
        data.extend(ext4_sb(0xEF53, 0x100, 2, 9, 0x200));
        std::fs::write(&path, &data).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let cases: &[(u64, usize, usize)] = &[(0, HEAD, HEAD), (1500, 100, 36), (1536, 10, 0), (4096, 10, 0)];
        for &(offset, len, got) in cases {
            assert_eq!(read_at(&f, offset, len).unwrap(), data[data.len().min(offset as usize)..][..got], "{offset}+{len}");
        }
        assert_eq!(read_ext4(&f).unwrap(), Some(Ext4Super { log_block_size: 2, feature_incompat: 0x100, mmp_block: 9 }));
        std::fs::write(&path, &data[..1200]).unwrap();
        assert_eq!(read_ext4(std::fs::File::open(&path).unwrap()).unwrap(), None, "short");
        std::fs::remove_file(&path).unwrap();
    }
}
