//! The private tmpfs the path and legacy ways mount layers (and the
//! upper, and the legacy overlay) in, under the state directory.
//!
//! Named `<pid>-<start time>-<uniq>` so that `state::reconcile` can tell a
//! dead process's scratch from a live one's and detach what a SIGKILL
//! left. Private propagation: nothing mounted in it reaches peers.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::mount::{MountFlags, UnmountFlags};

use crate::error::{Error, Result};
use crate::store::unique_suffix;

/// The scratch directories of this process that are mounted now, for the
/// watchdog: a process it ends has no guards left to run, and a scratch is
/// the one thing a path or legacy mount holds *attached* (the fd way holds
/// only detached mounts, which go with the process).
static MOUNTED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Detach and remove every scratch this process still has mounted: called
/// by the watchdog right before it ends the process. Detaching is lazy, so
/// a thread blocked on something in the scratch is not in the way; the
/// layer mounts in it, and so their loop devices (autoclear), go with it.
pub fn detach_all_before_exit() {
    // try_lock: the lock is only ever held for a push or a remove, but the
    // thread holding it may be the one that is blocked.
    let Ok(mut live) = MOUNTED.try_lock() else { return };
    for p in live.drain(..) {
        let _ = rustix::mount::unmount(&p, UnmountFlags::DETACH);
        let _ = std::fs::remove_dir(&p);
    }
}

/// Dropping it detaches the whole subtree and removes the directory;
/// mounts made from it that something still holds (the overlay's own
/// references to its layers, an fd of the import's view) live on,
/// detached.
pub struct Scratch {
    pub path: PathBuf,
    mounted: bool,
}

impl Scratch {
    pub fn new(state_dir: &Path) -> Result<Scratch> {
        let parent = state_dir.join("scratch");
        crate::store::mkdir_p(&parent)?;
        let me = std::process::id();
        let path = parent.join(format!("{me}-{}-{}", crate::kernel::procs::start_time(me).unwrap_or(0), unique_suffix()));
        std::fs::create_dir(&path).map_err(|e| Error::io("create scratch directory", &path, &e))?;
        let mut s = Scratch { path, mounted: false };
        rustix::mount::mount("sharedloop", &s.path, "tmpfs", MountFlags::NOSUID | MountFlags::NODEV, c"mode=0700,size=64k")
            .map_err(|e| Error::sys("mount scratch tmpfs", &s.path, e))?;
        s.mounted = true;
        MOUNTED.lock().unwrap_or_else(|e| e.into_inner()).push(s.path.clone());
        rustix::mount::mount_change(&s.path, rustix::mount::MountPropagationFlags::PRIVATE)
            .map_err(|e| Error::sys("make scratch private", &s.path, e))?;
        Ok(s)
    }

    /// A new empty directory in the scratch.
    pub fn sub(&self, name: &str) -> Result<PathBuf> {
        let p = self.path.join(name);
        std::fs::create_dir(&p).map_err(|e| Error::io("create scratch directory", &p, &e))?;
        Ok(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.mounted {
            let _ = rustix::mount::unmount(&self.path, UnmountFlags::DETACH);
            MOUNTED.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| p != &self.path);
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}
