//! What the benchmarks share: running a host command, a work directory
//! removed however a bench ends, OCI images built with umoci, and PSI
//! pressure over a section (a hint of load from outside the bench).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Run a command on the host; panic with its stderr if it fails.
pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

pub fn sh(script: &str) {
    run(Command::new("sh").args(["-ec", script]));
}

/// Removes the bench's work directory however the bench ends.
pub struct Work(pub PathBuf);

impl Drop for Work {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One tag of an OCI layout built with umoci, one `umoci repack` per step
/// (each step a shell script run in the rootfs): one layer per step.
pub fn umoci_image(layout: &Path, tag: &str, steps: &[&str]) {
    let b = layout.with_file_name(format!("bundle-{tag}"));
    if !layout.exists() {
        run(Command::new("umoci").args(["init", "--layout"]).arg(layout));
    }
    run(Command::new("umoci").args(["new", "--image"]).arg(format!("{}:{tag}", layout.display())));
    for step in steps {
        let _ = std::fs::remove_dir_all(&b);
        run(Command::new("umoci").args(["unpack", "--image"]).arg(format!("{}:{tag}", layout.display())).arg(&b));
        sh(&format!("cd {}/rootfs && {step}", b.display()));
        run(Command::new("umoci").args(["repack", "--image"]).arg(format!("{}:{tag}", layout.display())).arg(&b));
    }
    let _ = std::fs::remove_dir_all(&b);
}

/// Microseconds some task stalled on `res` ("cpu", "io") since boot.
pub fn pressure_us(res: &str) -> Option<u64> {
    let t = std::fs::read_to_string(format!("/proc/pressure/{res}")).ok()?;
    t.lines().find(|l| l.starts_with("some "))?.split_whitespace().find_map(|f| f.strip_prefix("total="))?.parse().ok()
}

/// PSI "some" counters at the start of a section.
pub struct Pressure {
    cpu: Option<u64>,
    io: Option<u64>,
    since: Instant,
}

impl Pressure {
    pub fn now() -> Pressure {
        Pressure { cpu: pressure_us("cpu"), io: pressure_us("io"), since: Instant::now() }
    }

    /// Share of the wall time since `now()` during which some task stalled
    /// on `res`.
    pub fn share(&self, res: &str) -> String {
        let start = if res == "cpu" { self.cpu } else { self.io };
        match (start, pressure_us(res)) {
            (Some(a), Some(b)) => format!("{:.0}%", (b - a) as f64 / 1e4 / self.since.elapsed().as_secs_f64()),
            _ => "?".into(),
        }
    }

    pub fn report(&self) -> String {
        format!("CPU {}, I/O {}", self.share("cpu"), self.share("io"))
    }
}
