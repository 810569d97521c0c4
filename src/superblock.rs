//! Which filesystem an image holds, by its superblock magic: for `verify`,
//! and to explain a layer mount the kernel refused (an image replaced by
//! one of another format). Read only on those paths, never on a mount that
//! works: on shared storage each read is a round trip.

use std::os::fd::AsFd;

use crate::store::FsType;

/// Bytes from the start of an image that hold every magic we know.
const HEAD: usize = 1084;

/// Where each filesystem keeps its magic, and what it is.
fn magic(fstype: FsType) -> (usize, &'static [u8]) {
    match fstype {
        FsType::Ext4 => (1080, &[0x53, 0xEF]),
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

/// The first bytes of the image open at `fd` (fewer if it is shorter).
pub fn read_head(fd: impl AsFd) -> rustix::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; HEAD];
    let mut n = 0;
    while n < buf.len() {
        match rustix::io::pread(&fd, &mut buf[n..], n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    buf.truncate(n);
    Ok(buf)
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
}
