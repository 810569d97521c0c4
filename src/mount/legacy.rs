//! The legacy way (any kernel, the new mount API not needed): layers are
//! mounted with mount(2) in the private scratch, and the overlay with one
//! mount(2) whose `lowerdir=0:1:2...` is relative to the scratch (as
//! docker's overlay2 shortens its paths), mounted in the scratch first and
//! moved onto the target once recorded. The option string is refused
//! before the call if it would not fit in the page mount(2) copies: the
//! kernel would cut it short silently and mount fewer layers.

use std::path::{Path, PathBuf};

use rustix::mount::MountFlags;

use super::scratch::Scratch;
use super::upper::UpperReady;
use super::{Overlay, Plan, Ready, Way, explain_refusal, legacy_flags};
use crate::error::{Error, Result};
use crate::interrupt::step;
use crate::kernel::loopdev::LoopDevice;
use crate::store::Layer;

/// Page size minus the NUL: mount(2) copies at most one page of options.
pub const LEGACY_OPTS_MAX: usize = 4095;

pub struct LegacyWay {
    pub scratch: Scratch,
}

impl Way for LegacyWay {
    fn layer(&self, plan: &Plan, i: usize, layer: &Layer, found: Option<LoopDevice>) -> Result<Ready> {
        let dir = self.scratch.sub(&i.to_string())?;
        let dev = plan.layer_loop(found, layer, i)?;
        step("layer-mount", Some(i))?;
        rustix::mount::mount(dev.path(), &dir, layer.meta.fstype.as_str(), MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID, c"")
            .map_err(|e| Error::sys(format!("layer {}: mount {}", layer.meta.chain_id, layer.meta.fstype), dev.path(), e))
            .map_err(|e| explain_refusal(layer, e))?;
        Ok(Ready { record: plan.layer_record(layer, Some(&dev)), mnt: None, dir: Some(dir) })
    }

    fn upper(&self, plan: &Plan) -> Result<Option<UpperReady>> {
        if plan.upper.is_none() {
            return Ok(None);
        }
        plan.prepare_upper(Some(&self.scratch.sub("u")?))
    }

    fn overlay(&self, plan: &Plan, layers: &[Ready], upper: Option<&UpperReady>, read_only: bool) -> Result<Overlay> {
        let mut lowers = layers.len();
        if plan.needs_empty_lower(upper.is_some()) {
            // Named like the layers so the option string stays 0:1:...:N.
            self.scratch.sub(&lowers.to_string())?;
            lowers += 1;
        }
        let data = legacy_data(lowers, upper.is_some(), &plan.overlay_opts)?;
        let mut flags = legacy_flags(&plan.flags);
        if read_only {
            flags |= MountFlags::RDONLY;
        }
        let data_c = std::ffi::CString::new(data).map_err(|_| Error::Internal("NUL in overlay options".into()))?;
        // Mounted first in the (private) scratch directory, where nobody
        // looks, then moved onto the target once it is recorded.
        let ovl = self.scratch.sub("ovl")?;
        // Relative lowerdirs resolve against our cwd: the scratch tmpfs.
        let cwd = CwdGuard::enter(&self.scratch.path)?;
        let r = rustix::mount::mount(plan.source.as_str(), &ovl, "overlay", flags, data_c.as_c_str());
        drop(cwd);
        r.map_err(|e| Error::sys("mount overlay", &plan.target, e))?;
        Ok(Overlay::InScratch(ovl))
    }
}

/// chdir for the legacy mount call, back to / afterwards whatever happens.
struct CwdGuard(PathBuf);

impl CwdGuard {
    fn enter(dir: &Path) -> Result<CwdGuard> {
        let old = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        std::env::set_current_dir(dir).map_err(|e| Error::io("chdir", dir, &e))?;
        Ok(CwdGuard(old))
    }
}

impl Drop for CwdGuard {
    fn drop(&mut self) {
        if std::env::set_current_dir(&self.0).is_err() {
            let _ = std::env::set_current_dir("/");
        }
    }
}

/// The option string for the legacy overlay mount: lowers named 0..N-1
/// relative to the scratch directory, upper at u/. Refused, never cut,
/// when it would not fit in the page mount(2) copies.
pub fn legacy_data(layers: usize, has_upper: bool, overlay_opts: &[(String, Option<String>)]) -> Result<String> {
    let lower: Vec<String> = (0..layers).map(|i| i.to_string()).collect();
    let mut data = format!("lowerdir={}", lower.join(":"));
    if has_upper {
        data.push_str(",upperdir=u/upper,workdir=u/work");
    }
    for (k, v) in overlay_opts {
        match v {
            Some(v) => data.push_str(&format!(",{k}={v}")),
            None => data.push_str(&format!(",{k}")),
        }
    }
    if data.len() > LEGACY_OPTS_MAX {
        return Err(Error::Unsupported(format!(
            "overlay options would be {} bytes, more than the {LEGACY_OPTS_MAX} that mount(2) takes without cutting them short; this needs {} or fewer layers",
            data.len(),
            crate::kernel::Feature::LowerdirAdd.describe()
        )));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_options_never_cut() {
        let d = legacy_data(3, true, &[("metacopy".into(), Some("on".into())), ("volatile".into(), None)]).unwrap();
        assert_eq!(d, "lowerdir=0:1:2,upperdir=u/upper,workdir=u/work,metacopy=on,volatile");
        // 500 layers (overlayfs' maximum) fit with relative names...
        let d = legacy_data(500, true, &[]).unwrap();
        assert_eq!(d.matches(':').count(), 499);
        assert!(d.len() <= LEGACY_OPTS_MAX);
        // ...and a string past a page is refused, not truncated.
        let e = legacy_data(1100, false, &[]).unwrap_err().to_string();
        assert!(e.contains("more than the 4095"), "{e}");
    }
}
