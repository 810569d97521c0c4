//! sharedloop: mount container images whose layers are filesystem image
//! files, through loop devices and one overlayfs mount.

pub mod error;
pub mod ids;
pub mod layer_build;
pub mod store;
pub mod argv;
pub mod kernel;
pub mod mountinfo;
pub mod opts;
pub mod sys;
pub mod utab;
pub mod assemble;
pub mod config;
pub mod helper;
pub mod interrupt;
pub mod logging;
pub mod loopdev;
pub mod mountapi;
pub mod state;
pub mod upper;
pub mod cli;
pub mod manage;
pub mod import;
pub mod status;
