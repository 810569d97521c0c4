//! ext4 multi-mount protection (MMP), read from an image file.
//!
//! With the `mmp` feature the kernel keeps a sequence number in one block
//! of the filesystem and, while it has the filesystem mounted, rewrites it
//! every few seconds (kmmpd). A mount elsewhere that finds the number
//! changing refuses with EBUSY ("Device is already active on another
//! node"); one that finds it clean mounts at once. The block is part of
//! the image, so this holds between nodes whatever the shared
//! filesystem's lock service does: sharedloop turns it on for uppers on
//! shared storage (`upper_mmp=`) and reads the block here only to say who
//! holds an upper. The superblock, which says where the block is, is read
//! by `superblock`. Layout: the kernel's Documentation/filesystems/ext4
//! (super.rst, mmp.rst).

use std::os::fd::AsFd;

use crate::image::superblock::{self, Ext4Super, le16, le32, le64};

/// `mmp_magic`
const MAGIC: u32 = 0x004D_4D50;
/// `mmp_seq` of a cleanly unmounted filesystem.
pub const SEQ_CLEAN: u32 = 0xFF4D_4D50;
/// `mmp_seq` while e2fsck has the filesystem.
pub const SEQ_FSCK: u32 = 0xE24D_4D50;
/// The bytes of an MMP block that hold every field read.
const BLOCK_LEN: usize = 0x80;

/// The MMP block's fields that matter to an administrator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmpBlock {
    pub seq: u32,
    /// Seconds since the epoch of the last update.
    pub time: u64,
    /// Hostname of the last node that updated it.
    pub node: String,
    /// That node's device name (loopN).
    pub device: String,
    /// Seconds between updates while mounted.
    pub interval: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmpState {
    /// Unmounted cleanly: the next mount goes ahead at once.
    Clean,
    /// e2fsck is running (or was killed): mounts are refused.
    Fsck,
    /// Mounted somewhere, or its last writer died without unmounting: the
    /// next mount waits about two update intervals to tell which.
    Active,
}

impl MmpBlock {
    pub fn state(&self) -> MmpState {
        match self.seq {
            SEQ_CLEAN => MmpState::Clean,
            SEQ_FSCK => MmpState::Fsck,
            _ => MmpState::Active,
        }
    }
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// From an ext4 superblock: the byte offset of its MMP block, or None when
/// it has no MMP.
pub fn block_offset(sb: &Ext4Super) -> Option<u64> {
    if !sb.has_mmp() {
        return None;
    }
    sb.mmp_block.checked_mul(sb.block_size()?).filter(|&o| o > 0)
}

/// An MMP block, or None when the magic is wrong.
pub fn parse_block(b: &[u8]) -> Option<MmpBlock> {
    if b.len() < 0x72 || le32(b, 0) != MAGIC {
        return None;
    }
    Some(MmpBlock {
        seq: le32(b, 4),
        time: le64(b, 8),
        node: c_string(&b[0x10..0x50]),
        device: c_string(&b[0x50..0x70]),
        interval: le16(b, 0x70),
    })
}

/// The MMP block of the ext4 image open at `fd`, if it has one. Read
/// errors count as "none": this is for messages, never for decisions.
pub fn read(fd: impl AsFd) -> Option<MmpBlock> {
    let off = block_offset(&superblock::read_ext4(&fd).ok()??)?;
    parse_block(&superblock::read_at(&fd, off, BLOCK_LEN).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(incompat: u32, log: u32, block: u64) -> Ext4Super {
        Ext4Super { log_block_size: log, feature_incompat: incompat, mmp_block: block }
    }

    #[test]
    fn superblocks() {
        // Not ext4 and short reads: superblock's tests.
        let cases: &[(Ext4Super, Option<u64>)] = &[
            (sb(0x100 | 0x2, 2, 7986), Some(7986 * 4096)),
            (sb(0x100, 0, 100), Some(100 * 1024)),
            (sb(0x2, 2, 7986), None),       // no MMP feature
            (sb(0x100, 2, 0), None),        // no block
            (sb(0x100, 40, 1), None),       // absurd block size
            (sb(0x100, 2, u64::MAX), None), // past any offset
        ];
        for (i, (s, want)) in cases.iter().enumerate() {
            assert_eq!(block_offset(s), *want, "case {i}");
        }
    }

    fn block(seq: u32, node: &[u8], dev: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&seq.to_le_bytes());
        b[8..16].copy_from_slice(&1_796_402_435u64.to_le_bytes());
        b[0x10..0x10 + node.len()].copy_from_slice(node);
        b[0x50..0x50 + dev.len()].copy_from_slice(dev);
        b[0x70..0x72].copy_from_slice(&5u16.to_le_bytes());
        b
    }

    #[test]
    fn blocks() {
        let b = parse_block(&block(SEQ_CLEAN, b"node-a", b"loop7")).unwrap();
        assert_eq!(
            b,
            MmpBlock { seq: SEQ_CLEAN, time: 1_796_402_435, node: "node-a".into(), device: "loop7".into(), interval: 5 }
        );
        assert_eq!(b.state(), MmpState::Clean);
        assert_eq!(parse_block(&block(SEQ_FSCK, b"", b"")).unwrap().state(), MmpState::Fsck);
        assert_eq!(parse_block(&block(42, b"x", b"y")).unwrap().state(), MmpState::Active);
        // A full-length name without its NUL.
        assert_eq!(parse_block(&block(1, &[b'n'; 64], b"")).unwrap().node, "n".repeat(64));
        let mut bad = block(1, b"x", b"y");
        bad[0] = 0;
        assert_eq!(parse_block(&bad), None);
        assert_eq!(parse_block(&[0u8; 16]), None);
    }

    fn mkfs(opts: &[&str], img: &std::path::Path) {
        let mut c = crate::command::Cmd::new("mkfs.ext4");
        c.args(["-q", "-F"]).args(opts).arg(img);
        c.run("mkfs.ext4").unwrap();
    }

    #[test]
    fn real_image_from_mkfs() {
        let dir = std::env::temp_dir().join(format!("sl-mmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("u.img");
        std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
        mkfs(&["-O", "mmp"], &img);
        let b = read(std::fs::File::open(&img).unwrap()).expect("an MMP block");
        assert_eq!(b.state(), MmpState::Clean);
        std::fs::File::create(dir.join("plain.img")).unwrap().set_len(64 << 20).unwrap();
        mkfs(&[], &dir.join("plain.img"));
        assert_eq!(read(std::fs::File::open(dir.join("plain.img")).unwrap()), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
