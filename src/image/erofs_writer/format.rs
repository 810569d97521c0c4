//! The erofs on-disk structures this writer emits, as pure encoders (bytes
//! in, bytes out, no I/O), following the kernel's `fs/erofs/erofs_fs.h`:
//! the superblock, the 64-byte extended inode, the inline xattr body and
//! directory blocks. Everything is little-endian.

/// Block size: 4096 bytes, the page size the kernel needs on x86 and arm64
/// for uncompressed images on every version that has erofs.
pub const BLOCK_BITS: u32 = 12;
pub const BLOCK: u64 = 1 << BLOCK_BITS;
/// The superblock sits 1024 bytes into block 0 (room for boot sectors).
pub const SUPER_OFFSET: u64 = 1024;
pub const MAGIC: u32 = 0xE0F5_E1E2;
/// `feature_compat`: the superblock carries a crc32c of block 0 from 1024.
pub const COMPAT_SB_CHKSUM: u32 = 0x1;
/// Inode slots are 32 bytes; a nid is the slot index from `meta_blkaddr`.
pub const SLOT: u64 = 32;
pub const EXTENDED_INODE: usize = 64;
pub const COMPACT_INODE: usize = 32;
pub const XATTR_IBODY_HEADER: usize = 12;
pub const DIRENT: usize = 12;

/// `i_format` data layouts (bits 1..3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Data in consecutive blocks from `raw_blkaddr`, the last one padded.
    FlatPlain = 0,
    /// Full blocks from `raw_blkaddr`, the last partial block right after
    /// the inode and its xattrs (tail packing).
    FlatInline = 2,
    /// Compressed, with one full 8-byte index per 4 KiB lcluster after a
    /// map header (`EROFS_INODE_COMPRESSED_FULL`).
    CompressedFull = 1,
}

/// `feature_incompat` bits a compressed image sets: LZ4 input ends at the
/// end of its pcluster with zeros before it (`ZERO_PADDING`), and a
/// pcluster may span several blocks with the lz4 configuration record
/// after the superblock (`BIG_PCLUSTER`, the same bit as `COMPR_CFGS`).
pub const INCOMPAT_ZERO_PADDING: u32 = 0x1;
pub const INCOMPAT_BIG_PCLUSTER: u32 = 0x2;
/// Logical clusters per pcluster at most: 64 KiB of input, so a pcluster
/// is at most 15 blocks once kept (it must save one).
pub const PCLUSTER_LCLUSTERS: u64 = 16;
/// `z_erofs_map_header.h_advise`: HEAD1 pclusters may span blocks, their
/// block count in the first NONHEAD index.
pub const ADVISE_BIG_PCLUSTER_1: u16 = 0x2;
/// The first NONHEAD index's `delta[0]` holds the pcluster's block count.
pub const LI_D0_CBLKCNT: u16 = 1 << 11;
/// Map header (8 bytes) and the 8 reserved bytes before the first full
/// index (`Z_EROFS_FULL_INDEX_ALIGN`).
pub const ZMAP_HEADER: usize = 16;

/// One `z_erofs_lcluster_index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lcluster {
    /// Stored as is in one block.
    Plain { blkaddr: u32 },
    /// The first lcluster of an LZ4 pcluster starting at `blkaddr`.
    Head { blkaddr: u32 },
    /// A later lcluster of a pcluster: `back` lclusters after its head
    /// (or, the first one, the pcluster's block count with
    /// `LI_D0_CBLKCNT`), `next` before the next head (or the file's end).
    NonHead { d0: u16, next: u16 },
}

/// The 8-byte index: advise (type in bits 0..2), clusterofs (always 0:
/// pclusters start on lcluster boundaries), then blkaddr or the deltas.
pub fn lcluster_index(l: Lcluster) -> [u8; 8] {
    let mut b = [0u8; 8];
    match l {
        Lcluster::Plain { blkaddr } => put32(&mut b, 4, blkaddr),
        Lcluster::Head { blkaddr } => {
            put16(&mut b, 0, 1);
            put32(&mut b, 4, blkaddr);
        }
        Lcluster::NonHead { d0, next } => {
            put16(&mut b, 0, 2);
            put16(&mut b, 4, d0);
            put16(&mut b, 6, next);
        }
    }
    b
}

/// The map header and its reserved 8 bytes: no inline data, big HEAD1
/// pclusters, LZ4 (algorithm 0) for both heads, 4 KiB lclusters.
pub fn zmap_header() -> [u8; ZMAP_HEADER] {
    let mut b = [0u8; ZMAP_HEADER];
    put16(&mut b, 4, ADVISE_BIG_PCLUSTER_1);
    b
}

/// Directory entry file types (`EROFS_FT_*`).
pub mod ft {
    pub const REG: u8 = 1;
    pub const DIR: u8 = 2;
    pub const CHR: u8 = 3;
    pub const BLK: u8 = 4;
    pub const FIFO: u8 = 5;
    pub const SOCK: u8 = 6;
    pub const LNK: u8 = 7;
}

/// The file type of a mode's `S_IFMT` bits, as a dirent stores it.
pub fn file_type(mode: u32) -> u8 {
    match mode & 0o170000 {
        0o100000 => ft::REG,
        0o040000 => ft::DIR,
        0o020000 => ft::CHR,
        0o060000 => ft::BLK,
        0o010000 => ft::FIFO,
        0o140000 => ft::SOCK,
        0o120000 => ft::LNK,
        _ => 0,
    }
}

/// crc32c (Castagnoli, reflected 0x82F63B78) as the kernel's `crc32c()`
/// computes it: seeded by the caller and without the final inversion.
pub fn crc32c_raw(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    crc
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Superblock {
    pub root_nid: u16,
    pub inos: u64,
    pub build_time: u64,
    pub build_time_nsec: u32,
    pub blocks: u32,
    pub meta_blkaddr: u32,
    pub uuid: [u8; 16],
    /// Some inode is LZ4-compressed: the incompat features and the lz4
    /// configuration record are set.
    pub lz4: bool,
}

/// Bytes 80.. of the superblock with compression: what the kernel checks
/// before it reads a compressed inode.
const SB_FEATURE_INCOMPAT: usize = 80;
const SB_COMPR_ALGS: usize = 84;

/// Block 0 in full: zeros, and the superblock at 1024 with its checksum
/// over bytes 1024..4096 (taken with the checksum field zero, seed ~0).
pub fn superblock_block(sb: &Superblock) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    let s = &mut b[SUPER_OFFSET as usize..SUPER_OFFSET as usize + 128];
    put32(s, 0, MAGIC);
    put32(s, 8, COMPAT_SB_CHKSUM);
    s[12] = BLOCK_BITS as u8;
    s[13] = 0; // sb_extslots
    put16(s, 14, sb.root_nid);
    put64(s, 16, sb.inos);
    put64(s, 24, sb.build_time);
    put32(s, 32, sb.build_time_nsec);
    put32(s, 36, sb.blocks);
    put32(s, 40, sb.meta_blkaddr);
    put32(s, 44, 0); // xattr_blkaddr: no shared xattrs
    s[48..64].copy_from_slice(&sb.uuid);
    // volume_name, feature_incompat (none: plain, uncompressed), the
    // compression fields, extra devices, dirblkbits (0: the block size),
    // long xattr prefixes and the packed inode all stay zero.
    if sb.lz4 {
        put32(
            s,
            SB_FEATURE_INCOMPAT,
            INCOMPAT_ZERO_PADDING | INCOMPAT_BIG_PCLUSTER,
        );
        put16(s, SB_COMPR_ALGS, 1); // available_compr_algs: LZ4 only
        // The configuration records follow the 128-byte superblock, each
        // a 16-bit length and its body: lz4's is max_distance (0: LZ4's
        // 64 KiB window, what lz4_flex uses), max_pclusterblks and 10
        // reserved bytes.
        let c = &mut b[SUPER_OFFSET as usize + 128..SUPER_OFFSET as usize + 128 + 16];
        put16(c, 0, 14);
        put16(c, 2, 0);
        put16(c, 4, PCLUSTER_LCLUSTERS as u16);
    }
    let crc = crc32c_raw(!0, &b[SUPER_OFFSET as usize..]);
    put32(&mut b[SUPER_OFFSET as usize..], 4, crc);
    b
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inode {
    pub layout_inline: bool,
    /// `CompressedFull` (then `i_u` is the count of data blocks).
    pub compressed: bool,
    /// Length of the xattr body in bytes (0, or 12 + 4n).
    pub xattr_len: usize,
    /// Type and permission bits.
    pub mode: u32,
    pub size: u64,
    /// `raw_blkaddr` for data, or the encoded rdev for devices.
    pub i_u: u32,
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub nlink: u32,
}

/// `i_xattr_icount` for an xattr body of `len` bytes: the header counts
/// as one 4-byte unit (`xattr_isize = 12 + 4 * (icount - 1)`).
pub fn xattr_icount(len: usize) -> u16 {
    if len == 0 {
        0
    } else {
        ((len - XATTR_IBODY_HEADER) / 4 + 1) as u16
    }
}

/// The 64-byte extended inode (version bit 1): 64-bit size, 32-bit ids
/// and nlink, the mtime with nanoseconds.
pub fn extended_inode(i: &Inode) -> [u8; EXTENDED_INODE] {
    let mut b = [0u8; EXTENDED_INODE];
    let layout = if i.compressed {
        Layout::CompressedFull
    } else if i.layout_inline {
        Layout::FlatInline
    } else {
        Layout::FlatPlain
    };
    put16(&mut b, 0, 1 | ((layout as u16) << 1));
    put16(&mut b, 2, xattr_icount(i.xattr_len));
    put16(&mut b, 4, i.mode as u16);
    put64(&mut b, 8, i.size);
    put32(&mut b, 16, i.i_u);
    put32(&mut b, 20, i.ino);
    put32(&mut b, 24, i.uid);
    put32(&mut b, 28, i.gid);
    put64(&mut b, 32, i.mtime as u64);
    put32(&mut b, 40, i.mtime_nsec);
    put32(&mut b, 44, i.nlink);
    b
}

/// Whether the 32-byte compact inode holds `i` exactly on every kernel:
/// 16-bit ids and nlink, a 32-bit size, and the mtime the superblock's
/// build time gives (compact inodes had no mtime of their own before 6.x;
/// where they have one it is an offset from the build time, written 0).
pub fn fits_compact(i: &Inode, build_time: (u64, u32)) -> bool {
    i.uid <= 0xffff
        && i.gid <= 0xffff
        && i.nlink <= 0xffff
        && i.size <= u64::from(u32::MAX)
        && i.mtime >= 0
        && (i.mtime as u64, i.mtime_nsec) == build_time
}

/// The 32-byte compact inode (version bit 0), for an inode `fits_compact`.
pub fn compact_inode(i: &Inode) -> [u8; COMPACT_INODE] {
    let mut b = [0u8; COMPACT_INODE];
    let layout = if i.compressed {
        Layout::CompressedFull
    } else if i.layout_inline {
        Layout::FlatInline
    } else {
        Layout::FlatPlain
    };
    put16(&mut b, 0, (layout as u16) << 1);
    put16(&mut b, 2, xattr_icount(i.xattr_len));
    put16(&mut b, 4, i.mode as u16);
    put16(&mut b, 6, i.nlink as u16);
    put32(&mut b, 8, i.size as u32);
    put32(&mut b, 12, 0); // i_mtime: the build time itself
    put32(&mut b, 16, i.i_u);
    put32(&mut b, 20, i.ino);
    put16(&mut b, 24, i.uid as u16);
    put16(&mut b, 26, i.gid as u16);
    b
}

/// A device number as the kernel's `new_encode_dev` packs it (what erofs
/// decodes with `new_decode_dev`): 12-bit major, 20-bit minor.
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// Largest major/minor `encode_dev` keeps.
pub const MAX_MAJOR: u32 = 0xfff;
pub const MAX_MINOR: u32 = 0xfffff;

/// The name index erofs stores instead of a name's prefix, and the rest.
/// `None`: a namespace erofs cannot hold (every index is one of these).
pub fn split_xattr_name(name: &[u8]) -> Option<(u8, &[u8])> {
    const P: [(&[u8], u8, bool); 6] = [
        (b"user.", 1, false),
        (b"system.posix_acl_access", 2, true),
        (b"system.posix_acl_default", 3, true),
        (b"trusted.", 4, false),
        (b"lustre.", 5, false),
        (b"security.", 6, false),
    ];
    for (prefix, idx, whole) in P {
        if whole {
            if name == prefix {
                return Some((idx, &name[name.len()..]));
            }
        } else if let Some(rest) = name.strip_prefix(prefix)
            && !rest.is_empty()
        {
            return Some((idx, rest));
        }
    }
    None
}

/// One xattr's entry length: 4-byte header, name suffix, value, padded to 4.
pub fn xattr_entry_len(suffix: usize, value: usize) -> usize {
    (4 + suffix + value).div_ceil(4) * 4
}

/// The inline xattr body for entries already split and sorted: the
/// 12-byte header (no shared xattrs, no name filter) and the entries.
/// Empty when there are none. Lengths are checked by the caller.
pub fn xattr_ibody(entries: &[(u8, &[u8], &[u8])]) -> Vec<u8> {
    if entries.is_empty() {
        return Vec::new();
    }
    let mut b = vec![0u8; XATTR_IBODY_HEADER];
    for (idx, suffix, value) in entries {
        let start = b.len();
        b.push(suffix.len() as u8);
        b.push(*idx);
        b.extend_from_slice(&(value.len() as u16).to_le_bytes());
        b.extend_from_slice(suffix);
        b.extend_from_slice(value);
        b.resize(start + xattr_entry_len(suffix.len(), value.len()), 0);
    }
    b
}

/// How names (sorted, with "." and "..") split into directory blocks:
/// the number of entries in each block. An entry takes 12 bytes plus its
/// name, and a block holds as many as fit in order.
pub fn pack_dir<'a>(names: impl IntoIterator<Item = &'a [u8]>) -> Vec<(usize, usize)> {
    // (entries, bytes used) per block
    let mut blocks = vec![(0usize, 0usize)];
    for n in names {
        let need = DIRENT + n.len();
        let last = blocks.last_mut().unwrap();
        if last.1 + need > BLOCK as usize {
            blocks.push((1, need));
        } else {
            last.0 += 1;
            last.1 += need;
        }
    }
    blocks
}

/// The byte size of a directory packed as `pack_dir` says: full blocks
/// but the last, which ends with its last name.
pub fn dir_size(blocks: &[(usize, usize)]) -> u64 {
    (blocks.len() as u64 - 1) * BLOCK + blocks.last().map_or(0, |b| b.1 as u64)
}

/// One directory block: the dirents (nid, name offset, file type), then
/// the names, unterminated; only the bytes used (the caller pads
/// non-final blocks with zeros, which end the last name there).
pub fn dir_block(entries: &[(&[u8], u64, u8)]) -> Vec<u8> {
    let mut b = vec![0u8; DIRENT * entries.len()];
    let mut nameoff = b.len();
    for (i, (name, nid, ftype)) in entries.iter().enumerate() {
        let d = &mut b[i * DIRENT..(i + 1) * DIRENT];
        put64(d, 0, *nid);
        put16(d, 8, nameoff as u16);
        d[10] = *ftype;
        nameoff += name.len();
    }
    for (name, _, _) in entries {
        b.extend_from_slice(name);
    }
    b
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
#[allow(clippy::type_complexity)] // the tables of cases
mod tests {
    use super::*;

    fn le16(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn le64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // (input, standard crc32c = !raw(!0))
        let cases: [(&[u8], u32); 4] = [
            (b"", 0),
            (b"123456789", 0xE306_9283),
            (&[0u8; 32], 0x8A91_36AA),
            (&[0xffu8; 32], 0x62A8_AB43),
        ];
        for (input, want) in cases {
            assert_eq!(!crc32c_raw(!0, input), want, "{input:?}");
        }
    }

    #[test]
    fn superblock_fields_sit_at_their_offsets() {
        let sb = Superblock {
            root_nid: 0x1234,
            inos: 0x0102_0304_0506_0708,
            build_time: 1_700_000_000,
            build_time_nsec: 999_999_999,
            blocks: 77,
            meta_blkaddr: 66,
            uuid: *b"0123456789abcdef",
            lz4: false,
        };
        let b = superblock_block(&sb);
        assert_eq!(b.len(), 4096);
        assert!(b[..1024].iter().all(|&x| x == 0));
        assert!(b[1024 + 128..].iter().all(|&x| x == 0));
        let s = &b[1024..];
        let table: [(usize, u64, usize); 10] = [
            (0, MAGIC as u64, 4),
            (8, COMPAT_SB_CHKSUM as u64, 4),
            (12, 12, 1),
            (14, 0x1234, 2),
            (16, 0x0102_0304_0506_0708, 8),
            (24, 1_700_000_000, 8),
            (32, 999_999_999, 4),
            (36, 77, 4),
            (40, 66, 4),
            (80, 0, 4),
        ];
        for (at, want, w) in table {
            let got = match w {
                1 => s[at] as u64,
                2 => le16(s, at) as u64,
                4 => le32(s, at) as u64,
                _ => le64(s, at),
            };
            assert_eq!(got, want, "offset {at}");
        }
        assert_eq!(&s[48..64], b"0123456789abcdef");
        // The checksum: over 1024..4096 with the field zeroed.
        let mut z = b[1024..].to_vec();
        z[4..8].fill(0);
        assert_eq!(le32(s, 4), crc32c_raw(!0, &z));
        assert_ne!(le32(s, 4), 0);
    }

    #[test]
    fn extended_inode_fields() {
        // (inode, i_format, i_xattr_icount)
        let base = Inode {
            mode: 0o100644,
            size: 5 << 30,
            i_u: 0xdead_beef,
            ino: 9,
            uid: 70000,
            gid: 80000,
            mtime: -86400,
            mtime_nsec: 123_456_789,
            nlink: 3,
            ..Default::default()
        };
        let cases = [
            (Inode { ..base.clone() }, 0x1, 0),
            (
                Inode {
                    layout_inline: true,
                    ..base.clone()
                },
                0x5,
                0,
            ),
            (
                Inode {
                    xattr_len: 12,
                    ..base.clone()
                },
                0x1,
                1,
            ),
            (
                Inode {
                    xattr_len: 12 + 4 * 10,
                    layout_inline: true,
                    ..base.clone()
                },
                0x5,
                11,
            ),
        ];
        for (i, fmt, icount) in cases {
            let b = extended_inode(&i);
            assert_eq!(le16(&b, 0), fmt);
            assert_eq!(le16(&b, 2), icount);
            assert_eq!(le16(&b, 4), 0o100644);
            assert_eq!(le16(&b, 6), 0);
            assert_eq!(le64(&b, 8), 5 << 30);
            assert_eq!(le32(&b, 16), 0xdead_beef);
            assert_eq!(le32(&b, 20), 9);
            assert_eq!((le32(&b, 24), le32(&b, 28)), (70000, 80000));
            assert_eq!(le64(&b, 32) as i64, -86400);
            assert_eq!(le32(&b, 40), 123_456_789);
            assert_eq!(le32(&b, 44), 3);
            assert!(b[48..].iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn compact_inode_fields_and_when_it_fits() {
        let i = Inode {
            layout_inline: true,
            compressed: false,
            xattr_len: 12 + 8,
            mode: 0o100755,
            size: 0xffff_ffff,
            i_u: 77,
            ino: 9,
            uid: 65535,
            gid: 1,
            mtime: 1_700_000_000,
            mtime_nsec: 5,
            nlink: 2,
        };
        let b = compact_inode(&i);
        let table: [(usize, u64, usize); 10] = [
            (0, 0x4, 2),
            (2, 3, 2),
            (4, 0o100755, 2),
            (6, 2, 2),
            (8, 0xffff_ffff, 4),
            (12, 0, 4),
            (16, 77, 4),
            (20, 9, 4),
            (24, 65535, 2),
            (26, 1, 2),
        ];
        for (at, want, w) in table {
            let got = if w == 2 {
                le16(&b, at) as u64
            } else {
                le32(&b, at) as u64
            };
            assert_eq!(got, want, "offset {at}");
        }
        assert!(b[28..].iter().all(|&x| x == 0));
        let bt = (1_700_000_000, 5);
        // (change, fits)
        let cases: [(fn(&mut Inode), bool); 8] = [
            (|_| {}, true),
            (|i| i.uid = 65536, false),
            (|i| i.gid = 70000, false),
            (|i| i.nlink = 65536, false),
            (|i| i.size = 1 << 32, false),
            (|i| i.mtime_nsec = 6, false),
            (|i| i.mtime += 1, false),
            (|i| i.mtime = -1, false),
        ];
        for (n, (change, fits)) in cases.into_iter().enumerate() {
            let mut j = i.clone();
            change(&mut j);
            assert_eq!(fits_compact(&j, bt), fits, "case {n}");
        }
    }

    #[test]
    fn device_numbers_encode_as_new_encode_dev() {
        let cases = [
            ((0, 0), 0),
            ((1, 3), 0x103),
            ((8, 300), 0x10_0000 | 0x800 | 0x2c),
            ((259, 0xfffff), 0xfff0_0000 | (259 << 8) | 0xff),
            ((0xfff, 0), 0xfff00),
        ];
        for ((ma, mi), want) in cases {
            assert_eq!(encode_dev(ma, mi), want, "{ma}:{mi}");
            // The kernel's new_decode_dev gives them back.
            let d = want;
            let (dma, dmi) = ((d & 0xfff00) >> 8, (d & 0xff) | ((d >> 12) & 0xfff00));
            assert_eq!((dma, dmi), (ma, mi));
        }
    }

    #[test]
    fn xattr_names_split_into_index_and_suffix() {
        let cases: [(&[u8], Option<(u8, &[u8])>); 10] = [
            (b"user.foo", Some((1, b"foo"))),
            (b"trusted.overlay.opaque", Some((4, b"overlay.opaque"))),
            (b"security.capability", Some((6, b"capability"))),
            (b"system.posix_acl_access", Some((2, b""))),
            (b"system.posix_acl_default", Some((3, b""))),
            (b"lustre.x", Some((5, b"x"))),
            (b"user.", None),
            (b"system.nfs4_acl", None),
            (b"system.posix_acl_accessX", None),
            (b"other.x", None),
        ];
        for (name, want) in cases {
            assert_eq!(
                split_xattr_name(name),
                want,
                "{}",
                String::from_utf8_lossy(name)
            );
        }
    }

    #[test]
    fn xattr_ibody_layout() {
        assert!(xattr_ibody(&[]).is_empty());
        let b = xattr_ibody(&[(1, b"foo", b"bar"), (2, b"", b"12345"), (6, b"c", b"")]);
        // header 12, then 4+3+3 -> 12, 4+0+5 -> 12, 4+1+0 -> 8
        assert_eq!(b.len(), 12 + 12 + 12 + 8);
        assert!(b[..12].iter().all(|&x| x == 0));
        assert_eq!(&b[12..22], b"\x03\x01\x03\x00foobar");
        assert_eq!(&b[24..33], b"\x00\x02\x05\x0012345");
        assert_eq!(&b[36..41], b"\x01\x06\x00\x00c");
        assert_eq!(xattr_icount(b.len()), 9);
        assert_eq!(xattr_icount(0), 0);
        assert_eq!(xattr_icount(12), 1);
    }

    #[test]
    fn dirents_pack_into_blocks() {
        // (name lengths, expected (entries, bytes) per block)
        let cases: Vec<(Vec<usize>, Vec<(usize, usize)>)> = vec![
            (vec![1, 2], vec![(2, 27)]),
            // exactly one full block: 16 entries of 244 bytes = 4096
            (vec![244; 16], vec![(16, 4096)]),
            (vec![244; 17], vec![(16, 4096), (1, 256)]),
            (vec![255; 16], vec![(15, 4005), (1, 267)]),
        ];
        for (lens, want) in cases {
            let names: Vec<Vec<u8>> = lens.iter().map(|&l| vec![b'x'; l]).collect();
            let got = pack_dir(names.iter().map(|n| &n[..]));
            assert_eq!(got, want, "{lens:?}");
        }
        assert_eq!(dir_size(&[(2, 27)]), 27);
        assert_eq!(dir_size(&[(16, 4096), (1, 256)]), 4096 + 256);
    }

    #[test]
    fn dir_block_layout() {
        let b = dir_block(&[
            (b".", 5, ft::DIR),
            (b"..", 0, ft::DIR),
            (b"f", 0x1_0000_0001, ft::REG),
        ]);
        assert_eq!(b.len(), 36 + 4);
        let table = [
            (0usize, 5u64, 36u16, ft::DIR),
            (12, 0, 37, ft::DIR),
            (24, 0x1_0000_0001, 39, ft::REG),
        ];
        for (at, nid, off, t) in table {
            assert_eq!(le64(&b, at), nid);
            assert_eq!(le16(&b, at + 8), off);
            assert_eq!(b[at + 10], t);
            assert_eq!(b[at + 11], 0);
        }
        assert_eq!(&b[36..], b"...f");
    }

    #[test]
    fn file_types_of_modes() {
        let cases = [
            (0o100644, ft::REG),
            (0o040755, ft::DIR),
            (0o020000, ft::CHR),
            (0o060000, ft::BLK),
            (0o010644, ft::FIFO),
            (0o140777, ft::SOCK),
            (0o120777, ft::LNK),
            (0o000644, 0),
        ];
        for (m, t) in cases {
            assert_eq!(file_type(m), t, "{m:o}");
        }
    }
}
