//! sharedloop: mount container images whose layers are filesystem image
//! files, through loop devices and one overlayfs mount.

pub mod error;
pub mod ids;
pub mod store;
pub mod argv;
pub mod kernel;
pub mod mountinfo;
pub mod opts;
pub mod sys;
pub mod utab;
