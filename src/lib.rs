//! sharedloop: mount container images whose layers are filesystem image
//! files, through loop devices and one overlayfs mount.

pub mod error;
pub mod ids;
pub mod store;
