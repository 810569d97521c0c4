//! What a store directory sits on, and what that filesystem guarantees
//! when several nodes use it: its name (by statfs magic, as docker named
//! backing filesystems) and whether it is shared between nodes, which
//! decides the defaults that only matter there (multi-mount protection of
//! new uppers, node-local staging).

use std::path::Path;

/// A filesystem by its statfs magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsKind {
    pub magic: u32,
}

/// (magic, docker's name, shared between nodes)
const TABLE: &[(u32, &str, bool)] = &[
    (0xEF53, "extfs", false),
    (0x5846_5342, "xfs", false),
    (0x0102_1994, "tmpfs", false),
    (0x794C_7630, "overlayfs", false),
    (0x9123_683E, "btrfs", false),
    (0x2FC1_2FC1, "zfs", false),
    (0xE0F5_E1E2, "erofs", false),
    (0x6969, "nfs", true),
    (0x0BD0_0BD0, "lustre", true),
    (0x4750_4653, "gpfs", true),
    (0x00C3_6400, "ceph", true),
    (0x1983_0326, "beegfs", true),
    // GlusterFS, CephFS-fuse, BeeGFS-fuse... and sshfs: all remote or
    // userspace, none with local-disk semantics for locks and renames.
    (0x6573_5546, "fuse", true),
    (0xFF53_4D42, "cifs", true),
    (0xFE53_4D42, "smb2", true),
    (0x0116_1970, "gfs2", true),
    (0x7461_636F, "ocfs2", true),
    (0x5346_414F, "afs", true),
    (0x0102_1997, "9p", true),
];

impl FsKind {
    pub fn name(self) -> String {
        match TABLE.iter().find(|(m, _, _)| *m == self.magic) {
            Some((_, n, _)) => (*n).to_string(),
            None => format!("<unknown 0x{:x}>", self.magic),
        }
    }

    /// Used by several nodes at once (network, cluster or FUSE
    /// filesystems); unknown filesystems count as local.
    pub fn shared(self) -> bool {
        TABLE.iter().any(|(m, _, s)| *m == self.magic && *s)
    }

    /// The filesystem `p` is on, or that of its nearest existing ancestor
    /// (a store directory may not exist yet).
    pub fn of(p: &Path) -> Option<FsKind> {
        let mut cur = Some(p);
        while let Some(d) = cur {
            if let Ok(st) = rustix::fs::statfs(d) {
                return Some(FsKind { magic: st.f_type as u32 });
            }
            cur = d.parent();
        }
        None
    }
}

/// docker's names for backing filesystems, by statfs magic.
pub fn fs_name(magic: i64) -> String {
    FsKind { magic: magic as u32 }.name()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sharing() {
        let cases: &[(u32, &str, bool)] = &[
            (0xEF53, "extfs", false),
            (0x5846_5342, "xfs", false),
            (0x6969, "nfs", true),
            (0x6573_5546, "fuse", true),
            (0x0BD0_0BD0, "lustre", true),
            (0x4750_4653, "gpfs", true),
            (0x00C3_6400, "ceph", true),
            (0x0102_1994, "tmpfs", false),
            (0x1234, "<unknown 0x1234>", false),
        ];
        for &(magic, name, shared) in cases {
            let k = FsKind { magic };
            assert_eq!(k.name(), name, "{magic:x}");
            assert_eq!(k.shared(), shared, "{magic:x}");
        }
        assert_eq!(fs_name(0x6969), "nfs");
    }

    #[test]
    fn of_walks_up_to_an_existing_ancestor() {
        let here = FsKind::of(Path::new("/proc")).unwrap();
        assert_eq!(FsKind::of(Path::new("/proc/no/such/dir")), Some(here));
    }
}
