//! `sharedloop import`: real images built with real tools (umoci builds
//! OCI layouts without a daemon, skopeo converts them to oci-archive,
//! docker-archive and zstd layers), plus layers written byte by byte here
//! for the cases no tool produces on purpose (hardlinks into lower layers,
//! unlisted parents, whiteout orderings, path traversal, corrupt blobs).
//!
//! Every import is mounted with `mount -t sharedloop` in the test's own
//! namespace and the merged tree is compared path by path: type, mode,
//! owner, size, content hash, symlink target, device numbers, xattrs,
//! mtimes of files, and hardlink groups; for umoci images against umoci's
//! own unpacked rootfs.

mod common;
use common::tree::{assert_same_tree, sha256_hex, xattrs_of};
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

// ================================================================ running

fn import(env: &Env, source: &str, extra: &[&str]) -> Run {
    env.run(&import_args(env, source, extra).iter().map(String::as_str).collect::<Vec<_>>())
}

fn layer_dirs(store: &Path) -> BTreeSet<String> {
    std::fs::read_dir(store.join("layers"))
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

fn tmp_entries(store: &Path) -> Vec<String> {
    std::fs::read_dir(store.join("tmp"))
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

fn names(store: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(store.join("names"))
        .map(|r| {
            r.flatten()
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        std::fs::read_to_string(e.path()).unwrap().trim().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn skopeo(dir: &Path, from: &str, to: &str, extra: &str) {
    need("skopeo");
    sh(&format!("skopeo --insecure-policy copy -q {extra} {from} {to}"), dir);
}

/// The chain ID of the top layer, computed here from the config's diff IDs
/// (independently of the code under test).
fn chain_of(diff_ids: &[String]) -> String {
    let mut chain = diff_ids[0].clone();
    for d in &diff_ids[1..] {
        chain = format!("sha256:{}", sha256_hex(format!("{chain} {d}").as_bytes()));
    }
    chain
}

fn json_file(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap())
}

/// (manifest, config) of the only image of an OCI layout.
fn oci_docs(layout: &Path) -> (serde_json::Value, serde_json::Value) {
    let idx = json_file(&layout.join("index.json"));
    let m = json_file(&blob(layout, idx["manifests"][0]["digest"].as_str().unwrap()));
    let c = json_file(&blob(layout, m["config"]["digest"].as_str().unwrap()));
    (m, c)
}

fn oci_chain(layout: &Path) -> String {
    let (_, c) = oci_docs(layout);
    let ids: Vec<String> =
        c["rootfs"]["diff_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    chain_of(&ids)
}

// ================================================================ trees

// ================================================================ umoci

/// A three-layer image built with umoci from a rootfs populated here:
/// every file type, setuid/setgid/sticky, owners, user.* and
/// security.capability xattrs, hardlinks, long and non-UTF-8 names, then
/// deletions (whiteouts), type changes, a re-created directory. umoci's
/// own unpack of the result is the expected tree.
const UMOCI_SCRIPT: &str = r#"set -eu
umoci init --layout L
umoci new --image L:t
umoci unpack --image L:t B >/dev/null
r=B/rootfs
mkdir -p $r/etc $r/bin $r/usr/bin $r/tmp $r/del/sub $r/deldir $r/opq $r/tc/d2f $r/lower $r/sg
chmod 1777 $r/tmp; chmod 2775 $r/sg; chown 5:6 $r/sg
printf 'root:x:0:0\n' > $r/etc/passwd
setfattr -n user.foo -v bar $r/etc/passwd
printf 'suid' > $r/bin/suid; chown 1000:1001 $r/bin/suid; chmod 4755 $r/bin/suid
printf 'sgid' > $r/bin/sgid; chmod 2711 $r/bin/sgid
printf 'ping' > $r/bin/ping; chmod 0755 $r/bin/ping
setfattr -n security.capability -v 0sAQAAAgAgAAAAAAAAAAAAAAAAAAA= $r/bin/ping
printf 'a' > $r/bin/a; ln $r/bin/a $r/bin/b; ln $r/bin/a $r/usr/bin/c
ln -s ../../etc/passwd $r/usr/bin/rel; ln -s /etc/passwd $r/usr/bin/abs; ln -s nowhere $r/usr/bin/dangling
mkfifo $r/fifo; mknod $r/null c 1 3; mknod $r/loopx b 7 200
long=$(printf 'n%.0s' $(seq 1 250)); mkdir -p $r/long/$long; printf long > $r/long/$long/$long
printf 'x' > "$r/$(printf 'caf\351')"
head -c 300000 /dev/urandom > $r/random.bin
yes 'compressible text for lz4 layers' | head -c 300000 > $r/text.txt
truncate -s 10M $r/sparse.bin; printf 'end' >> $r/sparse.bin
printf 1 > $r/del/file; printf 2 > $r/del/sub/keep; printf 3 > $r/deldir/x
printf o1 > $r/opq/old1; printf o2 > $r/opq/old2
printf f > $r/tc/f2d; printf c > $r/tc/d2f/child; printf l > $r/tc/f2l
printf 'lower target' > $r/lower/target; chown 7:8 $r/lower/target; chmod 640 $r/lower/target
umoci repack --refresh-bundle --image L:t B
rm $r/del/file; rm -r $r/deldir
rm $r/opq/old1 $r/opq/old2; printf new > $r/opq/new
rm $r/tc/f2d; mkdir $r/tc/f2d; printf in > $r/tc/f2d/inner
rm -r $r/tc/d2f; printf nowfile > $r/tc/d2f
rm $r/tc/f2l; ln -s ../etc/passwd $r/tc/f2l
chmod 600 $r/etc/passwd; printf 'root:x:0:0\nuser:x:1:1\n' > $r/etc/passwd
mkdir $r/newdir; ln $r/lower/target $r/newdir/link
setfattr -n user.added -v 1 $r/bin/a
umoci repack --refresh-bundle --image L:t B
mkdir $r/deldir; printf back > $r/deldir/y
chown 9:9 $r/tc/f2d
umoci repack --image L:t B
umoci unpack --image L:t EXP >/dev/null
rm -rf B
"#;

struct UmociImage {
    dir: PathBuf,
    chain: String,
}

impl UmociImage {
    fn build(env: &Env) -> UmociImage {
        need("umoci");
        let dir = env.dir.join("fixture");
        std::fs::create_dir_all(&dir).unwrap();
        sh(UMOCI_SCRIPT, &dir);
        let chain = oci_chain(&dir.join("L"));
        UmociImage { dir, chain }
    }
    fn layout(&self) -> String {
        self.dir.join("L").display().to_string()
    }
    fn expected(&self) -> PathBuf {
        self.dir.join("EXP/rootfs")
    }
}

/// Import SOURCE, mount it by NAME, compare with umoci's rootfs, unmount.
fn import_and_compare(env: &Env, img: &UmociImage, source: &str, extra: &[&str], name: &str) {
    let id = import_ok(env, source, extra);
    assert_eq!(id, img.chain, "chain ID through {source}");
    assert_eq!(
        names(&env.root).get(&name.replace('/', "%2F")),
        Some(&img.chain),
        "name {name}: {:?}",
        names(&env.root)
    );
    let m = mount_image(env, name, "m");
    assert_same_tree(&host_view(env, &m), &img.expected());
    umount_image(env, &m);
}

#[test]
fn umoci_oci_layout_matches_umoci_unpack() {
    let env = Env::new("imp-oci");
    let img = UmociImage::build(&env);
    let r = import(&env, &format!("oci:{}:t", img.layout()), &[]);
    r.ok();
    // Not a terminal: one plain line per layer on stderr.
    for i in 1..=3 {
        assert!(r.stderr.contains(&format!("layer {i}/3 sha256:")), "{}", r.stderr);
    }
    assert!(r.stderr.contains(&format!(" KiB (gzip, {} image, ", default_layer_fstype(&env))), "{}", r.stderr);
    assert_eq!(r.stdout.trim(), img.chain);
    let m = mount_image(&env, "t", "m");
    assert_same_tree(&host_view(&env, &m), &img.expected());
    umount_image(&env, &m);
    assert_eq!(layer_dirs(&env.root).len(), 3);

    // Again: every layer is found, none converted, nothing left behind.
    let r = import(&env, &format!("oci:{}:t", img.layout()), &["--name", "again"]);
    r.ok();
    assert_eq!(r.stderr.matches("already in the root store").count(), 3, "{}", r.stderr);
    assert_eq!(names(&env.root).get("again"), Some(&img.chain));
    assert!(tmp_entries(&env.root).is_empty());
    env.assert_clean();
}

#[test]
fn umoci_oci_archive_matches_umoci_unpack_erofs() {
    let env = Env::new("imp-ociarch");
    let img = UmociImage::build(&env);
    skopeo(&img.dir, "oci:L:t", "oci-archive:oa.tar:v1", "");
    let src = format!("oci-archive:{}:v1", img.dir.join("oa.tar").display());
    import_and_compare(&env, &img, &src, &["--fstype", "erofs", "--quiet"], "v1");
    let meta = json_file(&env.root.join("layers").join(img.chain.strip_prefix("sha256:").unwrap()).join("meta.json"));
    assert_eq!(meta["fstype"], "erofs");
    env.assert_clean();
}

#[test]
fn umoci_docker_archive_matches_umoci_unpack_xfs() {
    let env = Env::new("imp-docker");
    let img = UmociImage::build(&env);
    skopeo(&img.dir, "oci:L:t", "docker-archive:da.tar:example/img:1", "");
    // No REF: the archive's only image, named by its RepoTags.
    let src = format!("docker-archive:{}", img.dir.join("da.tar").display());
    import_and_compare(&env, &img, &src, &["--fstype", "xfs", "-q"], "docker.io/example/img:1");
    env.assert_clean();
}

#[test]
fn umoci_zstd_layers_match_umoci_unpack() {
    let env = Env::new("imp-zstd");
    let img = UmociImage::build(&env);
    skopeo(&img.dir, "oci:L:t", "oci:Z:z", "--dest-compress --dest-compress-format zstd");
    let (m, _) = oci_docs(&img.dir.join("Z"));
    for l in m["layers"].as_array().unwrap() {
        assert!(l["mediaType"].as_str().unwrap().ends_with("+zstd"), "{l}");
    }
    let src = format!("oci:{}:z", img.dir.join("Z").display());
    import_and_compare(&env, &img, &src, &["--name", "zimg"], "zimg");
    env.assert_clean();
}

// ================================================================ tar by hand

/// A tar stream written header by header: raw names (non-UTF-8, `..`,
/// absolute), PAX records, any entry type.
#[derive(Default)]
struct Tar {
    out: Vec<u8>,
}

const MTIME: u64 = 1_600_000_000;

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{:0w$o}", v, w = field.len() - 1);
    assert!(s.len() < field.len(), "{v} does not fit");
    field[..s.len()].copy_from_slice(s.as_bytes());
    field[s.len()] = 0;
}

use sharedloop::image::pax_record;

#[derive(Clone)]
struct Ent<'a> {
    name: &'a [u8],
    kind: u8,
    mode: u32,
    uid: u32,
    gid: u32,
    data: &'a [u8],
    link: &'a [u8],
    dev: (u32, u32),
    pax: Vec<(&'a [u8], &'a [u8])>,
}

fn ent(name: &[u8], kind: u8, mode: u32) -> Ent<'_> {
    Ent { name, kind, mode, uid: 0, gid: 0, data: b"", link: b"", dev: (0, 0), pax: vec![] }
}

impl Tar {
    /// A ustar header for `e` (name and link cut at 100 bytes: longer ones
    /// go in a PAX header before it) whose data has `size` bytes.
    fn header(e: &Ent, size: u64) -> [u8; 512] {
        let (name, kind, mode, uid, gid, link, dev) = (e.name, e.kind, e.mode, e.uid, e.gid, e.link, e.dev);
        let mut h = [0u8; 512];
        let n = name.len().min(100);
        h[..n].copy_from_slice(&name[..n]);
        octal(&mut h[100..108], u64::from(mode));
        octal(&mut h[108..116], u64::from(uid));
        octal(&mut h[116..124], u64::from(gid));
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], MTIME);
        h[156] = kind;
        let l = link.len().min(100);
        h[157..157 + l].copy_from_slice(&link[..l]);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        octal(&mut h[329..337], u64::from(dev.0));
        octal(&mut h[337..345], u64::from(dev.1));
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        h
    }

    fn data(&mut self, d: &[u8]) {
        self.out.extend_from_slice(d);
        let pad = (512 - d.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
    }

    fn add(&mut self, e: Ent) -> &mut Self {
        let mut pax = Vec::new();
        if e.name.len() > 100 {
            pax_record(&mut pax, b"path", e.name);
        }
        if e.link.len() > 100 {
            pax_record(&mut pax, b"linkpath", e.link);
        }
        for (k, v) in &e.pax {
            pax_record(&mut pax, k, v);
        }
        if !pax.is_empty() {
            let h = Self::header(&ent(b"PaxHeaders/x", b'x', 0o644), pax.len() as u64);
            self.out.extend_from_slice(&h);
            self.data(&pax);
        }
        let h = Self::header(&e, e.data.len() as u64);
        self.out.extend_from_slice(&h);
        self.data(e.data);
        self
    }

    fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.add(ent(name.as_bytes(), b'5', mode))
    }
    fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.add(Ent { data, ..ent(name.as_bytes(), b'0', 0o644) })
    }
    fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.add(Ent { link: target.as_bytes(), ..ent(name.as_bytes(), b'1', 0o644) })
    }
    fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.add(Ent { link: target.as_bytes(), ..ent(name.as_bytes(), b'2', 0o777) })
    }
    fn whiteout(&mut self, name: &str) -> &mut Self {
        self.add(ent(name.as_bytes(), b'0', 0))
    }
    fn done(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.out);
        out.extend(std::iter::repeat_n(0u8, 1024));
        out
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// An OCI layout of these layer blobs (tars, some compressed). `diff_ids`
/// default to the sha256 of each decompressed tar.
fn write_oci(dir: &Path, tars: &[Vec<u8>], compress: &[bool], tag: Option<&str>, diff_ids: Option<Vec<String>>) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> (String, usize) {
        let h = sha256_hex(data);
        std::fs::write(blobs.join(&h), data).unwrap();
        (format!("sha256:{h}"), data.len())
    };
    let mut layers = vec![];
    let mut diffs = vec![];
    for (t, &z) in tars.iter().zip(compress) {
        diffs.push(format!("sha256:{}", sha256_hex(t)));
        let (d, s) = if z { put(&gzip(t)) } else { put(t) };
        let mt =
            if z { "application/vnd.oci.image.layer.v1.tar+gzip" } else { "application/vnd.oci.image.layer.v1.tar" };
        layers.push(serde_json::json!({"mediaType": mt, "digest": d, "size": s}));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids.unwrap_or(diffs)},
    });
    let (cd, cs) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": layers,
    });
    let (md, ms) = put(&serde_json::to_vec(&manifest).unwrap());
    let mut desc =
        serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms});
    if let Some(t) = tag {
        desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": t});
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [desc]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

fn layout_chain(dir: &Path) -> String {
    oci_chain(dir)
}

// ================================================================ semantics

/// The three semantics layers as an OCI layout `<test dir>/sem` tagged
/// v1 (layers 1 and 3 gzip): (layout directory, `oci:DIR:v1`).
fn semantics_image(env: &Env) -> (PathBuf, String) {
    let dir = env.dir.join("sem");
    write_oci(&dir, &semantics_layers(), &[true, false, true], Some("v1"), None);
    let src = format!("oci:{}:v1", dir.display());
    (dir, src)
}

/// Three layers exercising what OCI layers do and tools rarely write on
/// purpose.
fn semantics_layers() -> Vec<Vec<u8>> {
    let mut l1 = Tar::default();
    l1.dir("./", 0o755)
        .dir("tmp/", 0o1777)
        .dir("usr/", 0o755)
        .dir("usr/share/", 0o755)
        .add(Ent { uid: 3, gid: 4, ..ent(b"usr/share/doc/", b'5', 0o750) })
        .add(Ent { uid: 2, ..ent(b"lower/", b'5', 0o711) })
        .add(Ent {
            uid: 7,
            gid: 8,
            data: b"lower target",
            pax: vec![(b"SCHILY.xattr.user.x", b"1")],
            ..ent(b"lower/target", b'0', 0o640)
        })
        .file("lower/other", b"other")
        .dir("d/", 0o755)
        .file("d/keep", b"keep")
        .file("d/gone", b"gone")
        .dir("opq/", 0o755)
        .file("opq/old", b"old")
        .dir("rec/", 0o755)
        .file("rec/old", b"old")
        .dir("t/", 0o755)
        .file("t/f2d", b"f")
        .dir("t/d2f/", 0o755)
        .file("t/d2f/child", b"c")
        .symlink("t/l2f", "x");
    let long = format!("long/{}", "L".repeat(150));
    let mut l2 = Tar::default();
    l2.dir("newdir/", 0o755)
        // A hardlink to a file only the layer below has, its parent unlisted.
        .hardlink("newdir/link", "lower/target")
        // Parents not listed: they keep the lower layer's 0750 3:4.
        .file("usr/share/doc/new.txt", b"new")
        .whiteout("d/.wh.gone")
        .dir("opq/", 0o755)
        .whiteout("opq/.wh..wh..opq")
        .file("opq/new", b"new")
        // Deleted, then re-created in the same layer: the old content is gone.
        .whiteout(".wh.rec")
        .dir("rec/", 0o700)
        .file("rec/new", b"new")
        .dir("t/f2d/", 0o755)
        .file("t/f2d/inner", b"in")
        .add(Ent { data: b"nowfile", ..ent(b"t/d2f", b'0', 0o600) })
        .file("t/l2f", b"nowfile")
        .file("/abs/file", b"abs")
        .file(&long, b"long name")
        .add(Ent { data: b"x", ..ent(b"caf\xe9", b'0', 0o644) })
        .add(Ent { data: b"frac", pax: vec![(b"mtime", b"1600000001.5")], ..ent(b"frac", b'0', 0o644) })
        .dir("sl/", 0o755)
        .file("sl/f", b"f")
        .whiteout("sl/.wh.f")
        .whiteout("sl/.wh.g")
        .file("sl/g", b"g")
        .add(Ent { dev: (1, 3), ..ent(b"dev/null", b'3', 0o666) })
        .add(Ent { dev: (7, 9), ..ent(b"dev/loop9", b'4', 0o660) })
        .add(ent(b"dev/fifo", b'6', 0o644))
        .add(Ent { data: b"su", uid: 0, ..ent(b"bin/su", b'0', 0o4755) })
        .add(Ent { uid: 5, gid: 6, ..ent(b"sgid/", b'5', 0o2775) })
        .dir("tmp2/", 0o1777)
        .add(Ent {
            data: b"ping",
            uid: 9,
            pax: vec![
                (
                    b"SCHILY.xattr.security.capability",
                    b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
                ),
                (b"SCHILY.xattr.security.selinux", b"ignored"),
            ],
            ..ent(b"bin/ping", b'0', 0o755)
        });
    let mut l3 = Tar::default();
    l3.hardlink("x/link2", "lower/other").dir("h/", 0o755).file("h/a", b"ha").hardlink("h/b", "h/a");
    vec![l1.done(), l2.done(), l3.done()]
}

fn meta(p: &Path) -> std::fs::Metadata {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every layer format keeps sub-second mtimes (ext4 since its images get
/// their nanoseconds after mke2fs -d, which keeps whole seconds).
#[track_caller]
fn check_semantics(v: &Path) {
    let read = |p: &str| std::fs::read(v.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let mode = |p: &str| meta(&v.join(p)).mode() & 0o7777;
    let owner = |p: &str| {
        let m = meta(&v.join(p));
        (m.uid(), m.gid())
    };
    let ino = |p: &str| meta(&v.join(p)).ino();
    let ls = |p: &str| {
        let mut k: Vec<String> = std::fs::read_dir(v.join(p))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        k.sort();
        k
    };
    assert_eq!(mode(""), 0o755);
    assert_eq!(mode("tmp"), 0o1777);
    // Cross-layer hardlinks: one inode, the lower file's content and metadata.
    assert_eq!(read("newdir/link"), b"lower target");
    assert_eq!(ino("newdir/link"), ino("lower/target"));
    assert_eq!((mode("newdir/link"), owner("newdir/link")), (0o640, (7, 8)));
    assert_eq!(xattrs_of(&v.join("newdir/link")), vec![("user.x".to_string(), b"1".to_vec())]);
    assert_eq!(ino("x/link2"), ino("lower/other"));
    assert_eq!(read("x/link2"), b"other");
    // The copied-up parent keeps its metadata.
    assert_eq!((mode("lower"), owner("lower")), (0o711, (2, 0)));
    assert_eq!(ls("lower"), ["other", "target"]);
    // In-layer hardlink.
    assert_eq!(ino("h/a"), ino("h/b"));
    // Unlisted parents keep the lower layer's metadata.
    assert_eq!((mode("usr/share/doc"), owner("usr/share/doc")), (0o750, (3, 4)));
    assert_eq!(read("usr/share/doc/new.txt"), b"new");
    // Whiteouts, opaque directories, re-creation.
    assert_eq!(ls("d"), ["keep"]);
    assert_eq!(ls("opq"), ["new"]);
    assert_eq!(ls("rec"), ["new"]);
    assert_eq!(mode("rec"), 0o700);
    assert_eq!(ls("sl"), ["f", "g"]);
    // Type changes.
    assert!(meta(&v.join("t/f2d")).is_dir());
    assert_eq!(read("t/f2d/inner"), b"in");
    assert_eq!(read("t/d2f"), b"nowfile");
    assert_eq!(mode("t/d2f"), 0o600);
    assert!(meta(&v.join("t/l2f")).is_file());
    // Names.
    assert_eq!(read("abs/file"), b"abs", "absolute path kept inside the layer");
    assert_eq!(read(&format!("long/{}", "L".repeat(150))), b"long name");
    assert_eq!(std::fs::read(v.join(OsStr::from_bytes(b"caf\xe9"))).unwrap(), b"x");
    let f = meta(&v.join("frac"));
    assert_eq!((f.mtime(), f.mtime_nsec()), (1_600_000_001, 500_000_000));
    assert_eq!(meta(&v.join("d/keep")).mtime(), MTIME as i64);
    // Devices, fifos, special modes, capabilities.
    let n = meta(&v.join("dev/null"));
    assert!(n.file_type().is_char_device());
    assert_eq!((rustix::fs::major(n.rdev()), rustix::fs::minor(n.rdev()), n.mode() & 0o7777), (1, 3, 0o666));
    let b = meta(&v.join("dev/loop9"));
    assert!(b.file_type().is_block_device());
    assert_eq!((rustix::fs::major(b.rdev()), rustix::fs::minor(b.rdev())), (7, 9));
    assert!(meta(&v.join("dev/fifo")).file_type().is_fifo());
    assert_eq!(mode("dev"), 0o755, "unlisted parent with no lower: 0755");
    assert_eq!(mode("bin/su"), 0o4755);
    assert_eq!((mode("sgid"), owner("sgid")), (0o2775, (5, 6)));
    assert_eq!(mode("tmp2"), 0o1777);
    let caps = xattrs_of(&v.join("bin/ping"));
    assert_eq!(caps.len(), 1, "{caps:?}");
    assert_eq!(caps[0].0, "security.capability");
    assert_eq!(owner("bin/ping"), (9, 0), "capability set after chown");
}

#[test]
fn layer_semantics_through_oci_and_docker_archive() {
    let env = Env::new("imp-sem");
    let (dir, _) = semantics_image(&env);
    let chain = layout_chain(&dir);
    let id = import_ok(&env, &format!("oci:{}:v1", dir.display()), &[]);
    assert_eq!(id, chain);
    let m = mount_image(&env, "v1", "m");
    check_semantics(&host_view(&env, &m));
    // umoci applies layers onto one directory: a reference for the merged
    // result (it agrees on everything above).
    need("umoci");
    sh(&format!("umoci unpack --image {}:v1 {} >/dev/null", dir.display(), env.dir.join("ref").display()), &env.dir);
    assert_same_tree(&host_view(&env, &m), &env.dir.join("ref/rootfs"));
    umount_image(&env, &m);

    // The same image through docker-archive, into a second store: same IDs,
    // same tree, as erofs.
    skopeo(&env.dir, &format!("oci:{}:v1", dir.display()), "docker-archive:sem.tar:sem:1", "");
    let other = Env::new("imp-sem2");
    let id2 = import_ok(
        &other,
        &format!("docker-archive:{}:sem:1", env.dir.join("sem.tar").display()),
        &["--fstype", "erofs"],
    );
    assert_eq!(id2, chain);
    let m2 = mount_image(&other, "sem:1", "m");
    check_semantics(&host_view(&other, &m2));
    umount_image(&other, &m2);
    other.assert_clean();
    env.assert_clean();
}

// ================================================================ names

#[test]
fn names_default_to_the_tag_or_nothing() {
    let env = Env::new("imp-names");
    let mut t = Tar::default();
    t.file("a", b"a");
    let tars = vec![t.done()];
    let tagged = env.dir.join("tagged");
    write_oci(&tagged, &tars, &[true], Some("1.0"), None);
    let untagged = env.dir.join("untagged");
    write_oci(&untagged, &tars, &[true], None, None);

    let id = import_ok(&env, &format!("oci:{}", untagged.display()), &["-q"]);
    assert!(names(&env.root).is_empty(), "no tag, no --name: no name");
    assert_eq!(import_ok(&env, &format!("oci:{}:1.0", tagged.display()), &["-q"]), id);
    assert_eq!(names(&env.root), BTreeMap::from([("1.0".to_string(), id.clone())]));
    assert_eq!(import_ok(&env, &format!("oci:{}", untagged.display()), &["--name", "reg.io/ns/app:2"]), id);
    assert_eq!(names(&env.root).get("reg.io%2Fns%2Fapp:2"), Some(&id));
    // Errors: unknown tag, bad name, unknown transport, missing layout.
    import(&env, &format!("oci:{}:nope", tagged.display()), &[]).fails(32, "no image tagged \"nope\" (tags: 1.0)");
    import(&env, &format!("oci:{}", tagged.display()), &["--name", "../x"]).fails(1, "invalid name");
    // (docker:// is a registry pull: tests/registry.rs.)
    import(&env, "docker-daemon:busybox", &[]).fails(1, "unknown transport");
    import(&env, &format!("oci:{}", env.dir.join("missing").display()), &[]).fails(32, "No such file or directory");
    import(&env, &format!("oci-archive:{}", tagged.display()), &[]).fails(32, "is a directory");
    env.assert_clean();
}

// ================================================================ verification

fn two_layer_layout(dir: &Path) -> Vec<String> {
    let mut a = Tar::default();
    a.file("a", &vec![b'a'; 100_000]);
    let mut b = Tar::default();
    b.file("b", &vec![b'b'; 100_000]);
    write_oci(dir, &[a.done(), b.done()], &[true, true], Some("t"), None);
    let (m, _) = oci_docs(dir);
    m["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect()
}

fn flip_byte(p: &Path, at: usize) {
    let mut d = std::fs::read(p).unwrap();
    d[at] ^= 0x55;
    std::fs::write(p, d).unwrap();
}

#[test]
fn corrupted_blobs_are_refused_and_nothing_is_stored() {
    // The tree path (ext4) and the stream into erofs: the image is only
    // finished once both digests match.
    for fstype in ["ext4", "erofs"] {
        corrupted_blobs_round(fstype);
    }
}

fn corrupted_blobs_round(fstype: &str) {
    let mut env = Env::new(&format!("imp-corrupt-{fstype}"));
    env.pin_layer_fstype(fstype);
    // The bottom layer corrupted: nothing at all is stored.
    let bad1 = env.dir.join("bad1");
    let digests = two_layer_layout(&bad1);
    let p = blob(&bad1, &digests[0]);
    let len = std::fs::metadata(&p).unwrap().len() as usize;
    flip_byte(&p, len / 2);
    let r = import(&env, &format!("oci:{}:t", bad1.display()), &[]);
    r.fails(32, &format!("layer 1/2 ({})", digests[0]));
    assert!(r.stderr.contains("digest mismatch"), "{}", r.stderr);
    assert!(layer_dirs(&env.root).is_empty() && names(&env.root).is_empty());
    assert!(tmp_entries(&env.root).is_empty() && tmp_entries(&env.fallback).is_empty());

    // The top one: the verified bottom layer stays, no top, no name.
    let bad2 = env.dir.join("bad2");
    let digests = two_layer_layout(&bad2);
    let p = blob(&bad2, &digests[1]);
    flip_byte(&p, 40);
    let r = import(&env, &format!("oci:{}:t", bad2.display()), &[]);
    r.fails(32, &format!("layer 2/2 ({}): blob {}: digest mismatch", digests[1], digests[1]));
    assert_eq!(layer_dirs(&env.root).len(), 1);
    for l in layer_dirs(&env.root) {
        assert_eq!(
            json_file(&env.root.join("layers").join(&l).join("meta.json"))["fstype"],
            fstype,
            "the path under test"
        );
    }
    assert!(names(&env.root).is_empty());
    assert!(tmp_entries(&env.root).is_empty() && tmp_entries(&env.fallback).is_empty());

    // A layer already in the store is not even read: the same corrupt
    // bottom blob does not matter once its layer is there.
    let good = env.dir.join("good");
    two_layer_layout(&good);
    let id = import_ok(&env, &format!("oci:{}:t", good.display()), &[]);
    let r = import(&env, &format!("oci:{}:t", bad1.display()), &["--name", "again"]);
    r.ok();
    assert_eq!(r.stdout.trim(), id);
    assert_eq!(r.stderr.matches("already in the root store").count(), 2, "{}", r.stderr);
    env.assert_clean();
}

#[test]
fn wrong_diff_id_is_refused() {
    for fstype in ["ext4", "erofs"] {
        wrong_diff_id_round(fstype);
    }
}

fn wrong_diff_id_round(fstype: &str) {
    let mut env = Env::new(&format!("imp-diffid-{fstype}"));
    env.pin_layer_fstype(fstype);
    let mut a = Tar::default();
    a.file("a", b"a");
    let mut b = Tar::default();
    b.file("b", b"b");
    let tars = vec![a.done(), b.done()];
    let wrong = format!("sha256:{}", sha256_hex(b"something else"));
    let ids = vec![format!("sha256:{}", sha256_hex(&tars[0])), wrong.clone()];
    let dir = env.dir.join("l");
    write_oci(&dir, &tars, &[true, false], Some("t"), Some(ids));
    let r = import(&env, &format!("oci:{}:t", dir.display()), &[]);
    r.fails(32, "layer 2/2");
    assert!(
        r.stderr.contains(&format!(
            "diff ID mismatch: the config says {wrong}, the uncompressed layer has sha256:{}",
            sha256_hex(&tars[1])
        )),
        "{}",
        r.stderr
    );
    assert_eq!(layer_dirs(&env.root).len(), 1, "the good bottom layer is kept");
    assert!(names(&env.root).is_empty());
    assert!(tmp_entries(&env.root).is_empty() && tmp_entries(&env.fallback).is_empty());

    // A manifest pointing to a config that is not what it says.
    let dir2 = env.dir.join("l2");
    write_oci(&dir2, &tars, &[true, true], Some("t"), None);
    let (m, _) = oci_docs(&dir2);
    let cfg = blob(&dir2, m["config"]["digest"].as_str().unwrap());
    let mut c = std::fs::read(&cfg).unwrap();
    c.push(b' ');
    std::fs::write(&cfg, c).unwrap();
    import(&env, &format!("oci:{}:t", dir2.display()), &[]).fails(32, "config");
    env.assert_clean();
}

#[test]
fn truncated_archives_are_refused() {
    let env = Env::new("imp-trunc");
    let dir = env.dir.join("l");
    two_layer_layout(&dir);
    skopeo(&env.dir, &format!("oci:{}:t", dir.display()), "oci-archive:oa.tar:t", "");
    skopeo(&env.dir, &format!("oci:{}:t", dir.display()), "docker-archive:da.tar:x:1", "");
    for (f, t) in [("oa.tar", "oci-archive"), ("da.tar", "docker-archive")] {
        let p = env.dir.join(f);
        let full = std::fs::read(&p).unwrap();
        let before = layer_dirs(&env.root);
        for cut in [full.len() / 2, full.len() - 2048, full.len() - 1024] {
            let tp = env.dir.join(format!("cut-{cut}-{f}"));
            std::fs::write(&tp, &full[..cut]).unwrap();
            let r = import(&env, &format!("{t}:{}", tp.display()), &[]);
            assert_eq!(r.code, 32, "{t} cut at {cut}: {r:?}");
            assert!(r.stderr.contains("truncated") || r.stderr.contains("no member"), "{t} cut at {cut}: {}", r.stderr);
            assert_eq!(layer_dirs(&env.root), before, "{t} cut at {cut}: nothing stored");
            assert!(tmp_entries(&env.root).is_empty());
        }
        // The whole archive imports, also from a pipe (spooled to tmp/).
        let id = import_ok(&env, &format!("{t}:{}", p.display()), &["-q"]);
        let store = format!("--loopback-root {} --loopback-fallback {}", env.root.display(), env.fallback.display());
        let piped = env.sh(&format!("cat {} | {BIN} import {t}:/dev/stdin --name piped {store}", p.display()));
        piped.ok();
        assert_eq!(piped.stdout.trim(), id);
        let cut = env.sh(&format!("head -c 3000 {} | {BIN} import {t}:/dev/stdin {store}", p.display()));
        assert_eq!(cut.code, 32, "{cut:?}");
        // Compressed archives (docker save | gzip), from a file or a pipe.
        let gz = env.sh(&format!(
            "gzip -c {} > {}.gz && {BIN} import {t}:{}.gz {store}",
            p.display(),
            p.display(),
            p.display()
        ));
        gz.ok();
        assert_eq!(gz.stdout.trim(), id);
        let gz = env.sh(&format!("gzip -c {} | {BIN} import {t}:/dev/stdin {store}", p.display()));
        gz.ok();
        assert_eq!(gz.stdout.trim(), id);
        assert!(tmp_entries(&env.root).is_empty(), "spool left: {:?}", tmp_entries(&env.root));
    }
    env.assert_clean();
}

// ================================================================ traversal

/// Every one of these must fail without writing anything outside the
/// staging tree.
#[test]
fn path_traversal_is_refused() {
    // The tree path (ext4) and the stream into the erofs writer: the same
    // refusals, nothing written outside.
    for fstype in ["ext4", "erofs"] {
        path_traversal_is_refused_as(fstype);
    }
}

fn path_traversal_is_refused_as(fstype: &str) {
    let env = Env::new(&format!("imp-trav-{fstype}"));
    let outside = env.dir.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let out = outside.display().to_string();
    let cases: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        ("dotdot", vec![Tar::default().file("../evil", b"x").done()], "'..'"),
        ("inner-dotdot", vec![Tar::default().dir("a/", 0o755).file("a/../../evil", b"x").done()], "'..'"),
        (
            "symlinked-parent",
            vec![Tar::default().symlink("ln", &out).file("ln/evil", b"x").done()],
            "is a symlink in this layer",
        ),
        (
            "symlinked-grandparent",
            vec![Tar::default().symlink("ln", &out).file("ln/sub/evil", b"x").done()],
            "is a symlink in this layer",
        ),
        ("hardlink-dotdot", vec![Tar::default().hardlink("h", "../../../etc/passwd").done()], "'..'"),
        (
            "hardlink-via-symlink",
            vec![Tar::default().symlink("ln", "/etc").hardlink("h", "ln/passwd").done()],
            "below a symlink",
        ),
        ("whiteout-dotdot", vec![Tar::default().whiteout("../.wh.evil").done()], "'..'"),
        (
            "symlink-in-lower-layer",
            vec![Tar::default().symlink("ln", &out).done(), Tar::default().file("ln/evil", b"x").done()],
            "symlink in the layers below",
        ),
        (
            "symlink-in-lower-layer-via-hardlink",
            vec![
                Tar::default().symlink("ln", &format!("{out}/")).done(),
                Tar::default().hardlink("h", "ln/evil").done(),
            ],
            "symlink in the layers below",
        ),
    ];
    for (name, tars, msg) in cases {
        let dir = env.dir.join(name);
        let n = tars.len();
        write_oci(&dir, &tars, &vec![false; n], None, None);
        let before = layer_dirs(&env.root).len();
        let r = import(&env, &format!("oci:{}", dir.display()), &["--fstype", fstype]);
        assert_eq!(r.code, 32, "{fstype} {name}: {r:?}");
        assert!(r.stderr.contains("refusing") && r.stderr.contains(msg), "{fstype} {name}: {}", r.stderr);
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "{name} wrote outside");
        assert!(
            !env.dir.join("evil").exists() && !env.root.join("evil").exists() && !env.root.join("tmp/evil").exists(),
            "{name}"
        );
        assert_eq!(layer_dirs(&env.root).len(), before + n - 1, "{name}: only the good lower layer is stored");
        assert!(tmp_entries(&env.root).is_empty(), "{name}: staging left: {:?}", tmp_entries(&env.root));
    }
    assert!(std::fs::read("/etc/passwd").unwrap().starts_with(b"root:"));
    env.assert_clean();
}

// ================================================================ size

#[test]
fn slow_big_layer_64mib_file_and_20000_small_files() {
    let t0 = Instant::now();
    let env = Env::new("imp-big");
    let dir = env.dir.join("big");
    std::fs::create_dir_all(&dir).unwrap();
    // The tar is streamed to a file; 84 MiB stays out of memory.
    let tar_path = env.dir.join("big.tar");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tar_path).unwrap());
    let mut big = vec![0u8; 64 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for c in big.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    let big_sha = sha256_hex(&big);
    let mut t = Tar::default();
    t.dir("./", 0o755).dir("data/", 0o755).file("data/big.bin", &big);
    f.write_all(&t.out).unwrap();
    drop(big);
    for d in 0..100 {
        let mut t = Tar::default();
        t.dir(&format!("small/{d:03}/"), 0o755);
        for i in 0..200 {
            t.file(&format!("small/{d:03}/f{i:03}"), format!("{d}/{i}\n").as_bytes());
        }
        f.write_all(&t.out).unwrap();
    }
    f.write_all(&[0u8; 1024]).unwrap();
    drop(f);
    let tar = std::fs::read(&tar_path).unwrap();
    write_oci(&dir, &[tar], &[false], Some("big"), None);
    std::fs::remove_file(&tar_path).unwrap();
    let built = t0.elapsed();

    let t1 = Instant::now();
    let id = import_ok(&env, &format!("oci:{}:big", dir.display()), &[]);
    let import_time = t1.elapsed();
    let m = mount_image(&env, &id, "m");
    let v = host_view(&env, &m);
    assert_eq!(sha256_hex(&std::fs::read(v.join("data/big.bin")).unwrap()), big_sha);
    let mut count = 0;
    for d in std::fs::read_dir(v.join("small")).unwrap().flatten() {
        count += std::fs::read_dir(d.path()).unwrap().count();
    }
    assert_eq!(count, 20_000);
    assert_eq!(std::fs::read_to_string(v.join("small/042/f137")).unwrap(), "42/137\n");
    umount_image(&env, &m);
    let img = env.root.join("layers").join(id.strip_prefix("sha256:").unwrap()).join("layer.img");
    let st = std::fs::metadata(&img).unwrap();
    let used = st.blocks() * 512;
    eprintln!(
        "big layer: fixture {built:?}, import {import_time:?}, image {} MiB ({} MiB allocated)",
        st.len() >> 20,
        used >> 20
    );
    // 64 MiB + 20,000 one-block files + inode tables is about 148 MiB.
    assert!(used < 200 << 20, "image uses {} MiB", used >> 20);
    assert!(import_time < Duration::from_secs(60), "import took {import_time:?}");
    env.assert_clean();
}

#[test]
fn four_hundred_layers() {
    let env = Env::new("imp-400");
    let dir = env.dir.join("l");
    // Odd layers do not list f/ (as umoci writes layers): those read the
    // whole chain below them for its metadata, which must stay 0750.
    let tars: Vec<Vec<u8>> = (0..400)
        .map(|i| {
            let mut t = Tar::default();
            if i % 2 == 0 {
                t.dir("f/", 0o750);
            }
            t.file(&format!("f/{i:03}"), format!("{i}").as_bytes()).file("top", format!("{i}").as_bytes());
            t.done()
        })
        .collect();
    let n = tars.len();
    write_oci(&dir, &tars, &vec![false; n], Some("many"), None);
    let t = Instant::now();
    let id = import_ok(&env, &format!("oci:{}:many", dir.display()), &["--fstype", "erofs", "-q"]);
    eprintln!("400 layers imported in {:?}", t.elapsed());
    assert_eq!(id, layout_chain(&dir));
    assert_eq!(layer_dirs(&env.root).len(), 400);
    let m = mount_image(&env, "many", "m");
    assert_eq!(list_in(&env, &m.join("f")).len(), 400);
    assert_eq!(read_in(&env, &m.join("top")).as_deref(), Some("399"));
    assert_eq!(read_in(&env, &m.join("f/000")).as_deref(), Some("0"));
    let f = std::fs::metadata(host_view(&env, &m).join("f")).unwrap();
    assert_eq!(f.mode() & 0o7777, 0o750);
    umount_image(&env, &m);
    env.assert_clean();
}

// ================================================================ concurrency

#[test]
fn concurrent_imports_keep_one_copy_of_each_layer() {
    let env = Env::new("imp-conc");
    let other = Env::new("imp-conc-ns");
    let (dir, _) = semantics_image(&env);
    let chain = layout_chain(&dir);
    let args = import_args(&env, &format!("oci:{}:v1", dir.display()), &["-q"]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    // Two processes in the test's namespace, one in another namespace, all
    // on one store, started together.
    let mut kids = vec![];
    for e in [&env, &env, &other, &env] {
        let mut c = e.command(&argv);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        kids.push(c.spawn().unwrap());
    }
    for k in kids {
        let o = k.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), chain);
    }
    assert_eq!(layer_dirs(&env.root).len(), 3);
    assert!(layer_dirs(&env.fallback).is_empty());
    assert_eq!(names(&env.root), BTreeMap::from([("v1".to_string(), chain.clone())]));
    assert!(tmp_entries(&env.root).is_empty(), "{:?}", tmp_entries(&env.root));
    let m = mount_image(&env, "v1", "m");
    check_semantics(&host_view(&env, &m));
    umount_image(&env, &m);
    other.assert_clean();
    env.assert_clean();
}

#[test]
fn sigkill_leaves_only_staging_that_later_imports_ignore() {
    let env = Env::new("imp-kill");
    let (_, src) = semantics_image(&env);
    let args = import_args(&env, &src, &[]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    // Stop in layer 2 right after its unpack, while the lower layers are
    // mounted (detached) for its cross-layer hardlink; then SIGKILL.
    for point in ["pause:import-unpacked@1", "pause:import-build@2"] {
        let mut c = env.command(&argv);
        c.env("SHAREDLOOP_FAILPOINT", point).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut k = c.spawn().unwrap();
        let mut line = String::new();
        let mut err = BufReader::new(k.stderr.take().unwrap());
        while !line.contains("paused at") {
            line.clear();
            assert!(err.read_line(&mut line).unwrap() > 0, "importer ended before pausing at {point}");
        }
        if point.contains("unpacked") {
            assert!(!env.my_loops().is_empty(), "the lower view holds loop devices while paused");
        }
        k.kill().unwrap();
        k.wait().unwrap();
        assert!(
            wait_no_loops(&env.dir, Duration::from_secs(10)),
            "loop devices left by the killed import: {:?}",
            env.my_loops()
        );
        assert!(env.my_mounts().is_empty());
    }
    let left = tmp_entries(&env.root);
    // Staging, and the killed imports' claims (stale: they protect nothing,
    // and gc removes them).
    assert!(
        !left.is_empty()
            && left.iter().all(|n| n.starts_with("import-") || n.starts_with("layer-") || n.starts_with("claim.")),
        "{left:?}"
    );
    assert_eq!(left.iter().filter(|n| n.starts_with("claim.")).count(), 2, "{left:?}");
    // Only whole layers were published.
    for l in layer_dirs(&env.root) {
        let d = env.root.join("layers").join(&l);
        assert!(d.join("layer.img").is_file() && d.join("meta.json").is_file(), "{l}");
    }
    assert!(layer_dirs(&env.root).len() < 3);
    // A later import ignores the leftovers and finishes.
    import_ok(&env, &src, &["-q"]);
    assert_eq!(layer_dirs(&env.root).len(), 3);
    assert_eq!(tmp_entries(&env.root), left, "leftovers untouched, nothing new left");
    let m = mount_image(&env, "v1", "m");
    check_semantics(&host_view(&env, &m));
    umount_image(&env, &m);
    // gc removes the dead imports' staging and claims, and nothing else.
    let r = env.run(&[
        BIN,
        "gc",
        "--loopback-root",
        env.root.to_str().unwrap(),
        "--loopback-fallback",
        env.fallback.to_str().unwrap(),
    ]);
    r.ok();
    assert!(
        tmp_entries(&env.root).is_empty(),
        "{:?}
{}",
        tmp_entries(&env.root),
        r.stdout
    );
    assert_eq!(layer_dirs(&env.root).len(), 3);
    env.assert_clean();
}

/// `import oci:DIR:v1` paused after unpacking its second layer, with its
/// stderr (kept open: the import reports on it when it ends).
fn spawn_paused_import(env: &Env, dir: &Path) -> (std::process::Child, BufReader<std::process::ChildStderr>) {
    let args = import_args(env, &format!("oci:{}:v1", dir.display()), &[]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut c = env.command(&argv);
    c.env("SHAREDLOOP_FAILPOINT", "pause:import-unpacked@1").stdout(Stdio::null()).stderr(Stdio::piped());
    let mut k = c.spawn().unwrap();
    let mut err = BufReader::new(k.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("paused at") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0);
    }
    (k, err)
}

#[test]
fn sigterm_undoes_everything() {
    let env = Env::new("imp-term");
    let (dir, _) = semantics_image(&env);
    let (mut k, _err) = spawn_paused_import(&env, &dir);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(k.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let st = k.wait().unwrap();
    assert_eq!(st.code(), Some(8), "interrupted");
    assert!(tmp_entries(&env.root).is_empty(), "{:?}", tmp_entries(&env.root));
    assert_eq!(layer_dirs(&env.root).len(), 1);
    env.assert_clean();
}

#[test]
fn staging_is_private_while_an_image_is_unpacked() {
    // An image's setuid files and world-writable directories are live in the
    // staging tree while it is built: no other user may reach them.
    // The tree path (ext4), whose unpacked tree must stay private.
    let mut env = Env::new("imp-private");
    env.pin_layer_fstype("ext4");
    let (dir, _) = semantics_image(&env);
    let (mut k, _err) = spawn_paused_import(&env, &dir);
    use std::os::unix::fs::PermissionsExt;
    let staging = tmp_entries(&env.root);
    assert!(!staging.is_empty());
    // The import's claim on its chain, private too, lists all three layers.
    let claims: Vec<_> = staging.iter().filter(|s| s.starts_with("claim.")).collect();
    assert_eq!(claims.len(), 1, "{staging:?}");
    let claim = env.root.join("tmp").join(claims[0]);
    assert_eq!(std::fs::metadata(&claim).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(sharedloop::store::Claim::parse(&std::fs::read_to_string(&claim).unwrap()).len(), 3);
    for s in staging.iter().filter(|s| !s.starts_with("claim.")) {
        let p = env.root.join("tmp").join(s);
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o700, "{}", p.display());
        let r = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "ls"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(!r.status.success(), "nobody can list {}", p.display());
    }
    assert_eq!(std::fs::metadata(env.root.join("tmp")).unwrap().permissions().mode() & 0o777, 0o700);
    // The unpacked tree itself is in node-local staging (tmp/ of the
    // fallback store): private the same way.
    let local = tmp_entries(&env.fallback);
    assert_eq!(local.len(), 1, "{local:?}");
    let p = env.fallback.join("tmp").join(&local[0]);
    assert!(p.join("rootfs/bin/su").is_file(), "the setuid file lives there");
    assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(env.fallback.join("tmp")).unwrap().permissions().mode() & 0o777, 0o700);
    let r = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "ls"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!r.status.success(), "nobody can list {}", p.display());
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(k.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert_eq!(k.wait().unwrap().code(), Some(8));
    env.assert_clean();
}

// ================================================================ node-local staging

/// A `sharedloop` command (full argv) started with a failpoint, read up to
/// its "paused at"/"stopped at" line; its stderr stays open.
fn spawn_at(
    env: &Env,
    argv: &[String],
    extra: &[(&str, &str)],
    failpoint: &str,
) -> (std::process::Child, BufReader<std::process::ChildStderr>) {
    let a: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut c = env.command(&a);
    for (k, v) in extra {
        c.env(k, v);
    }
    c.env("SHAREDLOOP_FAILPOINT", failpoint).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut k = c.spawn().unwrap();
    let mut err = BufReader::new(k.stderr.take().unwrap());
    let mut line = String::new();
    let mut seen = String::new();
    while !line.contains("paused at") && !line.contains("stopped at") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "ended before {failpoint}: {seen}");
        seen.push_str(&line);
    }
    (k, err)
}

fn signal(k: &std::process::Child, sig: rustix::process::Signal) {
    rustix::process::kill_process(rustix::process::Pid::from_raw(k.id() as i32).unwrap(), sig).unwrap();
}

/// Entries of `dir` whose name starts with `prefix`.
fn entries_with(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(prefix)).map(|e| e.path()).collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `<store>/tmp` holds nothing but claims and empty staging directories
/// for finished images: no unpacked tree, no image being built.
#[track_caller]
fn store_tmp_has_no_work(store: &Path) {
    for e in tmp_entries(store) {
        if e.starts_with("claim.") {
            continue;
        }
        assert!(e.starts_with("layer-"), "unexpected {e} in {}/tmp", store.display());
        let inside: Vec<_> =
            std::fs::read_dir(store.join("tmp").join(&e)).unwrap().flatten().map(|x| x.file_name()).collect();
        assert!(inside.is_empty(), "{e} in {}/tmp holds {inside:?} while the work is elsewhere", store.display());
    }
}

/// (offset, length) of the data regions of a file (SEEK_DATA/SEEK_HOLE).
fn data_map(p: &Path) -> Vec<(u64, u64)> {
    use rustix::fs::SeekFrom;
    let f = std::fs::File::open(p).unwrap();
    let len = f.metadata().unwrap().len();
    let (mut out, mut off) = (vec![], 0);
    while off < len {
        let Ok(d) = rustix::fs::seek(&f, SeekFrom::Data(off)) else {
            break;
        };
        let h = rustix::fs::seek(&f, SeekFrom::Hole(d)).unwrap().min(len);
        out.push((d, h - d));
        off = h;
    }
    out
}

#[test]
fn import_unpacks_and_builds_in_local_staging_never_in_the_store() {
    // The tree path (ext4): erofs streams with no tree, see
    // erofs_import_streams_the_tar_into_the_image_with_no_staging_tree.
    let mut env = Env::new("stage-local");
    env.pin_layer_fstype("ext4");
    let (_, src) = semantics_image(&env);
    // (failpoint, what the local work directory holds there)
    // (Each run publishes the layers before the one it stops in.)
    let points = [
        ("pause:import-unpacked@1", "rootfs/newdir/link"),
        ("pause:import-publish@1", "layer.img"),
        ("pause:import-build@2", "rootfs/h/b"),
    ];
    for (point, holds) in points {
        let (mut k, _err) = spawn_at(&env, &import_args(&env, &src, &[]), &[], point);
        store_tmp_has_no_work(&env.root);
        let work = entries_with(&env.fallback.join("tmp"), "import-");
        assert_eq!(work.len(), 1, "{point}: {work:?}");
        let name = work[0].file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.contains(&format!(".{}.", k.id())), "{point}: {name} carries host and pid");
        assert!(work[0].join(holds).exists(), "{point}: {} lacks {holds}", work[0].display());
        assert_eq!(work[0].join("rootfs").exists(), !holds.starts_with("layer"), "{point}: the tree goes once built");
        assert_eq!(std::fs::metadata(&work[0]).unwrap().mode() & 0o777, 0o700);
        signal(&k, rustix::process::Signal::TERM);
        assert_eq!(k.wait().unwrap().code(), Some(8), "{point}");
        assert!(
            tmp_entries(&env.root).is_empty() && tmp_entries(&env.fallback).is_empty(),
            "{point}: left {:?} {:?}",
            tmp_entries(&env.root),
            tmp_entries(&env.fallback)
        );
    }
    // The whole import, hardlinks into lower layers included (the lower
    // view is mounted from the store while the tree is local).
    let r = import(&env, &src, &[]);
    r.ok();
    let m = mount_image(&env, "v1", "m");
    check_semantics(&host_view(&env, &m));
    umount_image(&env, &m);
    assert_eq!(layer_dirs(&env.root).len(), 3);
    assert!(layer_dirs(&env.fallback).is_empty(), "the fallback holds staging, never layers");
    assert!(!r.stderr.contains("copied in"), "one filesystem: renamed, not copied: {}", r.stderr);
    env.assert_clean();
}

#[test]
fn staging_dir_option_and_configuration_key_are_honoured() {
    let env = Env::new("stage-opt");
    let (_, src) = semantics_image(&env);
    let (opt, cfg) = (env.dir.join("scratch-opt"), env.dir.join("scratch/cfg"));
    let conf = env.dir.join("sl.conf");
    // The tree path (ext4), whose tree the checks look for.
    std::fs::write(&conf, format!("# node-local\nstaging_dir={}\nlayer_fstype=ext4\n", cfg.display())).unwrap();
    let conf_env = [("SHAREDLOOP_CONFIG", conf.to_str().unwrap())];
    let layer_src = env.dir.join("layer-src");
    make_tree(&layer_src, &[("f", E::File("content")), ("d/g", E::File("g"))]);
    let add_argv = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = vec![
            BIN.into(),
            "add".into(),
            layer_src.to_string_lossy().into(),
            "--loopback-root".into(),
            env.root.to_string_lossy().into(),
            "--loopback-fallback".into(),
            env.fallback.to_string_lossy().into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let opt_s = opt.to_string_lossy().into_owned();
    // (argv, environment, failpoint, where the work must be, its label)
    type Case<'a> = (Vec<String>, &'a [(&'a str, &'a str)], &'a str, &'a Path, &'a str);
    let cases: Vec<Case> = vec![
        (
            import_args(&env, &src, &["--staging-dir", &opt_s, "--fstype", "ext4"]),
            &[],
            "pause:import-build@0",
            &opt,
            "import-",
        ),
        (import_args(&env, &src, &[]), &conf_env, "pause:import-build@0", &cfg, "import-"),
        (import_args(&env, &src, &["--staging-dir", &opt_s]), &conf_env, "pause:import-build@0", &opt, "import-"),
        (add_argv(&["--staging-dir", &opt_s]), &[], "pause:add-publish", &opt, "add-"),
        (add_argv(&[]), &conf_env, "pause:add-publish", &cfg, "add-"),
    ];
    for (i, (argv, extra, point, at, label)) in cases.iter().enumerate() {
        let (mut k, _err) = spawn_at(&env, argv, extra, point);
        let work = entries_with(at, label);
        assert_eq!(work.len(), 1, "case {i}: {work:?}");
        let holds = if *label == "add-" { "layer.img" } else { "rootfs/lower/target" };
        assert!(work[0].join(holds).exists(), "case {i}: {} lacks {holds}", work[0].display());
        for other in [&opt, &cfg, &env.fallback.join("tmp")] {
            if other != at {
                assert!(entries_with(other, "").is_empty(), "case {i}: {} used too", other.display());
            }
        }
        store_tmp_has_no_work(&env.root);
        signal(&k, rustix::process::Signal::TERM);
        assert_eq!(k.wait().unwrap().code(), Some(8), "case {i}");
        assert!(entries_with(at, "").is_empty(), "case {i}: left in {}", at.display());
    }
    // Created private when missing.
    assert_eq!(std::fs::metadata(&cfg).unwrap().mode() & 0o777, 0o700);
    // Whole runs through each.
    import_ok(&env, &src, &["--staging-dir", &opt_s]);
    let r = env.run_env(&add_argv(&[]).iter().map(String::as_str).collect::<Vec<_>>(), &conf_env);
    r.ok();
    assert!(entries_with(&opt, "").is_empty() && entries_with(&cfg, "").is_empty());
    assert!(!env.fallback.exists(), "an explicit staging directory leaves the fallback alone");
    assert_eq!(layer_dirs(&env.root).len(), 4);
    // A staging directory that was asked for and cannot be used is an error
    // naming it, not a silent fallback onto the store.
    std::fs::write(env.dir.join("afile"), b"").unwrap();
    let bad = env.dir.join("afile/sub");
    make_tree(&layer_src, &[("new", E::File("a layer not stored yet"))]);
    let r =
        env.run(&add_argv(&["--staging-dir", bad.to_str().unwrap()]).iter().map(String::as_str).collect::<Vec<_>>());
    r.fails(32, &format!("staging directory: create directory: {}: Not a directory", bad.display()));
    // mount -o has no use for it.
    let m = env.mnt("m");
    env.run(&[
        "mount",
        "-t",
        "sharedloop",
        "v1",
        m.to_str().unwrap(),
        "-o",
        &format!("{},staging_dir=/x", env.store_opts()),
    ])
    .fails(1, "staging_dir: not a mount option");
    // The default place unusable (a read-only fallback): the store's own
    // tmp/, with a warning.
    let other = Env::new("stage-rofb");
    std::fs::create_dir_all(&other.fallback).unwrap();
    let fb = other.fallback.display().to_string();
    other.sh(&format!("mount --bind {fb} {fb} && mount -o remount,bind,ro {fb}")).ok();
    let (mut k, mut err) = spawn_at(&other, &import_args(&other, &src, &[]), &[], "pause:import-build@1");
    assert_eq!(entries_with(&other.root.join("tmp"), "import-").len(), 1, "{:?}", tmp_entries(&other.root));
    signal(&k, rustix::process::Signal::TERM);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert_eq!(k.wait().unwrap().code(), Some(8));
    let r = import(&other, &src, &["-q"]);
    r.ok();
    assert!(
        r.stderr.contains("warning: node-local staging unusable") && r.stderr.contains("Read-only file system"),
        "{}",
        r.stderr
    );
    assert!(tmp_entries(&other.root).is_empty());
    other.sh(&format!("umount {fb}")).ok();
    other.assert_clean();
    env.assert_clean();
}

#[test]
fn a_store_on_another_filesystem_gets_a_sparse_identical_copy() {
    // ext4 layers, whose images are mostly holes (an erofs image is data).
    let mut env = Env::new("stage-copy");
    env.pin_layer_fstype("ext4");
    // A second store root on a tmpfs that only the test's namespace has.
    let troot = env.dir.join("tmpfs-root");
    std::fs::create_dir_all(&troot).unwrap();
    env.sh(&format!("mount -t tmpfs -o size=512m,mode=0755 sl-test-tmpfs {}", troot.display())).ok();
    let tview = env.view(&troot);
    // A layer with some real data: a 6 MiB file (pseudo-random), small files.
    let src = env.dir.join("layer-src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let big: Vec<u8> = (0..6 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(src.join("big"), &big).unwrap();
    for i in 0..50 {
        std::fs::write(src.join("d").join(i.to_string()), format!("small {i}")).unwrap();
    }
    let add = |root: &Path| -> Run {
        env.run(&[
            BIN,
            "add",
            src.to_str().unwrap(),
            "--loopback-root",
            root.to_str().unwrap(),
            "--loopback-fallback",
            env.fallback.to_str().unwrap(),
            "-v",
        ])
    };
    // Same filesystem: renamed. Another one: copied (ext4 to tmpfs is not
    // a copy_file_range pair: reads and writes).
    // A failure (or signal) in the middle of the copy leaves nothing, here
    // or there.
    let r = env.run_env(
        &[
            BIN,
            "add",
            src.to_str().unwrap(),
            "--loopback-root",
            troot.to_str().unwrap(),
            "--loopback-fallback",
            env.fallback.to_str().unwrap(),
        ],
        &[("SHAREDLOOP_FAILPOINT", "stage-copy")],
    );
    r.fails(32, "injected failure at stage-copy");
    assert!(
        tmp_entries(&tview).is_empty() && tmp_entries(&env.fallback).is_empty(),
        "{:?} {:?}",
        tmp_entries(&tview),
        tmp_entries(&env.fallback)
    );
    assert!(layer_dirs(&tview).is_empty());
    let same = add(&env.root);
    same.ok();
    assert!(!same.stderr.contains("copied into"), "{}", same.stderr);
    let copied = add(&troot);
    copied.ok();
    assert!(copied.stderr.contains("copied into") && copied.stderr.contains("read/write"), "{}", copied.stderr);
    let id = same.stdout.trim();
    assert_eq!(copied.stdout.trim(), id);
    let rel = format!("layers/{}/layer.img", &id[7..]);
    let (a, b) = (env.root.join(&rel), tview.join(&rel));
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "the copy is byte-identical");
    // Same data regions, same holes; except that a region of zeros
    // (mke2fs preallocates some: unwritten extents, which ext4 reports as
    // data only while they are in the page cache) may become a hole.
    let (ma, mb) = (data_map(&a), data_map(&b));
    let bytes = std::fs::read(&a).unwrap();
    for r in &mb {
        assert!(ma.contains(r), "copy region {r:?} is not a source region: {ma:?} vs {mb:?}");
    }
    for (at, n) in ma.iter().filter(|r| !mb.contains(r)) {
        assert!(
            bytes[*at as usize..(at + n) as usize].iter().all(|&x| x == 0),
            "data region {at}+{n} lost: {ma:?} vs {mb:?}"
        );
    }
    assert!(mb.iter().map(|r| r.1).sum::<u64>() >= 6 << 20, "{mb:?}");
    let (sa, sb) = (std::fs::metadata(&a).unwrap(), std::fs::metadata(&b).unwrap());
    let data: u64 = mb.iter().map(|r| r.1).sum();
    assert!(data < sa.len() / 2, "the image is sparse: {data} of {} bytes", sa.len());
    // Allocation: the data regions, give or take ext4's extent blocks.
    assert!(
        sb.blocks() * 512 <= sa.blocks() * 512 + 64 * 1024 && sb.blocks() * 512 >= data,
        "{} vs {} allocated",
        sb.blocks() * 512,
        sa.blocks() * 512
    );
    let size = |store: &Path| json_file(&store.join(format!("layers/{}/meta.json", &id[7..])))["size"].as_u64();
    assert_eq!((size(&env.root), size(&tview)), (Some(sa.len()), Some(sb.len())));
    // A whole image through the copy path, its lower view read from the
    // tmpfs store: mounted and checked.
    let (dir, _) = semantics_image(&env);
    let args = [
        BIN,
        "import",
        &format!("oci:{}:v1", dir.display()),
        "--loopback-root",
        troot.to_str().unwrap(),
        "--loopback-fallback",
        env.fallback.to_str().unwrap(),
    ];
    let r = env.run(&args);
    r.ok();
    assert_eq!(r.stderr.matches("copied in").count(), 3, "{}", r.stderr);
    let m = env.mnt("m");
    let opts = format!("loopback_root={},loopback_fallback={}", troot.display(), env.fallback.display());
    env.run(&["mount", "-t", "sharedloop", "v1", m.to_str().unwrap(), "-o", &opts]).ok();
    check_semantics(&host_view(&env, &m));
    umount_image(&env, &m);
    assert!(tmp_entries(&tview).is_empty(), "{:?}", tmp_entries(&tview));
    env.sh(&format!("umount {}", troot.display())).ok();
    env.assert_clean();
}

#[test]
fn publish_keeps_the_layer_another_import_published_first() {
    let env = Env::new("stage-race");
    let (dir, src) = semantics_image(&env);
    let chain = layout_chain(&dir);
    // A stops with its first image built, before it publishes ...
    let (k, mut err) = spawn_at(&env, &import_args(&env, &src, &["-v"]), &[], "stop:import-publish@0");
    let stopped = Instant::now();
    while !std::fs::read_to_string(format!("/proc/{}/stat", k.id()))
        .unwrap()
        .rsplit_once(')')
        .unwrap()
        .1
        .trim_start()
        .starts_with('T')
    {
        assert!(stopped.elapsed() < Duration::from_secs(10), "importer did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
    // ... B imports the whole image meanwhile ...
    assert_eq!(import_ok(&env, &src, &["-q"]), chain);
    let inodes = |f: &str| -> Vec<u64> {
        layer_dirs(&env.root)
            .iter()
            .map(|l| std::fs::metadata(env.root.join("layers").join(l).join(f)).unwrap().ino())
            .collect()
    };
    let (metas, images) = (inodes("meta.json"), inodes("layer.img"));
    assert_eq!(metas.len(), 3);
    // ... and A goes on: its rename meets B's layer, which it keeps.
    signal(&k, rustix::process::Signal::CONT);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let o = k.wait_with_output().unwrap();
    assert!(o.status.success(), "{rest}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), chain);
    assert!(rest.contains("already published, ours dropped"), "{rest}");
    assert_eq!((inodes("meta.json"), inodes("layer.img")), (metas, images), "theirs kept");
    assert_eq!(names(&env.root), BTreeMap::from([("v1".to_string(), chain.clone())]));
    let m = mount_image(&env, "v1", "m");
    check_semantics(&host_view(&env, &m));
    umount_image(&env, &m);
    env.assert_clean();
}

#[test]
fn publish_refuses_a_damaged_layer_directory_in_the_way() {
    let env = Env::new("stage-damage");
    let (dir, _) = semantics_image(&env);
    let (_, config) = oci_docs(&dir);
    let bottom = config["rootfs"]["diff_ids"][0].as_str().unwrap().trim_start_matches("sha256:").to_string();
    let junk = env.root.join("layers").join(&bottom).join("junk");
    std::fs::create_dir_all(junk.parent().unwrap()).unwrap();
    std::fs::write(&junk, b"not a layer").unwrap();
    let r = import(&env, &format!("oci:{}:v1", dir.display()), &[]);
    r.fails(32, &format!("{}: in the way of publishing and not a whole layer: ", junk.parent().unwrap().display()));
    assert!(r.stderr.contains("meta.json: No such file or directory"), "{}", r.stderr);
    assert_eq!(std::fs::read(&junk).unwrap(), b"not a layer", "left as it was");
    assert_eq!(layer_dirs(&env.root), BTreeSet::from([bottom.clone()]));
    assert!(names(&env.root).is_empty());
    // The same for add.
    let src = env.dir.join("layer-src");
    make_tree(&src, &[("f", E::File("x"))]);
    let scratch = env.dir.join("scratch-store");
    let argv = |root: &Path| -> Vec<String> {
        [
            BIN,
            "add",
            src.to_str().unwrap(),
            "--loopback-root",
            root.to_str().unwrap(),
            "--loopback-fallback",
            env.fallback.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |root: &Path| env.run(&argv(root).iter().map(String::as_str).collect::<Vec<_>>());
    let r = run(&scratch);
    r.ok();
    let hex = r.stdout.trim()[7..].to_string();
    let dest = env.root.join("layers").join(&hex);
    std::fs::create_dir_all(dest.join("sub")).unwrap();
    run(&env.root).fails(32, &format!("{}: in the way of publishing and not a whole layer: ", dest.display()));
    assert!(!dest.join("layer.img").exists() && dest.join("sub").is_dir());
    std::fs::remove_dir_all(env.root.join("layers").join(&bottom)).unwrap();
    std::fs::remove_dir_all(&dest).unwrap();
    std::fs::remove_dir_all(&scratch).unwrap();
    env.assert_clean();
}

/// One image per layer: importing again with another --fstype keeps the
/// stored images and says so for each layer, naming both formats.
#[test]
fn reimport_in_another_format_says_why_not() {
    let env = Env::new("imp-refmt");
    let dir = env.dir.join("oci");
    two_layer_layout(&dir);
    let src = format!("oci:{}:t", dir.display());
    import_ok(&env, &src, &["--fstype", "ext4"]);
    let r = import(&env, &src, &["--fstype", "erofs"]);
    r.ok();
    let note =
        "as ext4 (one image per layer: not stored again as erofs; `sharedloop rm` it first to change its format)";
    assert_eq!(r.stderr.matches(note).count(), 2, "{}", r.stderr);
    // Both layers still ext4, and no second copy anywhere.
    let mut stored = 0;
    for store in [&env.root, &env.fallback] {
        for hexid in layer_dirs(store) {
            let meta = json_file(&store.join("layers").join(&hexid).join("meta.json"));
            assert_eq!(meta["fstype"], "ext4", "{hexid}");
            stored += 1;
        }
    }
    assert_eq!(stored, 2);
    env.assert_clean();
}

/// Names in `dir` (recursively, relative), sorted.
fn all_names(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn erofs_import_streams_the_tar_into_the_image_with_no_staging_tree() {
    let env = Env::new("stage-erofs");
    let (dir, src) = semantics_image(&env);
    // At every step the local work directory holds the image alone (never
    // an unpacked tree); at import-unpacked the image is already built,
    // straight from the stream (layer 2 reads the lower view for its
    // cross-layer hardlink and its unlisted parents).
    for point in ["pause:import-publish@0", "pause:import-unpacked@1", "pause:import-build@2"] {
        let (mut k, _err) = spawn_at(&env, &import_args(&env, &src, &["--fstype", "erofs"]), &[], point);
        store_tmp_has_no_work(&env.root);
        let work = entries_with(&env.fallback.join("tmp"), "import-");
        assert_eq!(work.len(), 1, "{point}: {work:?}");
        assert_eq!(all_names(&work[0]), vec!["layer.img".to_string()], "{point}: no staging tree");
        signal(&k, rustix::process::Signal::TERM);
        assert_eq!(k.wait().unwrap().code(), Some(8), "{point}");
        assert!(
            tmp_entries(&env.root).is_empty() && tmp_entries(&env.fallback).is_empty(),
            "{point}: left {:?} {:?}",
            tmp_entries(&env.root),
            tmp_entries(&env.fallback)
        );
    }
    let r = import(&env, &src, &["--fstype", "erofs"]);
    r.ok();
    let m = mount_image(&env, "v1", "m");
    check_semantics(&host_view(&env, &m));
    need("umoci");
    sh(&format!("umoci unpack --image {}:v1 {} >/dev/null", dir.display(), env.dir.join("ref").display()), &env.dir);
    assert_same_tree(&host_view(&env, &m), &env.dir.join("ref/rootfs"));
    umount_image(&env, &m);
    for l in layer_dirs(&env.root) {
        let meta = json_file(&env.root.join("layers").join(&l).join("meta.json"));
        assert_eq!(meta["fstype"], "erofs", "{l}");
    }
    env.assert_clean();
}

/// A test that ends (or panics) while an import of its own is paused with
/// the lower layers' view mounted must not leave the import running and
/// its loop device attached: dropping the Env ends every process in the
/// test's mount namespace. (Three such imports, orphaned by failed tests,
/// once held loop devices for 20 minutes.)
#[test]
fn dropping_the_env_ends_a_paused_import_and_its_loop_device() {
    let mut env = Env::new("drop-paused");
    env.pin_layer_fstype("ext4");
    let (dir, _) = semantics_image(&env);
    let (mut k, _err) = spawn_paused_import(&env, &dir);
    let envdir = env.dir.clone();
    assert!(!loops_under(&envdir).is_empty(), "the paused import holds the lower view's loop device");
    drop(env);
    // nsenter execs the command: the import is this test's own child.
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        if let Some(st) = k.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "import {} still running after the Env was dropped", k.id());
        std::thread::sleep(Duration::from_millis(10));
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st:?}");
    assert_eq!(loops_under(&envdir), vec![], "loop devices left");
}

/// The lz4 incompat features of a stored layer image (0 if uncompressed).
fn incompat(store: &Path, hexid: &str) -> u32 {
    let b = std::fs::read(store.join("layers").join(hexid).join("layer.img")).unwrap();
    u32::from_le_bytes(b[1024 + 80..1024 + 84].try_into().unwrap())
}

#[test]
fn umoci_lz4_layers_match_umoci_unpack() {
    let env = Env::new("imp-lz4");
    let img = UmociImage::build(&env);
    let src = format!("oci:{}:t", img.layout());
    import_and_compare(&env, &img, &src, &["--fstype", "erofs", "--compress", "lz4", "--quiet"], "t");
    // The first layer holds text.txt: compressed (zero padding, big
    // pclusters); every layer is erofs.
    let mut lz4 = 0;
    for hexid in layer_dirs(&env.root) {
        let meta = json_file(&env.root.join("layers").join(&hexid).join("meta.json"));
        assert_eq!(meta["fstype"], "erofs", "{hexid}");
        if incompat(&env.root, &hexid) == 0x3 {
            lz4 += 1;
        }
    }
    assert!(lz4 >= 1, "no layer stored compressed");
    // Asked again uncompressed: kept as it is, and said so.
    let r = import(&env, &src, &["--fstype", "erofs", "--compress", "none"]);
    r.ok();
    let note = "with compression lz4 (one image per layer: not stored again with compression none; `sharedloop rm` it first to change it)";
    assert_eq!(r.stderr.matches(note).count(), lz4, "{}", r.stderr);
    env.assert_clean();
}

#[test]
fn add_compress_lz4_and_bad_compression_values() {
    let mut env = Env::new("imp-lz4-add");
    let src = env.dir.join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    let text: Vec<u8> = b"lz4 add test line\n".iter().copied().cycle().take(500_000).collect();
    std::fs::write(src.join("d/text"), &text).unwrap();
    std::fs::write(src.join("one"), b"1").unwrap();
    let add = |env: &Env, extra: &[&str]| {
        let mut a = vec![
            BIN.to_string(),
            "add".into(),
            src.to_string_lossy().into(),
            "--loopback-root".into(),
            env.root.to_string_lossy().into(),
            "--loopback-fallback".into(),
            env.fallback.to_string_lossy().into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        env.run(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    add(&env, &["--fstype", "ext4", "--compress", "lz4"])
        .fails(1, "lz4 compression needs erofs layers, not ext4 (--compress none, or --fstype erofs)");
    add(&env, &["--compress", "zstd"]).fails(1, "invalid value 'zstd' for '--compress <COMPRESS>'");
    let r = add(&env, &["--fstype", "erofs", "--compress", "lz4"]);
    r.ok();
    let id = r.stdout.trim().strip_prefix("sha256:").unwrap().to_string();
    assert_eq!(incompat(&env.root, &id), 0x3);
    // ls says so, in the table and the JSON.
    let ls = env.run(&[
        BIN,
        "ls",
        "--loopback-root",
        env.root.to_str().unwrap(),
        "--loopback-fallback",
        env.fallback.to_str().unwrap(),
    ]);
    assert!(ls.ok().stdout.contains("erofs+lz4"), "{}", ls.stdout);
    let ls = env.run(&[
        BIN,
        "ls",
        "--json",
        "--loopback-root",
        env.root.to_str().unwrap(),
        "--loopback-fallback",
        env.fallback.to_str().unwrap(),
    ]);
    assert!(ls.ok().stdout.contains("\"compression\": \"lz4\""), "{}", ls.stdout);
    // fsck.erofs reads it back, byte for byte.
    let out = env.dir.join("x");
    let img = env.root.join("layers").join(&id).join("layer.img");
    sh(&format!("fsck.erofs --extract={} {}", out.display(), img.display()), &env.dir);
    assert!(std::fs::read(out.join("d/text")).unwrap() == text);
    std::fs::remove_dir_all(&out).unwrap();
    let cfg = env.dir.join("bogus.conf");
    std::fs::write(&cfg, "layer_compression=bogus\n").unwrap();
    env.envs.push(("SHAREDLOOP_CONFIG".into(), cfg.to_string_lossy().into()));
    add(&env, &["--fstype", "erofs"]).fails(1, "layer_compression=bogus: want none or lz4");
    // layer_compression=lz4 is the default --compress gives way to.
    std::fs::write(&cfg, "layer_compression=lz4\n").unwrap();
    std::fs::write(src.join("two"), b"2").unwrap();
    let r = add(&env, &["--fstype", "erofs"]);
    r.ok();
    let id2 = r.stdout.trim().strip_prefix("sha256:").unwrap().to_string();
    assert_eq!(incompat(&env.root, &id2), 0x3);
    std::fs::write(src.join("three"), b"3").unwrap();
    let r = add(&env, &["--fstype", "erofs", "--compress", "none"]);
    r.ok();
    let id3 = r.stdout.trim().strip_prefix("sha256:").unwrap().to_string();
    assert_eq!(incompat(&env.root, &id3), 0);
    // The configured default only applies to erofs layers.
    std::fs::write(src.join("four"), b"4").unwrap();
    add(&env, &["--fstype", "ext4"]).ok();
    env.assert_clean();
}
