//! sharedloop: mount container images whose layers are filesystem image
//! files, through loop devices and one overlayfs mount.

// All `unsafe` lives in `sys`, each block with a `// SAFETY:` note.
#![deny(unsafe_code)]

pub mod error;
pub mod bytes;
pub mod procs;
pub mod ids;
pub mod command;
pub mod image;
pub mod beneath;
pub mod store;
pub mod staging;
pub mod argv;
pub mod kernel;
pub mod mountinfo;
pub mod opts;
#[allow(unsafe_code)]
pub mod sys;
pub mod utab;
pub mod mount;
pub mod config;
pub mod helper;
pub mod interrupt;
pub mod logging;
pub mod loopdev;
pub mod mountapi;
pub mod state;
pub mod upper;
pub mod mmp;
pub mod superblock;
pub mod cli;
pub mod manage;
pub mod import;
pub mod status;
pub mod sharedfs;

/// The property tests' configuration: the same cases on every run (CI
/// never fails by chance), no regression files written into the tree.
#[cfg(test)]
pub(crate) fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_1007),
        ..Default::default()
    }
}
