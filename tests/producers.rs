//! Images made by real producers — buildah (from scratch, layer by layer
//! through `buildah mount`) and podman (`podman build` of a Containerfile)
//! — exported with the tools' own push and imported by `sharedloop import`
//! through every transport (oci:, oci-archive:, docker-archive:,
//! docker://) with the default layer format. Every import is mounted and
//! compared path by path (type, mode, owner, size, content, xattrs, hard
//! links, mtimes to the nanosecond) with the tool's own view of the image: a
//! `buildah mount` of a container made from it in the tool's storage.
//!
//! The tools run with private storage only: `--root`/`--runroot` in the
//! test's directory, the vfs driver, and registries.conf, containers.conf
//! and storage.conf of the test's own (CONTAINERS_*), so nothing touches
//! /var/lib/containers or the network (every image is FROM scratch).

mod common;
use common::tree::assert_same_tree;
use common::*;
use common::registry::*;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The layer formats of the layers in the store (their meta.json).
fn layer_fstypes(store: &Path) -> Vec<String> {
    let mut v = vec![];
    for e in std::fs::read_dir(store.join("layers")).unwrap() {
        let d = e.unwrap().path();
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("meta.json")).unwrap()).unwrap();
        v.push(m["fstype"].as_str().unwrap_or("?").to_string());
    }
    v.sort();
    v
}

/// Private containers configuration and storage for buildah and podman in
/// `dir`: the shell prefix that sets it up for one command line.
struct Tools {
    dir: PathBuf,
}

impl Tools {
    fn new(env: &Env) -> Tools {
        need("buildah");
        need("podman");
        let dir = env.dir.join("containers");
        std::fs::create_dir_all(dir.join("home")).unwrap();
        std::fs::write(dir.join("registries.conf"), "unqualified-search-registries = []\n").unwrap();
        std::fs::write(dir.join("containers.conf"), "[engine]\nevents_logger = \"none\"\ncgroup_manager = \"cgroupfs\"\n").unwrap();
        std::fs::write(
            dir.join("storage.conf"),
            format!("[storage]\ndriver = \"vfs\"\nrunroot = \"{d}/run\"\ngraphroot = \"{d}/root\"\n", d = dir.display()),
        )
        .unwrap();
        std::fs::write(dir.join("policy.json"), r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).unwrap();
        Tools { dir }
    }

    /// `sh -c` with the private configuration; `$B` is buildah, `$P`
    /// podman, both on the test's storage.
    fn sh(&self, script: &str) -> String {
        let d = self.dir.display();
        sh(
            &format!(
                "set -eu; export HOME={d}/home CONTAINERS_REGISTRIES_CONF={d}/registries.conf \
                 CONTAINERS_CONF={d}/containers.conf CONTAINERS_STORAGE_CONF={d}/storage.conf \
                 BUILDAH_ISOLATION=chroot; \
                 S='--root {d}/root --runroot {d}/run --storage-driver vfs'; \
                 B=\"buildah $S\"; Q=\"--signature-policy {d}/policy.json\"; P=\"podman $S\"; {script}"
            ),
            &self.dir,
        )
    }

    /// The tool's own view of IMAGE: a fresh container from it, mounted.
    fn view(&self, image: &str) -> PathBuf {
        let c = self.sh(&format!("c=$($B from --pull=never {image}); $B mount $c"));
        PathBuf::from(c.trim())
    }
}

impl Drop for Tools {
    fn drop(&mut self) {
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "export CONTAINERS_STORAGE_CONF={d}/storage.conf CONTAINERS_CONF={d}/containers.conf; \
                 buildah --root {d}/root --runroot {d}/run --storage-driver vfs rm -a >/dev/null 2>&1; \
                 rm -rf {d}",
                d = self.dir.display()
            ))
            .status();
    }
}

const T: &str = "2001-02-03 04:05:06.123456789";

/// Three layers through `buildah mount`: what real images hold.
fn buildah_image(t: &Tools) -> String {
    let long = "l".repeat(255);
    t.sh(&format!(
        r#"
c=$($B from scratch); m=$($B mount $c); cd $m
mkdir -p etc bin odd opaque/sub keep usr/share
printf 'hello\n' > etc/hello; touch -d '{T}' etc/hello
printf 'old\n' > etc/changed
printf 'gone\n' > etc/gone
printf 'ln\n' > bin/tool; chmod 4755 bin/tool; ln bin/tool bin/tool-link
printf 'sg\n' > bin/sg; chmod 2711 bin/sg
mkdir tmp; chmod 1777 tmp
mkdir odd/mode; chmod 0513 odd/mode
ln -s ../etc/hello odd/sym; touch -h -d '2002-03-04 05:06:07.987654321' odd/sym
ln -s /nowhere odd/dangling
touch odd/{long}
printf 'x' > "$(printf 'odd/tab\there')"
printf 'y' > "$(printf 'odd/bytes\351\377')"
printf 'z' > 'odd/sp ace*?'
printf 'own\n' > odd/owned; chown 100000:200000 odd/owned
printf 'cap\n' > bin/cap; setfattr -n security.capability -v 0x0100000200200000000000000000000000000000 bin/cap
printf 'u\n' > etc/user; setfattr -n user.note -v 'a note' etc/user
mkfifo odd/fifo
dd if=/dev/urandom of=usr/share/big bs=1M count=1 seek=7 2>/dev/null
printf 'in opaque\n' > opaque/sub/a; printf 'b\n' > opaque/b
printf 'k\n' > keep/file
touch -d '{T}' odd/mode etc bin tmp odd opaque keep usr/share
cd /; $B commit -q --rm $c l1 >/dev/null
c=$($B from --pull=never l1); m=$($B mount $c); cd $m
printf 'new contents\n' > etc/changed; touch -d '2003-01-01 00:00:00.000000001' etc/changed
rm etc/gone
rm -rf opaque; mkdir -p opaque/new; printf 'fresh\n' > opaque/new/f
ln etc/hello etc/hello-link2
printf 'layer2\n' > keep/two; touch -d '{T}' keep/two keep
cd /; $B commit -q --rm $c l2 >/dev/null
c=$($B from --pull=never l2); m=$($B mount $c); cd $m
rm keep/file; chmod 0700 odd/mode; ln bin/sg bin/sg-link
cd /; $B commit -q --rm $c l3 >/dev/null
"#
    ));
    "localhost/l3:latest".into()
}

/// What the buildah view holds, so the comparison is over real content:
/// buildah (vfs) keeps nanosecond mtimes, owners > 65535, security.* and
/// user.* xattrs, FIFOs, setuid/setgid/sticky bits, hard links across
/// layers, whiteouts and opaque directories.
fn check_content(v: &Path) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = |p: &str| std::fs::symlink_metadata(v.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    // buildah's layer tars are Go archive/tar headers without PAX records:
    // Go then rounds every mtime to whole seconds (what buildah keeps of
    // the nanoseconds written into the mount is nothing). Sub-second
    // mtimes from a real producer are covered by umoci in tests/import.rs.
    assert_eq!((m("etc/hello").mtime(), m("etc/hello").mtime_nsec()), (981173106, 0));
    assert_eq!((m("odd/sym").mtime(), m("odd/sym").mtime_nsec()), (1015218367, 0));
    assert_eq!((m("etc/changed").mtime(), m("etc/changed").mtime_nsec()), (1041379200, 0));
    assert_eq!(std::fs::read(v.join("etc/changed")).unwrap(), b"new contents\n");
    assert_eq!((m("odd/owned").uid(), m("odd/owned").gid()), (100000, 200000));
    assert_eq!(m("bin/tool").mode() & 0o7777, 0o4755);
    assert_eq!(m("bin/sg").mode() & 0o7777, 0o2711);
    assert_eq!(m("tmp").mode() & 0o7777, 0o1777);
    assert_eq!(m("odd/mode").mode() & 0o7777, 0o700);
    assert!(m("odd/fifo").file_type().is_fifo());
    assert_eq!(m(&format!("odd/{}", "l".repeat(255))).len(), 0);
    // A hard link made in a later layer to a file of an earlier one is
    // written by buildah's diff as a plain copy (the earlier file is not in
    // the new layer, so the tar has nothing to link to): in its own view and
    // in every import the two are separate files with the same content.
    // Links within one layer stay links.
    assert_eq!(m("bin/tool").ino(), m("bin/tool-link").ino());
    assert_eq!(m("bin/tool").nlink(), 2);
    assert_ne!(m("etc/hello").ino(), m("etc/hello-link2").ino());
    assert_eq!(std::fs::read(v.join("etc/hello-link2")).unwrap(), b"hello\n");
    assert_ne!(m("bin/sg").ino(), m("bin/sg-link").ino());
    assert_eq!(m("bin/sg-link").mode() & 0o7777, 0o2711);
    assert_eq!(m("usr/share/big").len(), 8 << 20);
    let x = common::tree::xattrs_of(&v.join("bin/cap"));
    assert!(x.iter().any(|(k, _)| k == "security.capability"), "{x:?}");
    let x = common::tree::xattrs_of(&v.join("etc/user"));
    assert!(x.iter().any(|(k, val)| k == "user.note" && val == b"a note"), "{x:?}");
    for gone in ["etc/gone", "keep/file", "opaque/sub", "opaque/b"] {
        assert!(std::fs::symlink_metadata(v.join(gone)).is_err(), "{gone} is still there");
    }
    assert!(v.join("opaque/new/f").exists() && v.join("keep/two").exists());
}

fn import_compare(env: &Env, source: &str, name: &str, want: &Path, fstype: &str) {
    let tls = if source.starts_with("docker://") { vec!["--tls-verify=false"] } else { vec![] };
    import_ok(env, source, &[&["--name", name][..], &tls].concat());
    let m = mount_image(env, name, "m");
    assert_same_tree(&host_view(env, &m), want);
    umount_image(env, &m);
    let f = layer_fstypes(&env.root);
    assert!(!f.is_empty() && f.iter().all(|x| x == fstype), "layers of {source}: {f:?}, want {fstype}");
}

#[test]
fn buildah_image_through_every_transport() {
    let env = Env::new("prod-buildah");
    let t = Tools::new(&env);
    let img = buildah_image(&t);
    let want = t.view(&img);
    // buildah's layers carry no entry for the root directory: its mode is
    // each tool's own choice. The vfs driver makes a scratch root 0555,
    // sharedloop 0755 (as containerd and an empty layer do); everything
    // else must be the same, so the view's root is set to that.
    assert_eq!(std::fs::metadata(&want).unwrap().permissions().mode() & 0o7777, 0o555);
    std::fs::set_permissions(&want, std::fs::Permissions::from_mode(0o755)).unwrap();
    check_content(&want);
    let fstype = default_layer_fstype(&env);
    let d = t.dir.display();
    t.sh(&format!(
        "$B push $Q -q {img} oci:{d}/layout:t; $B push $Q -q {img} oci-archive:{d}/img.oci.tar; \
         $B push $Q -q {img} docker-archive:{d}/img.docker.tar:img:1"
    ));
    import_compare(&env, &format!("oci:{d}/layout:t"), "oci", &want, &fstype);
    import_compare(&env, &format!("oci-archive:{d}/img.oci.tar"), "ociarch", &want, &fstype);
    import_compare(&env, &format!("docker-archive:{d}/img.docker.tar"), "dockarch", &want, &fstype);
    env.assert_clean();

    // docker://: pushed by buildah to the registry on 127.0.0.1.
    let mut reg_env = Env::new("prod-buildah-reg");
    isolate(&mut reg_env, "");
    let reg = Registry::start(&reg_env, "open", false);
    t.sh(&format!("$B push $Q -q --tls-verify=false {img} docker://{}/prod/img:1", reg.host()));
    import_compare(&reg_env, &format!("docker://{}/prod/img:1", reg.host()), "reg", &want, &fstype);
    drop(reg);
    reg_env.assert_clean();

    // The same image with ext4 pinned.
    let mut e4 = Env::new("prod-buildah-ext4");
    e4.pin_layer_fstype("ext4");
    import_compare(&e4, &format!("oci:{d}/layout:t"), "oci", &want, "ext4");
    e4.assert_clean();
}

/// `podman build` of a Containerfile FROM scratch (no RUN, so nothing is
/// run and nothing fetched): two COPY layers of a generated tree, a LABEL
/// and an ENV; pushed by podman to oci:, oci-archive:, docker-archive:
/// and the test registry (docker://),
/// compared with `podman image mount`.
#[test]
fn podman_build_through_every_transport() {
    let env = Env::new("prod-podman");
    let t = Tools::new(&env);
    let long = "n".repeat(255);
    t.sh(&format!(
        r#"
mkdir -p ctx/tree/a/b; cd ctx
printf 'hi\n' > tree/a/f; ln tree/a/f tree/a/h; ln -s f tree/a/l; chmod 0640 tree/a/f
printf 'x' > "tree/a/{long}"; printf 'y' > "$(printf 'tree/a/odd\351')"
chown 70000:80000 tree/a/b; chmod 0753 tree/a/b; mkfifo tree/fifo
setfattr -n user.k -v v tree/a/f
touch -d '{T}' tree/a/f tree/a/b tree/a
printf 'FROM scratch\nLABEL org.example.k=v\nENV A=1\nCOPY tree/ /\nCOPY tree/a /second\n' > Containerfile
$P build -q -t localhost/pimg:1 -f Containerfile . >/dev/null
$P image inspect localhost/pimg:1 --format '{{{{index .Config.Labels "org.example.k"}}}} {{{{len .RootFS.Layers}}}}' > ../inspect
"#
    ));
    assert_eq!(std::fs::read_to_string(t.dir.join("inspect")).unwrap().trim(), "v 2");
    let want = PathBuf::from(t.sh("$P image mount localhost/pimg:1").trim());
    assert!(want.join("second/h").exists() && want.join("fifo").exists());
    // No root entry in podman's layers either (see the buildah test).
    assert_eq!(std::fs::metadata(&want).unwrap().permissions().mode() & 0o7777, 0o555);
    std::fs::set_permissions(&want, std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = t.dir.display();
    t.sh(&format!(
        "$P push -q localhost/pimg:1 oci-archive:{d}/p.oci.tar; $P push -q localhost/pimg:1 docker-archive:{d}/p.docker.tar"
    ));
    let fstype = default_layer_fstype(&env);
    import_compare(&env, &format!("oci-archive:{d}/p.oci.tar"), "ociarch", &want, &fstype);
    import_compare(&env, &format!("docker-archive:{d}/p.docker.tar"), "dockarch", &want, &fstype);
    t.sh(&format!("$P push -q localhost/pimg:1 oci:{d}/playout:t"));
    import_compare(&env, &format!("oci:{d}/playout:t"), "oci", &want, &fstype);
    env.assert_clean();

    let mut reg_env = Env::new("prod-podman-reg");
    isolate(&mut reg_env, "");
    let reg = Registry::start(&reg_env, "open", false);
    t.sh(&format!("$P push -q --tls-verify=false localhost/pimg:1 docker://{}/prod/pimg:1", reg.host()));
    import_compare(&reg_env, &format!("docker://{}/prod/pimg:1", reg.host()), "reg", &want, &fstype);
    drop(reg);
    reg_env.assert_clean();
    t.sh("$P image unmount localhost/pimg:1 >/dev/null");
}
