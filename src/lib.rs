//! sharedloop: mount container images whose layers are filesystem image
//! files, through loop devices and one overlayfs mount.

// All `unsafe` lives in `kernel::sys`, each block with a `// SAFETY:` note.
#![deny(unsafe_code)]

pub mod error;
pub mod bytes;
pub mod command;
pub mod interrupt;
pub mod kernel;
pub mod store;
pub mod image;
pub mod import;
pub mod mount;
pub mod upper;
pub mod manage;
pub mod bundle;
pub mod cli;

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
