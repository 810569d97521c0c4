//! What an import tells the person running it, on stderr: a progress bar
//! (bytes of the current layer's blob, which layer of how many, what is
//! being done) when stderr is a terminal, one plain line per layer
//! otherwise (logs, CI), nothing with --quiet.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::store::ids::Digest;

pub enum Progress {
    Quiet,
    Lines { layers: usize },
    Bar { layers: usize, bar: ProgressBar },
}

/// "12.3 MiB" (or KiB below one MiB).
pub fn mib(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

impl Progress {
    pub fn new(quiet: bool, layers: usize) -> Progress {
        if quiet {
            return Progress::Quiet;
        }
        if !std::io::stderr().is_terminal() {
            return Progress::Lines { layers };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{prefix:.bold} [{bar:25}] {bytes}/{total_bytes} {bytes_per_sec} {wide_msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress::Bar { layers, bar }
    }

    /// Layer `i` (from 0) starts: its blob has `size` bytes if known.
    pub fn start(&self, i: usize, chain: &Digest, size: Option<u64>) {
        if let Progress::Bar { layers, bar } = self {
            bar.set_prefix(format!("layer {}/{layers}", i + 1));
            bar.set_message(format!("{} unpacking", chain.short()));
            bar.reset();
            bar.set_length(size.unwrap_or(0));
        }
    }

    /// Bytes of the blob read so far.
    pub fn bytes(&self, n: u64) {
        if let Progress::Bar { bar, .. } = self {
            if bar.length().unwrap_or(0) < bar.position() + n {
                bar.set_length(bar.position() + n);
            }
            bar.inc(n);
        }
    }

    /// A phase of the current layer ("building ext4 image").
    pub fn phase(&self, chain: &Digest, what: &str) {
        if let Progress::Bar { bar, .. } = self {
            bar.set_message(format!("{} {what}", chain.short()));
        }
    }

    /// Layer `i` is done; `note` says how ("", "already in the root store").
    pub fn done(&self, i: usize, chain: &Digest, bytes: Option<u64>, note: &str) {
        let size = bytes.map(|b| format!(" {}", mib(b))).unwrap_or_default();
        let note = if note.is_empty() { String::new() } else { format!(" ({note})") };
        match self {
            Progress::Quiet => {}
            Progress::Lines { layers } => eprintln!("layer {}/{layers} {chain}{size}{note}", i + 1),
            Progress::Bar { layers, bar } => bar.println(format!("layer {}/{layers} {chain}{size}{note}", i + 1)),
        }
    }

    pub fn finish(&self) {
        if let Progress::Bar { bar, .. } = self {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::mib(1536), "1.5 KiB");
        assert_eq!(super::mib(12_900_000), "12.3 MiB");
    }
}
