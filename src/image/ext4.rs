//! The ext4 image: mke2fs populates it from the tree (`-d`) with the
//! plan's inode count, UUID and hash seed, and the newest mtime as the
//! build time, so that the same tree gives the same image; no journal and
//! no resize inode, as a read-only image never grows and never replays a
//! journal. debugfs then fixes what mke2fs gets wrong about the top
//! directory.

use std::path::Path;

use super::build::{LABEL, set_size, uuid_from};
use super::size::Plan;
use crate::command::Cmd;
use crate::error::{Error, Result};

pub(super) fn build(dir: &Path, out: &Path, plan: &Plan) -> Result<()> {
    set_size(out, plan.bytes)?;
    let uuid = uuid_from(&plan.fingerprint[..16]);
    let seed = uuid_from(&plan.fingerprint[16..]);
    let mut cmd = Cmd::new("mkfs.ext4");
    cmd.args([
        "-q", "-F", "-L", LABEL, "-T", "default", "-m", "0", "-b", "4096", "-I", "256",
    ])
    // Read-only images never grow and never replay a journal.
    .args(["-O", "^has_journal,^resize_inode", "-U", &uuid])
    .arg("-E")
    .arg(format!("root_owner=0:0,nodiscard,hash_seed={seed}"))
    .arg("-N")
    .arg(plan.inodes.to_string())
    .arg("-d")
    .arg(dir)
    .arg(out)
    .env("E2FSPROGS_FAKE_TIME", plan.newest.to_string());
    cmd.run("build ext4 image")?;
    fix_ext4_root(out, plan)
}

/// mke2fs 1.47.0 -d neither copies the top directory's owner, mode and
/// mtime nor leaves out lost+found, which would show up in every container
/// using the layer; debugfs fixes both.
fn fix_ext4_root(out: &Path, plan: &Plan) -> Result<()> {
    let r = &plan.root;
    let mut script = String::new();
    if !plan.has_lost_found {
        script.push_str("rmdir lost+found\n");
    }
    script.push_str(&format!(
        "sif / mode 0{:o}\nsif / uid {}\nsif / gid {}\nsif / mtime @{}\n",
        0o40000 | r.mode,
        r.uid,
        r.gid,
        r.mtime.max(0)
    ));
    let mut cmd = Cmd::new("debugfs");
    cmd.args(["-w", "-f", "-"])
        .arg(out)
        .env("E2FSPROGS_FAKE_TIME", plan.newest.to_string());
    let stderr = cmd.run_with_input("fix ext4 image root", script.as_bytes())?;
    // debugfs exits 0 even when a command fails; its only normal stderr
    // line is the version banner.
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with("debugfs "))
        .collect();
    if !errors.is_empty() {
        return Err(Error::Command {
            what: "fix ext4 image root".into(),
            cmd: cmd.render(),
            status: "errors".into(),
            stderr: errors.join("; "),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::image::size::MIB;
    use crate::image::testutil::build_and_check;
    use crate::store::FsType;

    #[test]
    fn ext4_image_keeps_files_whiteouts_and_opaque_dirs() {
        let size = build_and_check(FsType::Ext4);
        // Tiny tree: the 16 MiB floor plus the inode table, rounded to MiB.
        assert_eq!(size, 17 * MIB);
    }
}
