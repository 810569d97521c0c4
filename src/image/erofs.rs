//! The erofs image: written in-process by `erofs_writer` from the tree,
//! with the plan's UUID, so that the same tree gives the same image.
//!
//! Not mkfs.erofs: Debian 12's (erofs-utils 1.5) cannot store a 255-byte
//! name and fails on real images with "Could not format the device", and
//! it keeps whole seconds of mtime only. The writer keeps every name
//! NAME_MAX allows and nanosecond mtimes; it writes uncompressed images
//! (lz4 is not there yet), whose blocks the page cache holds as they are.

use std::path::Path;

use super::build::uuid_bytes;
use super::erofs_writer::write_dir;
use super::size::Plan;
use crate::error::Result;

pub(super) fn build(dir: &Path, out: &Path, plan: &Plan, lz4: bool) -> Result<()> {
    write_dir(dir, out, uuid_bytes(&plan.fingerprint[..16]), lz4)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::image::testutil::build_and_check;
    use crate::store::FsType;

    #[test]
    fn erofs_image_keeps_files_whiteouts_and_opaque_dirs() {
        build_and_check(FsType::Erofs);
    }
}
