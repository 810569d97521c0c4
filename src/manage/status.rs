//! `sharedloop status` and `sharedloop mounts`: what the driver is, where its
//! store is, what the kernel offers, and what is mounted now. Gathering
//! (I/O) is kept apart from formatting (pure), so the text is testable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::kernel::Feature;
use crate::mount;
use crate::error::Result;
use crate::kernel::Version;
use crate::kernel::mountinfo;
use crate::mount::opts::{MountApi, MountOptions};
use crate::mount::state::{self, MountRecord};
use crate::store::{Store, Which};

use super::human::human_size;
use super::inventory::{Inventory, list_dir};
use super::usage::usage_beneath;

#[derive(Debug, Serialize, PartialEq)]
pub struct Status {
    pub storage_driver: &'static str,
    /// The filesystem the root store sits on, named as docker names them.
    pub backing_filesystem: String,
    #[serde(with = "crate::bytes::path")]
    pub loopback_root: PathBuf,
    #[serde(with = "crate::bytes::path")]
    pub loopback_fallback: PathBuf,
    pub kernel: KernelInfo,
    pub store: StoreTotals,
    pub mounts: Vec<MountInfo>,
    /// Layers attached on this node by the mounts above, with how many
    /// mounts share each.
    pub layers_in_use: Vec<LayerUse>,
    /// What other nodes sharing the store hold (their locks).
    pub held_elsewhere: crate::manage::Elsewhere,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct KernelInfo {
    pub release: String,
    pub multiple_lower_layers: bool,
    pub openat2: bool,
    pub new_mount_api: bool,
    pub loop_configure: bool,
    pub lowerdir_add: bool,
    pub layers_as_fds: bool,
    pub erofs_from_file: bool,
    /// erofs is there (built in, or a module the kernel loads).
    pub erofs: bool,
    /// The format `add` and `import` write when not told, and why.
    pub layer_fstype: String,
    /// The way a mount with mount_api=auto (or the configured one) is made.
    pub mount_api: String,
}

/// One store directory. Sizes are those of `usage`, the figures `ls`
/// shows: allocated bytes (`st_blocks * 512`) and apparent bytes, of the
/// layer directories and of the upper images.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct StoreDirTotals {
    pub layers: u64,
    pub layer_allocated_bytes: u64,
    pub layer_apparent_bytes: u64,
    pub names: u64,
    pub uppers: u64,
    pub upper_allocated_bytes: u64,
    pub upper_apparent_bytes: u64,
    /// false if the directory is missing or unreadable.
    pub present: bool,
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct StoreTotals {
    pub root: StoreDirTotals,
    pub fallback: StoreDirTotals,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct MountInfo {
    #[serde(with = "crate::bytes::path")]
    pub target: PathBuf,
    pub source: String,
    pub top: String,
    pub layers: usize,
    pub loop_devices: Vec<String>,
    pub upper: Option<String>,
    pub mount_api: String,
    pub since: u64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct LayerUse {
    pub chain_id: String,
    pub loop_device: Option<String>,
    #[serde(with = "crate::bytes::path")]
    pub image: PathBuf,
    pub mounts: usize,
}

pub use crate::store::sharedfs::fs_name;

/// The filesystem `p` is on, or that of its nearest existing ancestor
/// (a store directory may not exist yet).
fn backing_fs(p: &Path) -> String {
    crate::store::sharedfs::FsKind::of(p).map(|k| k.name()).unwrap_or_else(|| "<unknown>".into())
}

/// What one store directory holds, from the inventory (layers, names)
/// and its `uppers/` (read through the directory fd, like the rest).
fn dir_totals(inv: &Inventory, which: Which) -> StoreDirTotals {
    let mut t = StoreDirTotals::default();
    let Some(h) = inv.handle(which) else { return t };
    t.present = true;
    for l in inv.layers.iter().filter(|l| l.which == which) {
        t.layers += 1;
        match &l.usage {
            Ok(u) => {
                t.layer_allocated_bytes += u.allocated_bytes;
                t.layer_apparent_bytes += u.apparent_bytes;
            }
            Err(e) => log::warn!("layer {} ({which}): size not known: {e}", l.id),
        }
    }
    t.names = inv.names.iter().filter(|n| n.which == which).count() as u64;
    for (n, _) in list_dir(h, "uppers").unwrap_or_else(|e| {
        log::warn!("{e}: uppers not counted");
        vec![]
    }) {
        if n.starts_with('.') || !n.ends_with(".img") {
            continue;
        }
        t.uppers += 1;
        match usage_beneath(h, &format!("uppers/{n}")) {
            Ok(u) => {
                t.upper_allocated_bytes += u.allocated_bytes;
                t.upper_apparent_bytes += u.apparent_bytes;
            }
            Err(e) => log::warn!("{e}: size not known"),
        }
    }
    t
}

fn store_totals(store: &Store) -> StoreTotals {
    let inv = match Inventory::scan(store) {
        Ok(inv) => inv,
        // Neither directory there: both "(not present)".
        Err(e) => {
            log::info!("{e}");
            return StoreTotals::default();
        }
    };
    let root = dir_totals(&inv, Which::Root);
    // Root and fallback one directory: the inventory read it once, as root.
    let same = inv.handle(Which::Root).is_some()
        && store.handle(Which::Fallback).is_ok_and(|f| inv.handle(Which::Root).is_some_and(|r| r.path == f.path));
    let fallback = if same {
        dir_totals(&inv, Which::Root)
    } else {
        dir_totals(&inv, Which::Fallback)
    };
    StoreTotals { root, fallback }
}

/// The active mounts on this node that this namespace can see or that were
/// made in another namespace (those keep their record).
pub fn mounts() -> Result<Vec<MountRecord>> {
    let mi = mountinfo::read()?;
    let mut recs = state::live(&mi);
    recs.sort_by(|a, b| a.target.cmp(&b.target));
    Ok(recs)
}

fn mount_info(r: &MountRecord) -> MountInfo {
    MountInfo {
        target: r.target.clone(),
        source: r.source.clone(),
        top: r.chain.first().map(|l| l.chain_id.to_string()).unwrap_or_default(),
        layers: r.chain.len(),
        loop_devices: r.loops().map(|l| format!("/dev/loop{}", l.number)).collect(),
        upper: r.upper.as_ref().map(|u| match (&u.image, &u.loop_dev) {
            (Some(img), Some(l)) => format!("{} (/dev/loop{}, {})", img.display(), l.number, u.fstype),
            (Some(img), None) => img.display().to_string(),
            _ => u.kind.clone(),
        }),
        mount_api: r.mount_api.clone(),
        since: r.created,
    }
}

fn layers_in_use(recs: &[MountRecord]) -> Vec<LayerUse> {
    let mut by: BTreeMap<String, LayerUse> = BTreeMap::new();
    for r in recs {
        for l in &r.chain {
            let e = by.entry(l.chain_id.to_string()).or_insert_with(|| LayerUse {
                chain_id: l.chain_id.to_string(),
                loop_device: l.loop_dev.as_ref().map(|d| format!("/dev/loop{}", d.number)),
                image: l.image.clone(),
                mounts: 0,
            });
            e.mounts += 1;
        }
    }
    by.into_values().collect()
}

pub fn gather(store: &Store, opts: &MountOptions) -> Result<Status> {
    let k = Version::running()?;
    let release = crate::kernel::release()?;
    let recs = mounts()?;
    Ok(Status {
        storage_driver: "sharedloop",
        backing_filesystem: backing_fs(&store.root),
        loopback_root: store.root.clone(),
        loopback_fallback: store.fallback.clone(),
        kernel: KernelInfo {
            release,
            multiple_lower_layers: k.has_multi_lower(),
            openat2: Feature::Openat2.have(),
            new_mount_api: Feature::NewMountApi.have(),
            loop_configure: Feature::LoopConfigure.have(),
            lowerdir_add: Feature::LowerdirAdd.have(),
            layers_as_fds: Feature::LayersAsFds.have(),
            erofs_from_file: Feature::ErofsFromFile.have(),
            erofs: crate::kernel::has_erofs().have,
            layer_fstype: {
                let (t, why) = crate::store::default_layer_fstype(opts.layer_fstype.flatten());
                format!("{t} ({why})")
            },
            // What a mount would do: the configured way, or (if this kernel
            // cannot) what the refusal says.
            mount_api: match mount::resolve_api(opts.mount_api.unwrap_or(MountApi::Auto)) {
                Ok(a) => mount::api_name(a).into(),
                Err(e) => format!("refused: {e}"),
            },
        },
        store: store_totals(store),
        mounts: recs.iter().map(mount_info).collect(),
        layers_in_use: layers_in_use(&recs),
        held_elsewhere: crate::manage::held_elsewhere(store).unwrap_or_else(|e| {
            log::warn!("{e}: what other nodes hold not known");
            Default::default()
        }),
    })
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn store_line(label: &str, t: &StoreDirTotals) -> String {
    if !t.present {
        return format!(" {label}: (not present)\n");
    }
    format!(
        " {label}: {} layers ({}, apparent {}), {} names, {} uppers ({}, apparent {})\n",
        t.layers,
        human_size(t.layer_allocated_bytes),
        human_size(t.layer_apparent_bytes),
        t.names,
        t.uppers,
        human_size(t.upper_allocated_bytes),
        human_size(t.upper_apparent_bytes)
    )
}

/// The `docker info`-style text.
pub fn format_status(s: &Status) -> String {
    let mut o = String::new();
    o.push_str(&format!("Storage Driver: {}\n", s.storage_driver));
    o.push_str(&format!(" Backing Filesystem: {}\n", s.backing_filesystem));
    o.push_str(&format!(" Loopback Root Directory: {}\n", s.loopback_root.display()));
    o.push_str(&format!(" Loopback Fallback Directory: {}\n", s.loopback_fallback.display()));
    let k = &s.kernel;
    o.push_str(&format!(" Kernel: {}\n", k.release));
    o.push_str(&format!(
        "  openat2: {}, New Mount API: {}, LOOP_CONFIGURE: {}, lowerdir+: {}, Layers As Fds: {}, erofs From File: {}\n",
        yes(k.openat2),
        yes(k.new_mount_api),
        yes(k.loop_configure),
        yes(k.lowerdir_add),
        yes(k.layers_as_fds),
        yes(k.erofs_from_file)
    ));
    o.push_str(&format!("  Mount Path: {}\n", k.mount_api));
    o.push_str(&format!("  erofs: {}, Layer Format: {}\n", yes(k.erofs), k.layer_fstype));
    o.push_str("Store:\n");
    o.push_str(&store_line("Root", &s.store.root));
    o.push_str(&store_line("Fallback", &s.store.fallback));
    o.push_str(&format!("Active Mounts: {}\n", s.mounts.len()));
    o.push_str(&format_mounts(&s.mounts));
    if !s.layers_in_use.is_empty() {
        o.push_str(&format!("Layers In Use: {}\n", s.layers_in_use.len()));
        for l in &s.layers_in_use {
            o.push_str(&format!(
                " {}  {}  shared by {} mount{}\n",
                l.chain_id,
                l.loop_device.as_deref().unwrap_or("(no loop device)"),
                l.mounts,
                if l.mounts == 1 { "" } else { "s" }
            ));
        }
    }
    let e = &s.held_elsewhere;
    if !e.layers.is_empty() || !e.uppers.is_empty() {
        o.push_str("Held On Other Nodes:\n");
        o.push_str(&format!(" Layers: {}\n", e.layers.len()));
        for u in &e.uppers {
            match &u.node {
                Some(n) => o.push_str(&format!(" Upper: {} (node {n:?}, by its multi-mount protection block)\n", u.image.display())),
                None => o.push_str(&format!(" Upper: {} (locked)\n", u.image.display())),
            }
        }
    }
    o
}

pub fn format_mounts(ms: &[MountInfo]) -> String {
    let mut o = String::new();
    for m in ms {
        o.push_str(&format!(" {}\n", m.target.display()));
        o.push_str(&format!("  Source: {}\n", m.source));
        o.push_str(&format!("  Top Layer: {} ({} layers)\n", m.top, m.layers));
        o.push_str(&format!("  Loop Devices: {}\n", if m.loop_devices.is_empty() { "none".into() } else { m.loop_devices.join(" ") }));
        o.push_str(&format!("  Upper: {}\n", m.upper.as_deref().unwrap_or("none (read-only)")));
        o.push_str(&format!("  Mount Path: {}\n", m.mount_api));
    }
    o
}

pub fn mounts_info(recs: &[MountRecord]) -> Vec<MountInfo> {
    recs.iter().map(mount_info).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Status {
        Status {
            storage_driver: "sharedloop",
            backing_filesystem: "xfs".into(),
            loopback_root: "/var/lib/sharedloop/root".into(),
            loopback_fallback: "/var/lib/sharedloop/private".into(),
            kernel: KernelInfo {
                release: "6.18.44".into(),
                multiple_lower_layers: true,
                openat2: true,
                new_mount_api: true,
                loop_configure: true,
                lowerdir_add: true,
                layers_as_fds: true,
                erofs_from_file: true,
                erofs: true,
                layer_fstype: "erofs (this kernel has erofs)".into(),
                mount_api: "fd".into(),
            },
            store: StoreTotals {
                root: StoreDirTotals {
                    layers: 3,
                    layer_allocated_bytes: 48 << 10,
                    layer_apparent_bytes: 3 << 20,
                    names: 1,
                    uppers: 1,
                    upper_allocated_bytes: 4 << 20,
                    upper_apparent_bytes: 10 << 30,
                    present: true,
                },
                fallback: StoreDirTotals::default(),
            },
            mounts: vec![MountInfo {
                target: "/srv/a".into(),
                source: "debian:12".into(),
                top: "sha256:aa".into(),
                layers: 3,
                loop_devices: vec!["/dev/loop0".into(), "/dev/loop1".into()],
                upper: None,
                mount_api: "fd".into(),
                since: 0,
            }],
            layers_in_use: vec![LayerUse { chain_id: "sha256:aa".into(), loop_device: Some("/dev/loop0".into()), image: "/x".into(), mounts: 2 }],
            held_elsewhere: crate::manage::Elsewhere {
                layers: vec![crate::store::ids::Digest::parse(&format!("sha256:{}", "b".repeat(64))).unwrap()],
                uppers: vec![crate::manage::UpperElsewhere { image: "/s/uppers/u.img".into(), node: Some("node-a".into()) }],
            },
        }
    }

    #[test]
    fn docker_info_lines_come_first() {
        let t = format_status(&sample());
        let want = "Storage Driver: sharedloop\n Backing Filesystem: xfs\n Loopback Root Directory: /var/lib/sharedloop/root\n Loopback Fallback Directory: /var/lib/sharedloop/private\n";
        assert!(t.starts_with(want), "{t}");
        assert!(t.contains(" Root: 3 layers (48.0KiB, apparent 3.0MiB), 1 names, 1 uppers (4.0MiB, apparent 10.0GiB)\n"), "{t}");
        assert!(t.contains(" Fallback: (not present)\n"), "{t}");
        assert!(t.contains("Active Mounts: 1\n /srv/a\n  Source: debian:12\n  Top Layer: sha256:aa (3 layers)\n  Loop Devices: /dev/loop0 /dev/loop1\n  Upper: none (read-only)\n"), "{t}");
        assert!(t.contains(" sha256:aa  /dev/loop0  shared by 2 mounts\n"), "{t}");
        assert!(
            t.ends_with("Held On Other Nodes:\n Layers: 1\n Upper: /s/uppers/u.img (node \"node-a\", by its multi-mount protection block)\n"),
            "{t}"
        );
    }

    #[test]
    fn json_field_names() {
        let v = serde_json::to_value(sample()).unwrap();
        assert_eq!(v["storage_driver"], "sharedloop");
        assert_eq!(v["backing_filesystem"], "xfs");
        assert_eq!(v["kernel"]["layers_as_fds"], true);
        assert_eq!(v["store"]["root"]["layers"], 3);
        assert_eq!(v["store"]["root"]["layer_allocated_bytes"], 48 << 10);
        assert_eq!(v["store"]["root"]["upper_apparent_bytes"], 10u64 << 30);
        assert_eq!(v["mounts"][0]["loop_devices"][1], "/dev/loop1");
        assert_eq!(v["layers_in_use"][0]["mounts"], 2);
        assert_eq!(v["held_elsewhere"]["layers"][0], format!("sha256:{}", "b".repeat(64)));
        assert_eq!(v["held_elsewhere"]["uppers"][0], serde_json::json!({"image": "/s/uppers/u.img", "node": "node-a"}));
    }
}
