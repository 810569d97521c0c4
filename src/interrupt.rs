//! Signals and injected failures, checked between the steps of a mount.
//!
//! SIGINT/SIGTERM/SIGHUP only raise a flag; the step that sees it returns
//! `Error::Interrupted` and the guards undo what was done, so a signal takes
//! the same well-tested path as any failure. Every wait polls the flag (locks,
//! child commands, loop devices). One thing cannot: a system call the kernel
//! does not interrupt, such as a read from a file server that does not
//! answer (NFS hard mounts wait until a fatal signal). So a watchdog thread
//! gives the undo [`GRACE`] after the first signal and then ends the process
//! with exit 8 anyway; what that leaves is what a SIGKILL leaves, which the
//! design reconciles (AUTOCLEAR loop devices, detached mounts, records
//! written before a mount is visible: see `state`).
//!
//! SHAREDLOOP_FAILPOINT (for tests) names one step: `STEP` fails there,
//! `STEP@N` fails there for the Nth item (layers count from 0), and
//! `pause:STEP[@N]` stops there, printing "paused at STEP" on stderr, until
//! a signal arrives; `stop:STEP[@N]` prints "stopped at STEP" and stops the
//! process (SIGSTOP) there, to go on normally at SIGCONT, so that a test
//! can act in between (another import publishing first, say);
//! `block:STEP[@N]` stops there ignoring signals, as a system call the
//! kernel does not interrupt would (for the watchdog's test).

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
    "attach",
];

/// How long the undo may take after the first signal before the watchdog
/// ends the process (undoing even 500 layers takes well under a second).
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(5);

static INSTALLED: std::sync::Once = std::sync::Once::new();

pub fn install() {
    INSTALLED.call_once(|| {
        let flag = FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)));
        let sigs = [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP];
        for sig in sigs {
            let _ = signal_hook::flag::register(sig, Arc::clone(flag));
        }
        let Ok(mut signals) = signal_hook::iterator::Signals::new(sigs) else { return };
        let _ = std::thread::Builder::new().name("sharedloop-watchdog".into()).spawn(move || {
            let Some(sig) = signals.forever().next() else { return };
            std::thread::sleep(GRACE);
            log::error!(
                "signal {sig}: still not done {} s later (blocked in the kernel, by a file server that does not answer?); \
                 exiting now: what is left is cleaned up by the next sharedloop command",
                GRACE.as_secs()
            );
            crate::mount::scratch::detach_all_before_exit();
            std::process::exit(crate::error::ExitCode::Interrupted as i32);
        });
    });
}

/// The error to report for `e`: once a signal has come, every failure is
/// the interruption (a system call may have ended with EINTR, or a wait
/// given up), and the guards have undone what was done.
pub fn after_signal(e: Error) -> Error {
    if interrupted() && !matches!(e, Error::Interrupted) {
        log::debug!("after a signal: {e}");
        return Error::Interrupted;
    }
    e
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
    } else if let Some(p) = spec.strip_prefix("block:") {
        if matches(p, step, index) {
            eprintln!("sharedloop: blocked at {p}");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
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
