//! Signals and injected failures, checked between the steps of a mount.
//!
//! SIGINT/SIGTERM/SIGHUP only raise a flag; the step that sees it returns
//! `Error::Interrupted` and the guards undo what was done, so a signal takes
//! the same well-tested path as any failure. (SIGKILL cannot be caught: what
//! it leaves is covered by AUTOCLEAR loop devices and detached mounts.)
//!
//! SHAREDLOOP_FAILPOINT (for tests) names one step: `STEP` fails there,
//! `STEP@N` fails there for the Nth item (layers count from 0), and
//! `pause:STEP[@N]` stops there, printing "paused at STEP" on stderr, until
//! a signal arrives; `stop:STEP[@N]` prints "stopped at STEP" and stops the
//! process (SIGSTOP) there, to go on normally at SIGCONT, so that a test
//! can act in between (another import publishing first, say).

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

pub const ENV: &str = "SHAREDLOOP_FAILPOINT";

/// Steps a failure can be injected at, in mount order.
pub const STEPS: &[&str] = &[
    "resolve",
    "layer-attach",
    "layer-mount",
    "upper-create",
    "upper-attach",
    "upper-mount",
    "overlay",
    "state",
    "utab",
];

pub fn install() {
    let flag = FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
        let _ = signal_hook::flag::register(sig, Arc::clone(flag));
    }
}

pub fn interrupted() -> bool {
    FLAG.get().is_some_and(|f| f.load(Ordering::SeqCst))
}

fn matches(spec: &str, step: &str, index: Option<usize>) -> bool {
    match spec.split_once('@') {
        Some((s, n)) => s == step && index.is_some_and(|i| n.parse::<usize>().ok() == Some(i)),
        None => spec == step,
    }
}

/// Called before each step: fail if a signal came or a test asked for it.
pub fn step(step: &str, index: Option<usize>) -> Result<()> {
    if interrupted() {
        return Err(Error::Interrupted);
    }
    let Ok(spec) = std::env::var(ENV) else { return Ok(()) };
    if let Some(p) = spec.strip_prefix("pause:") {
        if matches(p, step, index) {
            eprintln!("sharedloop: paused at {p}");
            while !interrupted() {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            return Err(Error::Interrupted);
        }
    } else if let Some(p) = spec.strip_prefix("stop:") {
        if matches(p, step, index) {
            eprintln!("sharedloop: stopped at {p}");
            let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::STOP);
        }
    } else if matches(&spec, step, index) {
        return Err(Error::Injected(spec));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn spec_matching() {
        assert!(matches("overlay", "overlay", None));
        assert!(!matches("overlay", "utab", None));
        assert!(matches("layer-mount@3", "layer-mount", Some(3)));
        assert!(!matches("layer-mount@3", "layer-mount", Some(2)));
        assert!(!matches("layer-mount@x", "layer-mount", Some(0)));
        assert!(matches("layer-mount", "layer-mount", Some(7)));
    }
}
