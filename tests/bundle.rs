//! `sharedloop bundle` and `unbundle`: a real busybox image (Debian's
//! busybox-static in one layer, its config set with `umoci config`),
//! imported, bundled and run with runc; what the container prints must be
//! the image's own Env, args, working directory and user. Also: `-- ARGS`,
//! an image made by `add` (no config), a writable rootfs, the image config
//! records in the store (rm, gc, verify, a name re-pointed by a sharedloop
//! that knows nothing of configs), and the errors, each leaving nothing.
//!
//! runc keeps its state in a directory of the test (`runc --root`); every
//! container is deleted by a guard.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};



/// The image's process prints its env, cwd, uid, gid and groups.
const CMD: &str = "echo $FOO; pwd; id -u; id -g; id -G";
const WANT: &str = "from-image\n/srv/work\n1234\n2345\n2345 3456\n";

/// A busybox rootfs: the static binary, a few applets, the mount points
/// runc needs, accounts for `app`.
fn rootfs_script(r: &str) -> String {
    format!(
        "mkdir -p {r}/bin {r}/etc {r}/proc {r}/sys {r}/dev {r}/srv/work {r}/tmp; chmod 1777 {r}/tmp
cp /bin/busybox {r}/bin/busybox
for a in sh echo id pwd cat ls env; do ln -s busybox {r}/bin/$a; done
printf 'root:x:0:0:root:/root:/bin/sh\\napp:x:1234:2345::/srv:/bin/sh\\n' > {r}/etc/passwd
printf 'root:x:0:\\napp:x:2345:\\nextra:x:3456:app\\n' > {r}/etc/group
"
    )
}

/// An OCI layout L with tag `t` (the full config), `nouser` (User
/// `nobody`, who is not in the image's /etc/passwd), `inside` (its
/// /etc/passwd a symlink to ../srv/passwd) and `escape` (a symlink that
/// climbs out of the image to the host's /etc/passwd).
fn build_image(env: &Env) -> PathBuf {
    need("umoci");
    assert!(Path::new("/bin/busybox").exists(), "busybox-static is needed: run scripts/install-deps.sh");
    let dir = env.dir.join("fixture");
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        "set -eu
umoci init --layout L
umoci new --image L:t
umoci unpack --image L:t B >/dev/null
{}
umoci repack --image L:t B
umoci config --image L:t --config.env FOO=from-image --config.env PATH=/bin \
  --config.entrypoint /bin/sh --config.entrypoint -c --config.cmd '{CMD}' \
  --config.workingdir /srv/work --config.user app
umoci config --image L:t --tag nouser --config.user nobody
# /etc/passwd a symlink: inside the image (followed), out of it (refused).
umoci unpack --image L:t C >/dev/null
mv C/rootfs/etc/passwd C/rootfs/srv/passwd
ln -s ../srv/passwd C/rootfs/etc/passwd
umoci repack --image L:inside C
rm C/rootfs/etc/passwd
ln -s ../../../../../../../../etc/passwd C/rootfs/etc/passwd
umoci repack --image L:escape C
rm -rf B C
",
        rootfs_script("B/rootfs")
    );
    sh(&script, &dir);
    dir.join("L")
}

fn import(env: &Env, source: &str, name: &str) {
    env.sl(&["import", source, "--name", name, "-q"]).ok();
}

/// `sharedloop bundle ARGS` on the test's store (given first: ARGS may
/// end with `-- ...`).
fn bundle(env: &Env, args: &[&str]) -> Run {
    let mut a = vec![BIN, "--loopback-root", s(&env.root), "--loopback-fallback", s(&env.fallback), "bundle"];
    a.extend_from_slice(args);
    env.run(&a)
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A runc container of the test: deleted (and its state directory
/// removed) on drop, whatever happened.
struct Container<'a> {
    env: &'a Env,
    root: PathBuf,
    id: String,
}

impl<'a> Container<'a> {
    fn new(env: &'a Env) -> Container<'a> {
        need("runc");
        let root = env.dir.join("runc-state");
        std::fs::create_dir_all(&root).unwrap();
        let id = format!("sl-test-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst));
        Container { env, root, id }
    }

    /// `runc run` in the foreground: the container's exit, stdout, stderr.
    fn run(&self, bundle: &Path) -> Run {
        self.env.run(&["runc", "--root", s(&self.root), "run", "--bundle", s(bundle), &self.id])
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self.env.run(&["runc", "--root", s(&self.root), "delete", "--force", &self.id]);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn config_json(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

/// Removes the bundle and checks it is gone whole.
#[track_caller]
fn unbundle(env: &Env, dir: &Path) {
    env.sl(&["unbundle", s(dir)]).ok();
    assert!(!dir.exists(), "{} left", dir.display());
}

#[test]
fn runc_runs_the_images_own_process() {
    let env = Env::new("bundle-run");
    let layout = build_image(&env);
    import(&env, &format!("oci:{}:t", layout.display()), "bb:1");
    let dir = env.dir.join("b1");
    let r = bundle(&env, &["bb:1", s(&dir)]);
    r.ok();
    assert_eq!(r.stdout, "");
    assert_eq!(r.stderr, "", "nothing to say for an image with a config");
    let c = config_json(&dir);
    assert_eq!(c["ociVersion"], "1.0.2");
    assert_eq!(c["process"]["args"], serde_json::json!(["/bin/sh", "-c", CMD]));
    assert_eq!(c["process"]["env"], serde_json::json!(["FOO=from-image", "PATH=/bin"]));
    assert_eq!(c["process"]["cwd"], "/srv/work");
    assert_eq!(c["process"]["user"], serde_json::json!({"uid": 1234, "gid": 2345, "additionalGids": [3456]}));
    assert_eq!(c["process"]["terminal"], false);
    assert_eq!(c["root"], serde_json::json!({"path": "rootfs", "readonly": true}));
    assert_eq!(c["annotations"]["org.sharedloop.image"], "bb:1");
    // DIR/rootfs is a sharedloop mount like any other.
    assert!(env.overlay_at(&dir.join("rootfs")).is_some(), "{:?}", env.my_mounts());
    {
        let ct = Container::new(&env);
        let out = ct.run(&dir);
        assert_eq!((out.code, out.stdout.as_str()), (0, WANT), "stderr: {}", out.stderr);
    }
    unbundle(&env, &dir);
    env.assert_clean();

    // Through docker-archive (a config whose file name is its digest) the
    // same process runs.
    need("skopeo");
    sh(&format!("skopeo --insecure-policy copy -q oci:{}:t docker-archive:da.tar:example/bb:2", layout.display()), &env.dir);
    import(&env, &format!("docker-archive:{}", env.dir.join("da.tar").display()), "bb:2");
    let dir = env.dir.join("b2");
    bundle(&env, &["bb:2", s(&dir)]).ok();
    {
        let ct = Container::new(&env);
        let out = ct.run(&dir);
        assert_eq!((out.code, out.stdout.as_str()), (0, WANT), "stderr: {}", out.stderr);
    }
    unbundle(&env, &dir);
    env.assert_clean();
}

#[test]
fn args_after_dashdash_replace_cmd_and_upper_makes_it_writable() {
    let env = Env::new("bundle-args");
    let layout = build_image(&env);
    import(&env, &format!("oci:{}:t", layout.display()), "bb:1");
    let dir = env.dir.join("b");
    // An empty directory that is there already is taken, and kept after.
    std::fs::create_dir(&dir).unwrap();
    bundle(&env, &["bb:1", s(&dir), "-o", "upper=tmpfs", "--", "echo over $FOO > /tmp/f; cat /tmp/f; id -un"]).ok();
    let c = config_json(&dir);
    assert_eq!(c["process"]["args"], serde_json::json!(["/bin/sh", "-c", "echo over $FOO > /tmp/f; cat /tmp/f; id -un"]));
    assert_eq!(c["root"]["readonly"], false);
    {
        let ct = Container::new(&env);
        let out = ct.run(&dir);
        assert_eq!((out.code, out.stdout.as_str()), (0, "over from-image\napp\n"), "stderr: {}", out.stderr);
    }
    env.sl(&["unbundle", s(&dir)]).ok();
    assert!(dir.is_dir(), "a directory bundle did not make stays");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    std::fs::remove_dir(&dir).unwrap();
    env.assert_clean();
}

#[test]
fn an_added_image_gets_the_defaults_and_says_so() {
    let env = Env::new("bundle-add");
    let tree = env.dir.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    sh(&rootfs_script(s(&tree)), &env.dir);
    let top = env.sl(&["add", s(&tree), "--name", "plain:1"]).ok().stdout.trim().to_string();
    let dir = env.dir.join("b");
    let r = bundle(&env, &["plain:1", s(&dir)]);
    r.ok();
    assert!(r.stderr.contains("image plain:1 has no image config") && r.stderr.contains("config.json has the defaults"), "{}", r.stderr);
    let c = config_json(&dir);
    assert_eq!(c["process"]["args"], serde_json::json!(["sh"]));
    assert_eq!(c["process"]["user"], serde_json::json!({"uid": 0, "gid": 0}));
    assert!(c["annotations"].get("org.sharedloop.config").is_none());
    unbundle(&env, &dir);
    bundle(&env, &["plain:1", s(&dir), "--", "sh", "-c", "echo $PATH; pwd; id -u; id -g"]).ok();
    {
        let ct = Container::new(&env);
        let out = ct.run(&dir);
        let want = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n/\n0\n0\n";
        assert_eq!((out.code, out.stdout.as_str()), (0, want), "stderr: {}", out.stderr);
    }
    unbundle(&env, &dir);
    // An image without the mount points runc needs: read-only, it could
    // not run; bundle says how to make it work.
    let bare = env.dir.join("bare");
    std::fs::create_dir_all(bare.join("bin")).unwrap();
    env.sl(&["add", s(&bare), "--name", "bare:1"]).ok();
    let r = bundle(&env, &["bare:1", s(&dir)]);
    r.ok();
    for m in ["/proc", "/dev", "/sys"] {
        assert!(r.stderr.contains(&format!("image bare:1 has no {m}, which runc cannot create on a read-only rootfs; bundle it with -o upper=tmpfs")), "{}", r.stderr);
    }
    unbundle(&env, &dir);
    let r = bundle(&env, &["bare:1", s(&dir), "-o", "upper=tmpfs"]);
    r.ok();
    assert!(!r.stderr.contains("runc cannot create"), "{}", r.stderr);
    unbundle(&env, &dir);
    // By layer ID: the chain mounts, no config (a name has it).
    let r = bundle(&env, &[&top, s(&dir)]);
    r.ok();
    assert!(r.stderr.contains("is a layer ID, not a name: no image config"), "{}", r.stderr);
    unbundle(&env, &dir);
    env.assert_clean();
}

fn store_file(env: &Env, rel: &str) -> Option<String> {
    std::fs::read_to_string(env.root.join(rel)).ok()
}

#[test]
fn the_store_keeps_configs_beside_names() {
    let env = Env::new("bundle-store");
    let layout = build_image(&env);
    import(&env, &format!("oci:{}:t", layout.display()), "bb:1");
    // The config blob verbatim, named by its digest; names/ as always.
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"].as_array().unwrap().iter().find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "t").unwrap();
    let mhex = m["digest"].as_str().unwrap().strip_prefix("sha256:").unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(mhex)).unwrap()).unwrap();
    let cdigest = manifest["config"]["digest"].as_str().unwrap().to_string();
    let chex = cdigest.strip_prefix("sha256:").unwrap();
    let blob = std::fs::read(layout.join("blobs/sha256").join(chex)).unwrap();
    assert_eq!(std::fs::read(env.root.join(format!("configs/sha256-{chex}.json"))).unwrap(), blob);
    assert_eq!(store_file(&env, "confignames/bb:1").as_deref(), Some(format!("{cdigest}\n").as_str()));
    let name = store_file(&env, "names/bb:1").unwrap();
    assert!(name.starts_with("sha256:") && name.len() == 72 && name.ends_with('\n'), "{name:?}");
    let r = env.sl(&["verify", "bb:1"]);
    r.ok();
    assert!(r.stdout.contains(&format!("OK    image bb:1 (root) (image config {cdigest})")), "{}", r.stdout);

    // A sharedloop without configs re-points the name (to an added image):
    // the pointer is ignored by bundle and reported by verify.
    let tree = env.dir.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    sh(&rootfs_script(s(&tree)), &env.dir);
    let plain = env.sl(&["add", s(&tree)]).stdout.trim().to_string();
    std::fs::write(env.root.join("names/bb:1"), format!("{plain}\n")).unwrap();
    let dir = env.dir.join("b");
    let r = bundle(&env, &["bb:1", s(&dir)]);
    r.ok();
    assert!(r.stderr.contains(&format!("its image config {cdigest} is for chain")) && r.stderr.contains("ignored"), "{}", r.stderr);
    assert_eq!(config_json(&dir)["process"]["args"], serde_json::json!(["sh"]));
    unbundle(&env, &dir);
    let r = env.sl(&["verify", "bb:1"]);
    assert_eq!(r.code, 32, "{}", r.stdout);
    assert!(r.stdout.contains("FAIL  image bb:1 (root): image config") && r.stdout.contains("bundle ignores it"), "{}", r.stdout);
    // A new `add --name` drops the stale pointer.
    env.sl(&["add", s(&tree), "--name", "bb:1"]).ok();
    assert_eq!(store_file(&env, "confignames/bb:1"), None);
    env.sl(&["verify", "bb:1"]).ok();

    // rm takes the pointer with the name; gc the config nobody points to.
    import(&env, &format!("oci:{}:t", layout.display()), "bb:2");
    assert!(store_file(&env, "confignames/bb:2").is_some());
    let r = env.sl(&["gc", "--min-age", "0", "--dry-run"]);
    r.ok();
    assert!(!r.stdout.contains("configs/"), "a config a name points to stays: {}", r.stdout);
    env.sl(&["rm", "--name-only", "bb:2"]).ok();
    assert_eq!(store_file(&env, "confignames/bb:2"), None);
    let r = env.sl(&["gc", "--min-age", "0"]);
    r.ok();
    assert!(r.stdout.contains(&format!("configs/sha256-{chex}.json")) && r.stdout.contains("image config no name points to"), "{}", r.stdout);
    assert!(!env.root.join(format!("configs/sha256-{chex}.json")).exists());

    // A name removed by a sharedloop without configs leaves its pointer:
    // gc removes it, then its config.
    import(&env, &format!("oci:{}:t", layout.display()), "bb:3");
    std::fs::remove_file(env.root.join("names/bb:3")).unwrap();
    let r = env.sl(&["gc", "--min-age", "0"]);
    r.ok();
    assert!(r.stdout.contains("confignames/bb:3") && r.stdout.contains("a name that is gone"), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("configs/sha256-{chex}.json")), "{}", r.stdout);
    assert_eq!(std::fs::read_dir(env.root.join("configs")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(env.root.join("confignames")).unwrap().count(), 0);

    // A damaged config: bundle refuses, naming it; verify fails.
    import(&env, &format!("oci:{}:t", layout.display()), "bb:4");
    std::fs::write(env.root.join(format!("configs/sha256-{chex}.json")), b"{}").unwrap();
    let r = bundle(&env, &["bb:4", s(&dir)]);
    r.fails(32, "its image config cannot be read");
    assert!(r.stderr.contains("digest mismatch"), "{}", r.stderr);
    assert!(!dir.exists());
    assert_eq!(env.sl(&["verify", "bb:4"]).code, 32);
    env.assert_clean();
}

#[test]
fn errors_are_clear_and_leave_nothing() {
    let env = Env::new("bundle-err");
    let layout = build_image(&env);
    import(&env, &format!("oci:{}:t", layout.display()), "bb:1");
    import(&env, &format!("oci:{}:nouser", layout.display()), "bb:nouser");
    let dir = env.dir.join("b");

    bundle(&env, &["nosuch:1", s(&dir)]).fails(32, "image nosuch:1: no such name");
    assert!(!dir.exists());
    bundle(&env, &["bad name!", s(&dir)]).fails(1, "");
    assert!(!dir.exists());

    // DIR not empty, a file, under a missing parent.
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("mine"), "x").unwrap();
    bundle(&env, &["bb:1", s(&dir)]).fails(32, &format!("{}: bundle directory is not empty", dir.display()));
    assert_eq!(std::fs::read_to_string(dir.join("mine")).unwrap(), "x");
    // Not a bundle: unbundle refuses and touches nothing.
    env.sl(&["unbundle", s(&dir)]).fails(32, &format!("{}: not a sharedloop bundle (no .sharedloop-bundle", dir.display()));
    assert_eq!(std::fs::read_to_string(dir.join("mine")).unwrap(), "x");
    std::fs::remove_dir_all(&dir).unwrap();
    let file = env.dir.join("file");
    std::fs::write(&file, "x").unwrap();
    bundle(&env, &["bb:1", s(&file)]).fails(32, "bundle directory is a regular file, not a directory");
    let deep = env.dir.join("missing/b");
    bundle(&env, &["bb:1", s(&deep)]).fails(32, &format!("create bundle directory: {}: No such file or directory", deep.display()));
    assert!(!env.dir.join("missing").exists());

    // The mount fails (a bad option; an upper that cannot be made): DIR
    // and rootfs go again.
    bundle(&env, &["bb:1", s(&dir), "-o", "nosuchoption=1"]).fails(1, "nosuchoption");
    assert!(!dir.exists());
    bundle(&env, &["bb:1", s(&dir), "-o", &format!("upper={}/nodir/u.img", env.dir.display())]).fails(32, "nodir");
    assert!(!dir.exists());
    // After the mount: a user the image does not have. Unmounted again.
    bundle(&env, &["bb:nouser", s(&dir)]).fails(32, "image user \"nobody\": nobody: no such user in the image's /etc/passwd");
    assert!(!dir.exists());
    // The image's own accounts, through symlinks that stay inside it; one
    // that leads out is refused, never read.
    import(&env, &format!("oci:{}:inside", layout.display()), "bb:inside");
    bundle(&env, &["bb:inside", s(&dir)]).ok();
    assert_eq!(config_json(&dir)["process"]["user"], serde_json::json!({"uid": 1234, "gid": 2345, "additionalGids": [3456]}));
    unbundle(&env, &dir);
    import(&env, &format!("oci:{}:escape", layout.display()), "bb:escape");
    bundle(&env, &["bb:escape", s(&dir)]).fails(32, &format!("refusing a symlink that leads out of the image: {}/rootfs/etc/passwd", dir.display()));
    assert!(!dir.exists());
    // A config record planted as a symlink or a FIFO: refused, naming it.
    let rec = env.root.join("confignames/bb:1");
    std::fs::remove_file(&rec).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &rec).unwrap();
    bundle(&env, &["bb:1", s(&dir)]).fails(32, &format!("refusing symlink or path outside the store: {}", rec.display()));
    std::fs::remove_file(&rec).unwrap();
    env.run(&["mkfifo", s(&rec)]).ok();
    bundle(&env, &["bb:1", s(&dir)]).fails(32, &format!("{}: a FIFO, not a regular file", rec.display()));
    std::fs::remove_file(&rec).unwrap();
    assert!(!dir.exists());
    env.assert_clean();

    // Unbundle after the rootfs was unmounted by hand: the rest goes.
    bundle(&env, &["bb:1", s(&dir)]).ok();
    env.run(&["umount", s(&dir.join("rootfs"))]).ok();
    unbundle(&env, &dir);
    // A file of someone else's in the rootfs directory: kept, and said.
    bundle(&env, &["bb:1", s(&dir)]).ok();
    env.run(&["umount", s(&dir.join("rootfs"))]).ok();
    std::fs::write(dir.join("rootfs/other"), "x").unwrap();
    env.sl(&["unbundle", s(&dir)]).fails(32, "not written by bundle, left as it is");
    assert!(dir.join("config.json").exists() && dir.join(".sharedloop-bundle").exists(), "nothing removed before the refusal");
    std::fs::remove_file(dir.join("rootfs/other")).unwrap();
    unbundle(&env, &dir);
    env.assert_clean();
}
