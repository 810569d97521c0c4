//! The fd way (overlayfs layers as file descriptors, 6.13+): every layer
//! and the upper are detached mounts, handed to overlayfs by fd with
//! `lowerdir+`. Nothing but the overlay ever appears in a mount tree, and
//! a SIGKILL at any point leaves nothing mounted: the fds go with us.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use rustix::mount::MountAttrFlags;

use super::upper::UpperReady;
use super::{Overlay, Plan, Ready, Way};
use crate::error::Result;
use crate::store::ids::Digest;
use crate::kernel::loopdev::LoopDevice;
use crate::kernel::mountapi::FsContext;
use crate::store::Layer;

/// Detached layer mounts kept across several views (the import mounts
/// the chain below each layer it unpacks): a layer already in it is
/// handed over again instead of mounted again.
#[derive(Default)]
pub struct LayerCache(Mutex<HashMap<Digest, OwnedFd>>);

impl LayerCache {
    fn get(&self, id: &Digest) -> Option<OwnedFd> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(id).and_then(|fd| fd.try_clone().ok())
    }
    fn put(&self, id: Digest, fd: &OwnedFd) {
        if let Ok(c) = fd.try_clone() {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(id, c);
        }
    }
}

pub struct FdWay<'a> {
    pub cache: Option<&'a LayerCache>,
}

impl Way for FdWay<'_> {
    fn layer(&self, plan: &Plan, i: usize, layer: &Layer, found: Option<LoopDevice>) -> Result<Ready> {
        if let Some(mnt) = self.cache.and_then(|c| c.get(&layer.meta.chain_id)) {
            return Ok(Ready { record: plan.layer_record(layer, found.as_ref()), mnt: Some(mnt), dir: None });
        }
        let r = plan.layer_detached(found, layer, i)?;
        if let (Some(c), Some(m)) = (self.cache, &r.mnt) {
            c.put(layer.meta.chain_id, m);
        }
        Ok(r)
    }

    fn upper(&self, plan: &Plan) -> Result<Option<UpperReady>> {
        plan.prepare_upper(None)
    }

    fn overlay(&self, plan: &Plan, layers: &[Ready], upper: Option<&UpperReady>, read_only: bool) -> Result<Overlay> {
        let ctx = plan.overlay_ctx()?;
        for (r, l) in layers.iter().zip(&plan.layers) {
            ctx.set_fd("lowerdir+", r.mnt.as_ref().expect("detached"))
                .map_err(|e| e.context(&format!("layer {}", l.meta.chain_id)))?;
        }
        // Must outlive create(): closing a detached mount's last fd dissolves it.
        let empty = if plan.needs_empty_lower(upper.is_some()) { Some(empty_lower()?) } else { None };
        if let Some(e) = &empty {
            ctx.set_fd("lowerdir+", e)?;
        }
        if let Some(u) = upper {
            ctx.set_fd("upperdir", &u.upper_dir)?;
            ctx.set_fd("workdir", &u.work_dir)?;
        }
        let mnt = plan.create_overlay(&ctx, read_only)?;
        // The context goes first (at return): it holds a reference to every
        // layer mount, and releasing those before our fds makes the fds'
        // close cheaper (measured 1 ms instead of 4-5 for 128 layers).
        Ok(Overlay::Detached(mnt))
    }
}

/// An empty read-only directory as a detached mount.
fn empty_lower() -> Result<OwnedFd> {
    let ctx = FsContext::open("tmpfs", "empty lower layer", "tmpfs")?;
    ctx.set_string("source", "sharedloop-empty")?;
    ctx.set_string("size", "4k")?;
    ctx.set_string("mode", "0755")?;
    ctx.create()?;
    ctx.mount(MountAttrFlags::MOUNT_ATTR_RDONLY)
}
