//! Reading the directories of an ext4 image sharedloop just built, to find
//! the inode number mke2fs gave each path: the nanosecond fix addresses
//! inodes by number, so no name (spaces, quotes, newlines, non-UTF-8 bytes)
//! ever passes through debugfs's command parser. Read-only, and only what
//! mke2fs writes: extent-mapped directories (any depth), linear or htree
//! (an htree's index blocks look like empty directory blocks to a linear
//! scan, by design), checksum tails skipped. Layout: the kernel's
//! Documentation/filesystems/ext4/{super,group_descr,inodes,ifork,directory}.rst.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::image::superblock::read_at;

const SB_OFFSET: u64 = 1024;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const EXTENTS_FL: u32 = 0x80000;
const INLINE_DATA_FL: u32 = 0x1000_0000;
const EXTENT_MAGIC: u16 = 0xF30A;
/// An extent longer than this is unwritten (reads as zeros).
const EXT_INIT_MAX_LEN: u16 = 32768;
/// Depth bound for extent trees (the kernel's own limit is 5).
const MAX_DEPTH: u16 = 5;

pub(super) struct Image {
    file: File,
    path: PathBuf,
    block: u64,
    inode_size: u64,
    inodes_per_group: u64,
    inodes_count: u64,
    desc_size: u64,
    /// Block of the group descriptor table.
    gdt_block: u64,
    is_64bit: bool,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Image {
    pub(super) fn open(path: &Path) -> Result<Image> {
        let file = File::open(path).map_err(|e| Error::io("open ext4 image", path, &e))?;
        let mut img = Image {
            file,
            path: path.to_path_buf(),
            block: 0,
            inode_size: 0,
            inodes_per_group: 0,
            inodes_count: 0,
            desc_size: 32,
            gdt_block: 0,
            is_64bit: false,
        };
        let sb = img.read(SB_OFFSET, 1024, "read ext4 superblock of")?;
        if le16(&sb, 0x38) != 0xEF53 {
            return Err(img.bad("no ext4 superblock in"));
        }
        let log = le32(&sb, 0x18);
        if log > 6 {
            return Err(img.bad("ext4 block size out of range in"));
        }
        img.block = 1024 << log;
        img.inodes_count = le32(&sb, 0x00).into();
        img.inodes_per_group = le32(&sb, 0x28).into();
        img.inode_size = le16(&sb, 0x58).into();
        let incompat = le32(&sb, 0x60);
        if incompat & INCOMPAT_INLINE_DATA != 0 {
            return Err(img.bad("inline data (not made by sharedloop) in ext4 image"));
        }
        img.is_64bit = incompat & INCOMPAT_64BIT != 0;
        if img.is_64bit {
            img.desc_size = le16(&sb, 0xFE).into();
        }
        if img.inodes_per_group == 0 || img.inode_size < 128 || img.desc_size < 32 {
            return Err(img.bad("ext4 superblock geometry out of range in"));
        }
        img.gdt_block = u64::from(le32(&sb, 0x14)) + 1;
        Ok(img)
    }

    fn bad(&self, what: &str) -> Error {
        Error::sys(what, &self.path, Errno::UCLEAN)
    }

    fn read(&self, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
        let buf = read_at(&self.file, offset, len).map_err(|e| Error::sys(what, &self.path, e))?;
        if buf.len() < len {
            return Err(Error::sys(what, &self.path, Errno::NODATA));
        }
        Ok(buf)
    }

    fn inode(&self, ino: u32) -> Result<Vec<u8>> {
        let ino = u64::from(ino);
        if ino == 0 || ino > self.inodes_count {
            return Err(self.bad("ext4 directory entry names an inode out of range in"));
        }
        let (group, index) = ((ino - 1) / self.inodes_per_group, (ino - 1) % self.inodes_per_group);
        let desc = self.read(
            self.gdt_block * self.block + group * self.desc_size,
            self.desc_size as usize,
            "read ext4 group descriptor of",
        )?;
        let mut table = u64::from(le32(&desc, 0x08));
        if self.is_64bit && self.desc_size >= 64 {
            table |= u64::from(le32(&desc, 0x28)) << 32;
        }
        self.read(table * self.block + index * self.inode_size, 128, "read ext4 inode of")
    }

    /// The physical blocks of an extent-mapped inode's data, in logical
    /// order (holes and unwritten extents left out: they hold no entries).
    fn blocks(&self, inode: &[u8]) -> Result<Vec<u64>> {
        let flags = le32(inode, 0x20);
        if flags & INLINE_DATA_FL != 0 || flags & EXTENTS_FL == 0 {
            return Err(self.bad("ext4 directory not extent-mapped in"));
        }
        let mut out = Vec::new();
        self.extents(&inode[0x28..0x28 + 60], MAX_DEPTH, &mut out)?;
        Ok(out)
    }

    fn extents(&self, node: &[u8], budget: u16, out: &mut Vec<u64>) -> Result<()> {
        if node.len() < 12 || le16(node, 0) != EXTENT_MAGIC {
            return Err(self.bad("bad ext4 extent header in"));
        }
        let (entries, depth) = (usize::from(le16(node, 2)), le16(node, 6));
        if depth > budget || 12 + entries * 12 > node.len() {
            return Err(self.bad("bad ext4 extent tree in"));
        }
        for e in node[12..12 + entries * 12].chunks_exact(12) {
            if depth == 0 {
                let len = le16(e, 4);
                if len > EXT_INIT_MAX_LEN {
                    continue;
                }
                let start = u64::from(le16(e, 6)) << 32 | u64::from(le32(e, 8));
                out.extend((0..u64::from(len)).map(|i| start + i));
            } else {
                let leaf = u64::from(le16(e, 8)) << 32 | u64::from(le32(e, 4));
                let child = self.read(leaf * self.block, self.block as usize, "read ext4 extent block of")?;
                self.extents(&child, depth - 1, out)?;
            }
        }
        Ok(())
    }

    /// The entries of directory inode `ino` by name, "." and ".." left out.
    pub(super) fn dir(&self, ino: u32) -> Result<HashMap<Vec<u8>, u32>> {
        let inode = self.inode(ino)?;
        if le16(&inode, 0) & 0o170000 != 0o040000 {
            return Err(self.bad("ext4 directory entry is not a directory in"));
        }
        let mut names = HashMap::new();
        for b in self.blocks(&inode)? {
            let data = self.read(b * self.block, self.block as usize, "read ext4 directory block of")?;
            let mut at = 0;
            while at + 8 <= data.len() {
                let (child, rec_len, name_len) = (le32(&data, at), usize::from(le16(&data, at + 4)), usize::from(data[at + 6]));
                if rec_len < 8 || at + rec_len > data.len() || 8 + name_len > rec_len {
                    return Err(self.bad("bad ext4 directory entry in"));
                }
                let name = &data[at + 8..at + 8 + name_len];
                // Inode 0: unused space, an htree index block, or the
                // checksum tail.
                if child != 0 && name != b"." && name != b".." {
                    names.insert(name.to_vec(), child);
                }
                at += rec_len;
            }
        }
        Ok(names)
    }
}
