//! The erofs image: mkfs.erofs builds it from the tree in one go (lz4hc
//! compressed), with the plan's UUID and the newest mtime as the build
//! time, so that the same tree gives the same image.

use std::path::Path;

use super::build::uuid_from;
use super::size::Plan;
use crate::command::Cmd;
use crate::error::Result;

pub(super) fn build(dir: &Path, out: &Path, plan: &Plan) -> Result<()> {
    let uuid = uuid_from(&plan.fingerprint[..16]);
    let mut cmd = Cmd::new("mkfs.erofs");
    cmd.args(["--quiet", "-zlz4hc", "--preserve-mtime", "-U", &uuid])
        .arg(out)
        .arg(dir)
        // The build time; mtimes newer than it would be clamped, and none is.
        .env("SOURCE_DATE_EPOCH", plan.newest.to_string());
    cmd.run("build erofs image")?;
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
