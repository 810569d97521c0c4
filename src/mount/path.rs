//! The path way (overlayfs `lowerdir+`, 6.8+, layers not yet by fd):
//! layers are made as detached mounts, attached in the private scratch and
//! passed by path, one `lowerdir+` each, so there is no page-sized limit
//! on the options. The scratch is detached right after the overlay is
//! made; overlayfs keeps its own references to the layers.

use super::scratch::Scratch;
use super::upper::UpperReady;
use super::{Overlay, Plan, Ready, Way};
use crate::error::Result;
use crate::kernel::loopdev::LoopDevice;
use crate::kernel::mountapi::attach_at;
use crate::store::Layer;

pub struct PathWay {
    pub scratch: Scratch,
}

impl Way for PathWay {
    fn layer(&self, plan: &Plan, i: usize, layer: &Layer, found: Option<LoopDevice>) -> Result<Ready> {
        let mut r = plan.layer_detached(found, layer, i)?;
        let d = self.scratch.sub(&i.to_string())?;
        attach_at(r.mnt.as_ref().expect("detached"), &d)?;
        r.dir = Some(d);
        Ok(r)
    }

    fn upper(&self, plan: &Plan) -> Result<Option<UpperReady>> {
        if plan.upper.is_none() {
            return Ok(None);
        }
        plan.prepare_upper(Some(&self.scratch.sub("u")?))
    }

    fn overlay(&self, plan: &Plan, layers: &[Ready], upper: Option<&UpperReady>, read_only: bool) -> Result<Overlay> {
        let ctx = plan.overlay_ctx()?;
        for r in layers {
            ctx.set_string("lowerdir+", r.dir.as_ref().expect("in scratch"))?;
        }
        if plan.needs_empty_lower(upper.is_some()) {
            ctx.set_string("lowerdir+", self.scratch.sub("empty")?)?;
        }
        if upper.is_some() {
            let u = self.scratch.path.join("u");
            ctx.set_string("upperdir", u.join("upper"))?;
            ctx.set_string("workdir", u.join("work"))?;
        }
        Ok(Overlay::Detached(plan.create_overlay(&ctx, read_only)?))
    }
}
