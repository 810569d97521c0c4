//! What other nodes sharing the store hold, as far as this node can tell
//! (for `sharedloop status`): layer images locked by users this node does
//! not know (the loop devices of their mounts hold the locks) and upper
//! images in use elsewhere, with the node an upper with multi-mount
//! protection names as its writer.

use std::path::PathBuf;

use rustix::fs::{Mode, OFlags};
use serde::Serialize;

use super::FileId;
use super::inventory::{Inventory, list_dir};
use super::users::Users;
use crate::error::Result;
use crate::store::ids::Digest;
use crate::store::{Store, openat_beneath};
use crate::kernel::sys;

/// What other nodes sharing the store hold, as far as this node can
/// tell: images locked by users it does not know (their mounts' loop
/// devices hold the locks) and, for uppers with multi-mount protection,
/// the node named in the image.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Elsewhere {
    /// Layers locked by a user this node does not know.
    pub layers: Vec<Digest>,
    pub uppers: Vec<UpperElsewhere>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct UpperElsewhere {
    pub image: PathBuf,
    /// The node an MMP-protected image names as its last writer.
    pub node: Option<String>,
}

pub fn held_elsewhere(store: &Store) -> Result<Elsewhere> {
    let inv = Inventory::scan(store)?;
    let users = Users::scan();
    let mut out = Elsewhere { layers: inv.ids().filter(|id| users.held_elsewhere(&inv, id)).copied().collect(), uppers: vec![] };
    for (_, h) in &inv.dirs {
        for (name, path) in list_dir(h, "uppers").unwrap_or_default() {
            if name.starts_with('.') || !name.ends_with(".img") {
                continue;
            }
            let Ok(fd) = openat_beneath(&h.fd, &h.path, &format!("uppers/{name}"), OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty()) else {
                continue;
            };
            let Ok(st) = rustix::fs::fstat(&fd) else { continue };
            let file = FileId { dev: st.st_dev, ino: st.st_ino };
            if !users.loops_of_file(file, &path).is_empty() || sys::ofd_write_lock_free(&fd) != Ok(false) {
                continue;
            }
            let node = crate::upper::mmp::read(&fd).filter(|b| b.state() == crate::upper::mmp::MmpState::Active).map(|b| b.node);
            out.uppers.push(UpperElsewhere { image: path, node });
        }
    }
    Ok(out)
}
