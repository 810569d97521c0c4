//! Managing the store: `sharedloop ls`, `rm`, `gc` and `verify`, against a
//! real store, real mounts (in the test's private namespace) and real loop
//! devices.

mod common;
use common::*;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// `sharedloop ARGS` on this test's store.
fn sl(env: &Env, args: &[&str]) -> Run {
    env.sl(args)
}

fn short(id: &str) -> &str {
    &id[7..19]
}

fn root_layer_dir(env: &Env, id: &str) -> PathBuf {
    env.root.join("layers").join(hex(id))
}

fn meta(env: &Env, id: &str) -> Value {
    serde_json::from_slice(&std::fs::read(root_layer_dir(env, id).join("meta.json")).unwrap()).unwrap()
}

fn size(env: &Env, id: &str) -> u64 {
    meta(env, id)["size"].as_u64().unwrap()
}

fn has_layer(env: &Env, id: &str) -> bool {
    root_layer_dir(env, id).exists()
}

fn layers_in_store(env: &Env) -> BTreeSet<String> {
    std::fs::read_dir(env.root.join("layers"))
        .map(|r| r.flatten().map(|e| format!("sha256:{}", e.file_name().to_string_lossy())).collect())
        .unwrap_or_default()
}

fn mount(env: &Env, src: &str, target: &Path) {
    env.run(&["mount", "-t", "sharedloop", src, target.to_str().unwrap(), "-o", &env.store_opts()]).ok();
}

fn umount(env: &Env, target: &Path) {
    env.run(&["umount", target.to_str().unwrap()]).ok();
}

fn file(c: &str) -> [(&str, E<'_>); 1] {
    [("f.txt", E::File(c))]
}

/// A loop device we attach by hand (no autoclear), detached on drop.
struct Losetup(String);

impl Losetup {
    fn new(image: &Path) -> Losetup {
        let o = Command::new("losetup").args(["--find", "--show", "--read-only"]).arg(image).output().unwrap();
        assert!(o.status.success(), "losetup: {}", String::from_utf8_lossy(&o.stderr));
        Losetup(String::from_utf8_lossy(&o.stdout).trim().to_string())
    }
}

impl Drop for Losetup {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A pid that no process has now (a child that has been reaped).
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    pid
}

fn backdate(p: &Path, ago: &str) {
    let st = Command::new("touch").args(["-h", "-d", ago]).arg(p).status().unwrap();
    assert!(st.success());
}

// The test's own rendering of the human tables, independent of the code's.
fn human(b: u64) -> String {
    if b < 1024 {
        return format!("{b}B");
    }
    let units = ["KiB", "MiB", "GiB", "TiB"];
    let (mut v, mut u) = (b as f64 / 1024.0, 0);
    while v >= 1024.0 && u < 3 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1}{}", units[u])
}

fn render(rows: &[Vec<String>]) -> String {
    let mut w = vec![0; rows[0].len()];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    rows.iter()
        .map(|r| {
            let last = r.len() - 1;
            let cells: Vec<String> =
                r.iter().enumerate().map(|(i, c)| if i == last { c.clone() } else { format!("{c:<0$}", w[i]) }).collect();
            cells.join("  ").trim_end().to_string() + "\n"
        })
        .collect()
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object().unwrap().keys().map(|k| k.as_str()).collect()
}

#[test]
fn ls_shows_images_and_layers_human_and_json() {
    let env = Env::new("ls");
    let a = env.add(None, None, &file("base\n"));
    let b = env.add(Some(&a), Some("app:1"), &file("app\n"));
    let c = env.add_with(Some(&a), Some("tool:2"), &file("tool\n"), &["--fstype", "erofs"]);
    let u = env.add(None, None, &file("loose\n"));
    std::fs::create_dir(env.root.join("layers").join("junk")).unwrap();
    let m = env.mnt("m");
    mount(&env, "app:1", &m);

    // Human: two tables, sizes from the metadata, sorted by name and by ID.
    let r = sl(&env, &["ls"]);
    r.ok();
    let mut images = vec![strs(&["NAME", "TOP", "LAYERS", "SIZE", "STORE"])];
    images.push(vec!["app:1".into(), short(&b).into(), "2".into(), human(size(&env, &a) + size(&env, &b)), "root".into()]);
    images.push(vec!["tool:2".into(), short(&c).into(), "2".into(), human(size(&env, &a) + size(&env, &c)), "root".into()]);
    let row = |id: &str, parent: &str, fstype: &str, mounts: &str, names: &str| {
        let diff = meta(&env, id)["diff_id"].as_str().unwrap().to_string();
        vec![
            short(id).to_string(),
            short(&diff).to_string(),
            if parent.is_empty() { "-".to_string() } else { short(parent).to_string() },
            fstype.to_string(),
            human(size(&env, id)),
            "root".to_string(),
            mounts.to_string(),
            "-".to_string(),
            names.to_string(),
        ]
    };
    let mut rows = vec![
        row(&a, "", "ext4", "1", "app:1,tool:2"),
        row(&b, &a, "ext4", "1", "app:1"),
        row(&c, &a, "erofs", "0", "tool:2"),
        row(&u, "", "ext4", "0", "-"),
    ];
    rows.sort();
    let mut layers = vec![strs(&["CHAIN ID", "DIFF ID", "PARENT", "FSTYPE", "SIZE", "STORE", "MOUNTS", "ELSEWHERE", "NAMES"])];
    layers.extend(rows);
    assert_eq!(r.stdout, format!("{}\n{}", render(&images), render(&layers)));
    assert!(r.stderr.contains("junk: not a layer"), "{}", r.stderr);

    // JSON: exactly these fields.
    let r = sl(&env, &["ls", "--json"]);
    r.ok();
    let j: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(keys(&j), BTreeSet::from(["root", "fallback", "images", "layers", "problems"]));
    assert_eq!(j["root"], env.root.to_str().unwrap());
    assert_eq!(j["fallback"], env.fallback.to_str().unwrap());
    let imgs = j["images"].as_array().unwrap();
    assert_eq!(imgs.len(), 2);
    for i in imgs {
        assert_eq!(keys(i), BTreeSet::from(["name", "store", "top", "layers", "size", "error"]));
    }
    assert_eq!(
        imgs[0],
        serde_json::json!({"name": "app:1", "store": "root", "top": b, "layers": 2,
                           "size": size(&env, &a) + size(&env, &b), "error": null})
    );
    assert_eq!(imgs[1]["name"], "tool:2");
    assert_eq!(imgs[1]["top"], c.as_str());
    let ls = j["layers"].as_array().unwrap();
    assert_eq!(ls.len(), 4);
    let mut ids: Vec<&str> = ls.iter().map(|l| l["chain_id"].as_str().unwrap()).collect();
    let sorted = {
        let mut s = ids.clone();
        s.sort();
        s
    };
    assert_eq!(ids, sorted, "layers sorted by chain ID");
    ids.sort();
    let find = |id: &str| ls.iter().find(|l| l["chain_id"] == id).unwrap().clone();
    for l in ls {
        assert_eq!(
            keys(l),
            BTreeSet::from([
                "chain_id", "diff_id", "parent", "fstype", "size", "created", "store", "names", "mounts", "loop_devices",
                "held_elsewhere"
            ])
        );
    }
    let la = find(&a);
    assert_eq!(la["diff_id"], a.as_str(), "a base layer's chain ID is its diff ID");
    assert_eq!(la["parent"], Value::Null);
    assert_eq!(la["fstype"], "ext4");
    assert_eq!(la["size"], size(&env, &a));
    assert_eq!(la["created"], meta(&env, &a)["created"]);
    assert_eq!(la["store"], "root");
    assert_eq!(la["names"], serde_json::json!(["app:1", "tool:2"]));
    assert_eq!(la["mounts"], 1);
    assert_eq!(la["loop_devices"].as_array().unwrap().len(), 1, "{la}");
    let lb = find(&b);
    assert_eq!(lb["parent"], a.as_str());
    assert_eq!(lb["mounts"], 1);
    let lc = find(&c);
    assert_eq!(lc["fstype"], "erofs");
    assert_eq!(lc["names"], serde_json::json!(["tool:2"]));
    assert_eq!(lc["mounts"], 0);
    assert_eq!(lc["loop_devices"], serde_json::json!([]));
    let lu = find(&u);
    assert_eq!(lu["names"], serde_json::json!([]));
    let probs = j["problems"].as_array().unwrap();
    assert_eq!(probs.len(), 1, "{probs:?}");
    assert_eq!(keys(&probs[0]), BTreeSet::from(["store", "path", "error"]));
    assert_eq!(probs[0]["path"], env.root.join("layers/junk").to_str().unwrap());

    umount(&env, &m);
    let j: Value = serde_json::from_str(&sl(&env, &["ls", "--json"]).ok().stdout).unwrap();
    assert!(j["layers"].as_array().unwrap().iter().all(|l| l["mounts"] == 0 && l["loop_devices"] == serde_json::json!([])));
    env.assert_clean();
}

#[test]
fn rm_removes_exactly_the_layers_nothing_else_needs() {
    let env = Env::new("rm-shared");
    let a = env.add(None, None, &file("base\n"));
    let b = env.add(Some(&a), Some("app:1"), &file("app\n"));
    let c = env.add(Some(&a), Some("tool:2"), &file("tool\n"));
    let d = env.add(Some(&b), None, &file("on app\n")); // not named (yet)

    // The name goes; b stays as d's parent, a as part of tool:2.
    let r = sl(&env, &["rm", "app:1"]);
    r.ok();
    assert_eq!(r.stdout, "removed name app:1 (root)\n");
    assert!(!env.root.join("names/app:1").exists());
    assert_eq!(layers_in_store(&env), BTreeSet::from([a.clone(), b.clone(), c.clone(), d.clone()]));

    // Dry run: says, does nothing.
    let r = sl(&env, &["rm", "--dry-run", &d]);
    r.ok();
    assert!(r.stdout.contains(&format!("would remove layer {d} (root")), "{}", r.stdout);
    assert_eq!(layers_in_store(&env).len(), 4);

    // d by ID takes b with it (children first); a is tool:2's.
    let r = sl(&env, &["rm", &d]);
    r.ok();
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(lines[0].starts_with(&format!("removed layer {d} (root, ")), "{}", r.stdout);
    assert!(lines[1].starts_with(&format!("removed layer {b} (root, ")), "{}", r.stdout);
    assert!(lines[2].starts_with("freed "), "{}", r.stdout);
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    assert_eq!(layers_in_store(&env), BTreeSet::from([a.clone(), c.clone()]));

    // The last name takes the rest.
    let r = sl(&env, &["rm", "tool:2"]);
    r.ok();
    assert!(r.stdout.contains(&format!("removed layer {c} (root")), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("removed layer {a} (root")), "{}", r.stdout);
    assert!(layers_in_store(&env).is_empty());
    assert!(std::fs::read_dir(env.root.join("names")).unwrap().next().is_none());
    assert!(std::fs::read_dir(env.root.join("tmp")).unwrap().next().is_none(), "nothing left being deleted");

    // Two names for one image: removing one keeps every layer.
    let x = env.add(None, Some("x:1"), &file("x\n"));
    // A second name for the same layer (recorded directly: two adds of
    // equal trees only give one layer when their mtimes match).
    std::fs::write(env.root.join("names/x:latest"), format!("{x}\n")).unwrap();
    let r = sl(&env, &["rm", "x:1"]);
    r.ok();
    assert_eq!(r.stdout, "removed name x:1 (root)\n");
    assert!(has_layer(&env, &x));
    sl(&env, &["rm", "x:latest"]).ok();
    assert!(!has_layer(&env, &x));
    env.assert_clean();
}

#[test]
fn rm_is_refused_while_a_layer_is_in_use() {
    let env = Env::new("rm-busy");
    let a = env.add(None, None, &file("base\n"));
    let b = env.add(Some(&a), Some("app:1"), &file("app\n"));
    let c = env.add(Some(&a), Some("tool:2"), &file("tool\n"));
    let m = env.mnt("m");
    mount(&env, "app:1", &m);

    let r = sl(&env, &["rm", "app:1"]);
    r.fails(32, &format!("cannot remove app:1: layer {b} is in use by the mount at {} (source app:1)", m.display()));
    assert!(env.root.join("names/app:1").exists(), "nothing removed when refused");
    assert_eq!(layers_in_store(&env).len(), 3);

    // What the mount does not use can go; the shared base stays for app:1.
    let r = sl(&env, &["rm", "tool:2"]);
    r.ok();
    assert!(r.stdout.contains(&format!("removed layer {c}")), "{}", r.stdout);
    assert_eq!(layers_in_store(&env), BTreeSet::from([a.clone(), b.clone()]));

    // --name-only works while mounted; the layers wait for gc.
    sl(&env, &["rm", "--name-only", "app:1"]).ok();
    assert!(!env.root.join("names/app:1").exists());
    assert_eq!(layers_in_store(&env), BTreeSet::from([a.clone(), b.clone()]));
    let r = sl(&env, &["rm", &b]);
    r.fails(32, &format!("layer {b} is in use by the mount at {}", m.display()));
    umount(&env, &m);
    sl(&env, &["rm", &b]).ok();
    assert!(layers_in_store(&env).is_empty());

    // A loop device with no mount record (losetup by hand) also counts.
    let e = env.add(None, Some("e:1"), &file("e\n"));
    let dev = Losetup::new(&root_layer_dir(&env, &e).join("layer.img"));
    let r = sl(&env, &["rm", "e:1"]);
    r.fails(32, &format!("layer {e} has its image attached to {}", dev.0));
    assert!(has_layer(&env, &e));
    drop(dev);
    // So does a lock on the image (what a mount on another node sharing
    // the store would hold).
    let img = root_layer_dir(&env, &e).join("layer.img");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
    sharedloop::kernel::sys::ofd_try_write_lock(&f).unwrap();
    let r = sl(&env, &["rm", "e:1"]);
    r.fails(32, &format!("layer {e} has its image {} locked by another process or node", img.display()));
    let r = sl(&env, &["gc", "--min-age", "0"]);
    assert_eq!(r.ok().stdout, "gc: nothing to remove\n");
    drop(f);
    sl(&env, &["rm", "e:1"]).ok();
    assert!(!has_layer(&env, &e));
    env.assert_clean();
}

#[test]
fn rm_of_a_needed_layer_is_refused() {
    let env = Env::new("rm-needed");
    let a = env.add(None, None, &file("base\n"));
    let b = env.add(Some(&a), Some("app:1"), &file("app\n"));
    let c = env.add(Some(&a), None, &file("loose\n"));

    let r = sl(&env, &["rm", &a]);
    let (x, y) = if b < c { (&b, &c) } else { (&c, &b) };
    r.fails(32, &format!("cannot remove layer {a}: layers {x}, {y} depend on it; it is in the chain of image app:1"));
    // By unique prefix; the top of a named image.
    let r = sl(&env, &["rm", short(&b)]);
    r.fails(32, &format!("cannot remove layer {b}: it is in the chain of image app:1"));
    assert_eq!(layers_in_store(&env).len(), 3);

    // Usage and lookup errors.
    sl(&env, &["rm", "../etc"]).fails(1, "invalid name");
    sl(&env, &["rm", "nope:1"]).fails(32, "image nope:1: no such name");
    sl(&env, &["rm", "sha256:0123456789ab"]).fails(32, "layer sha256:0123456789ab: no layer with this ID prefix in ");
    sl(&env, &["rm", "--name-only", &c]).fails(1, "is a layer ID, not a name");
    sl(&env, &["rm"]).fails(1, "");

    // Together they can go: the name, its chain and the loose layer.
    let r = sl(&env, &["rm", "app:1", &c]);
    r.ok();
    assert!(layers_in_store(&env).is_empty(), "{}", r.stdout);
    env.assert_clean();
}

#[test]
fn gc_collects_unreferenced_layers_after_the_grace_period() {
    let env = Env::new("gc-layers");
    let a = env.add(None, None, &file("base\n"));
    let b = env.add(Some(&a), Some("app:1"), &file("app\n"));
    let u1 = env.add(None, None, &file("in progress\n"));
    let u2 = env.add(Some(&u1), None, &file("in progress 2\n"));
    let old = env.add(None, None, &file("old\n"));
    // Two hours old by its metadata and its directory.
    let mut m = meta(&env, &old);
    m["created"] = (m["created"].as_u64().unwrap() - 7200).into();
    std::fs::write(root_layer_dir(&env, &old).join("meta.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    backdate(&root_layer_dir(&env, &old), "2 hours ago");

    let r = sl(&env, &["gc", "--dry-run"]);
    r.ok();
    assert!(r.stdout.contains(&format!("would remove layer {old} (root")), "{}", r.stdout);
    assert!(r.stdout.contains("gc: would remove 1 items"), "{}", r.stdout);
    assert_eq!(layers_in_store(&env).len(), 5);

    // Default grace (1h): only the old one.
    let r = sl(&env, &["gc"]);
    r.ok();
    assert!(r.stdout.contains(&format!("removed layer {old} (root")), "{}", r.stdout);
    assert!(r.stdout.contains("gc: removed 1 items, freed "), "{}", r.stdout);
    assert_eq!(layers_in_store(&env), BTreeSet::from([a.clone(), b.clone(), u1.clone(), u2.clone()]));

    // No grace: the unnamed chain goes (top first), the named image stays.
    let r = sl(&env, &["gc", "--min-age", "0s"]);
    r.ok();
    let i2 = r.stdout.find(&format!("removed layer {u2}")).expect(&r.stdout);
    let i1 = r.stdout.find(&format!("removed layer {u1}")).expect(&r.stdout);
    assert!(i2 < i1, "children first: {}", r.stdout);
    assert_eq!(layers_in_store(&env), BTreeSet::from([a.clone(), b.clone()]));
    assert_eq!(sl(&env, &["gc", "--min-age", "0"]).ok().stdout, "gc: nothing to remove\n");
    sl(&env, &["gc", "--min-age", "1x"]).fails(1, "");

    // An import (or add) still at work keeps what it published since it
    // began, however long it runs: here it began 30 minutes ago, published
    // a layer 20 minutes ago, and the grace is 10 minutes.
    let slow = env.add(None, None, &file("published by a slow import\n"));
    let mut m = meta(&env, &slow);
    m["created"] = (m["created"].as_u64().unwrap() - 1200).into();
    std::fs::write(root_layer_dir(&env, &slow).join("meta.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    backdate(&root_layer_dir(&env, &slow), "20 minutes ago");
    let began = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 1800;
    let spool = env.root.join("tmp").join(format!(
        "import-spool.{}.{}.{began:x}00000000",
        sharedloop::store::hostname(),
        std::process::id()
    ));
    std::fs::create_dir_all(&spool).unwrap();
    assert_eq!(sl(&env, &["gc", "--min-age", "10m"]).ok().stdout, "gc: nothing to remove\n");
    std::fs::remove_dir(&spool).unwrap();
    let r = sl(&env, &["gc", "--min-age", "10m"]);
    assert!(r.ok().stdout.contains(&format!("removed layer {slow}")), "{}", r.stdout);
    env.assert_clean();
}

#[test]
fn gc_removes_what_dead_processes_left_but_not_live_ones() {
    let env = Env::new("gc-temps");
    env.add(None, Some("app:1"), &file("app\n"));
    let host = sharedloop::store::hostname();
    let me = std::process::id();
    let dead = dead_pid();
    let uniq = sharedloop::store::unique_suffix();
    let mk_dir = |p: PathBuf| {
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("layer.img"), vec![1u8; 8192]).unwrap();
        p
    };
    let mk_file = |p: PathBuf| {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"x").unwrap();
        p
    };
    let (tmp, fb_tmp, uppers, names) =
        (env.root.join("tmp"), env.fallback.join("tmp"), env.root.join("uppers"), env.root.join("names"));
    let gone = [
        mk_dir(tmp.join(format!("layer-dead.{host}.{dead}.{uniq}"))),
        mk_dir(fb_tmp.join(format!("layer-dead.{host}.{dead}.{uniq}"))),
        mk_dir(tmp.join(format!("{}.deleting.{host}.{dead}.{uniq}", "ab".repeat(32)))),
        mk_dir(tmp.join(format!("layer-far.otherhost.{me}.{uniq}"))),
        mk_file(uppers.join(format!(".dead.img.tmp.{host}.{dead}.{uniq}"))),
        mk_file(names.join(format!(".n:1.{dead}.{uniq}"))),
    ];
    // The other host's staging and the name record are old.
    for p in [&gone[3], &gone[3].join("layer.img")] {
        backdate(p, "2 days ago");
    }
    backdate(&gone[5], "2 hours ago");
    let kept = [
        mk_dir(tmp.join(format!("layer-live.{host}.{me}.{uniq}"))),
        mk_dir(tmp.join(format!("layer-near.otherhost.{dead}.{uniq}"))),
        mk_file(uppers.join(format!(".live.img.tmp.{host}.{me}.{uniq}"))),
        mk_file(names.join(format!(".m:1.{me}.{uniq}"))),
        mk_file(names.join(format!(".fresh:1.{dead}.{uniq}"))), // dead, but young: no host to tell
    ];

    let r = sl(&env, &["gc", "--dry-run"]);
    r.ok();
    assert!(gone.iter().chain(&kept).all(|p| p.exists()));
    let r = sl(&env, &["gc"]);
    r.ok();
    for p in &gone {
        assert!(!p.exists(), "{} should be gone: {}", p.display(), r.stdout);
        assert!(r.stdout.contains(&format!("removed {}", p.display())), "{}", r.stdout);
    }
    for p in &kept {
        assert!(p.exists(), "{} should stay: {}", p.display(), r.stdout);
    }
    assert!(r.stdout.contains(&format!("left by process {dead}, which is gone")), "{}", r.stdout);
    assert!(r.stdout.contains("left on host otherhost 2d ago"), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("gc: removed {} items, freed ", gone.len())), "{}", r.stdout);
    assert!(env.root.join("names/app:1").exists());
    assert_eq!(layers_in_store(&env).len(), 1);
    for p in &kept {
        if p.is_dir() {
            std::fs::remove_dir_all(p).unwrap();
        } else {
            std::fs::remove_file(p).unwrap();
        }
    }
    env.assert_clean();
}

#[test]
fn gc_never_removes_what_is_in_use() {
    let env = Env::new("gc-busy");
    let u = env.add(None, None, &file("mounted by id\n"));
    let v = env.add_with(None, None, &file("erofs from file\n"), &["--fstype", "erofs"]);
    let (m1, m2) = (env.mnt("m1"), env.mnt("m2"));
    mount(&env, &u, &m1);
    mount(&env, &v, &m2);
    let (host, uniq) = (sharedloop::store::hostname(), sharedloop::store::unique_suffix());
    let staging = env.root.join("tmp").join(format!("layer-x.{host}.{}.{uniq}", dead_pid()));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::copy(root_layer_dir(&env, &u).join("layer.img"), staging.join("layer.img")).unwrap();
    let dev = Losetup::new(&staging.join("layer.img"));

    let r = sl(&env, &["gc", "--min-age", "0"]);
    r.ok();
    assert_eq!(r.stdout, "gc: nothing to remove\n");
    assert_eq!(layers_in_store(&env), BTreeSet::from([u.clone(), v.clone()]));
    assert!(staging.exists());
    let r = sl(&env, &["rm", &v]);
    r.fails(32, &format!("is in use by the mount at {}", m2.display()));

    umount(&env, &m1);
    umount(&env, &m2);
    drop(dev);
    let r = sl(&env, &["gc", "--min-age", "0"]);
    r.ok();
    assert!(layers_in_store(&env).is_empty(), "{}", r.stdout);
    assert!(!staging.exists(), "{}", r.stdout);
    assert!(r.stdout.contains("gc: removed 3 items"), "{}", r.stdout);
    env.assert_clean();
}

#[test]
fn verify_finds_damaged_layers() {
    let env = Env::new("verify");
    let g = env.add(None, Some("good:1"), &file("good\n"));
    let e = env.add_with(Some(&g), Some("good:2"), &file("erofs\n"), &["--fstype", "erofs"]);
    let z = env.add(None, Some("zeroed:1"), &file("zeroed\n"));
    let t = env.add(None, None, &file("truncated\n"));
    let i = env.add(None, None, &file("inconsistent\n"));

    let r = sl(&env, &["verify", "--deep"]);
    r.ok();
    assert_eq!(r.stdout.lines().filter(|l| l.starts_with("OK    ")).count(), 8, "{}", r.stdout);
    assert!(r.stdout.ends_with("verify: 8 checked, 0 failed\n"), "{}", r.stdout);

    // Zeroed magic, a truncated image, metadata that contradicts itself.
    let img = |id: &str| root_layer_dir(&env, id).join("layer.img");
    let mut bytes = std::fs::read(img(&z)).unwrap();
    bytes[1080..1082].copy_from_slice(&[0, 0]);
    std::fs::write(img(&z), &bytes).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(img(&t)).unwrap();
    f.set_len(size(&env, &t) / 2).unwrap();
    drop(f);
    let mut m = meta(&env, &i);
    m["diff_id"] = g.clone().into();
    std::fs::write(root_layer_dir(&env, &i).join("meta.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();

    let r = sl(&env, &["verify"]);
    r.fails(32, "verify: 3 of 8 checks failed");
    let out = &r.stdout;
    assert!(out.contains(&format!("OK    layer {g} (root)\n")), "{out}");
    assert!(out.contains(&format!("OK    layer {e} (root)\n")), "{out}");
    assert!(out.contains(&format!("FAIL  layer {z} (root): no ext4 superblock magic at byte 1080\n")), "{out}");
    assert!(
        out.contains(&format!("FAIL  layer {t} (root): image is {} bytes, metadata says {}\n", size(&env, &t) / 2, size(&env, &t))),
        "{out}"
    );
    assert!(out.contains(&format!("FAIL  layer {i} (root): ")) && out.contains("is inconsistent"), "{out}");
    assert!(out.contains("OK    image good:2 (root)\n"), "{out}");
    assert!(out.contains("OK    image zeroed:1 (root)\n"), "{out}");
    assert!(out.ends_with("verify: 8 checked, 3 failed\n"), "{out}");

    // Only the chains asked for, top first.
    let r = sl(&env, &["verify", "good:2"]);
    r.ok();
    assert_eq!(
        r.stdout,
        format!("OK    layer {e} (root)\nOK    layer {g} (root)\nOK    image good:2 (root)\nverify: 3 checked, 0 failed\n")
    );
    sl(&env, &["verify", "zeroed:1"]).fails(32, "verify: 1 of 2 checks failed");
    sl(&env, &["verify", short(&t)]).fails(32, "verify: 1 of 1 checks failed");
    sl(&env, &["verify", "missing:1"]).fails(32, "verify: 1 of 1 checks failed");

    // A missing parent breaks the chain of what is built on it.
    std::fs::rename(root_layer_dir(&env, &g), env.dir.join("moved-away")).unwrap();
    let r = sl(&env, &["verify", "good:2"]);
    r.fails(32, "");
    assert!(r.stdout.contains(&format!("FAIL  layer {e} (root): parent {g} is missing from the store")), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("FAIL  image good:2 (root): chain of {e} is broken: layer {g} is missing")), "{}", r.stdout);
    env.assert_clean();
}

#[test]
fn verify_deep_runs_the_filesystem_checker() {
    let env = Env::new("verify-deep");
    let g = env.add(None, Some("good:1"), &file("good\n"));
    let x = env.add_with(None, Some("xfs:1"), &file("xfs\n"), &["--fstype", "xfs"]);
    sl(&env, &["verify", "--deep"]).ok();
    // A superblock field changed behind its checksum: the magic is intact,
    // so only the deep check sees it.
    let img = root_layer_dir(&env, &g).join("layer.img");
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[1040] ^= 0x5a;
    std::fs::write(&img, &bytes).unwrap();
    sl(&env, &["verify", "good:1"]).ok();
    let r = sl(&env, &["verify", "--deep"]);
    r.fails(32, "verify: 1 of 4 checks failed");
    assert!(r.stdout.contains(&format!("FAIL  layer {g} (root): e2fsck -fn {}: exit status: 8", img.display())), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("OK    layer {x} (root)")), "{}", r.stdout);
    env.assert_clean();
}

#[test]
fn fallback_copies_are_listed_and_removed() {
    let env = Env::new("fallback");
    // A read-only root (in the test's namespace): add falls back.
    std::fs::create_dir_all(&env.root).unwrap();
    let root = env.root.to_str().unwrap();
    env.sh(&format!("mount --bind {root} {root} && mount -o remount,bind,ro {root}")).ok();
    let a = env.add(None, Some("fb:1"), &file("in the fallback\n"));
    let b = env.add(Some(&a), Some("fb:2"), &file("on top\n"));
    assert!(env.fallback.join("layers").join(hex(&a)).is_dir());
    let j: Value = serde_json::from_str(&sl(&env, &["ls", "--json"]).ok().stdout).unwrap();
    assert!(j["images"].as_array().unwrap().iter().all(|i| i["store"] == "fallback"), "{j}");
    assert!(j["layers"].as_array().unwrap().iter().all(|l| l["store"] == "fallback"), "{j}");
    env.run(&["umount", root]).ok();

    // The same layer in both directories: two rows, both copies removed.
    let src = env.fallback.join("layers").join(hex(&b));
    std::fs::create_dir_all(env.root.join("layers")).unwrap();
    let st = Command::new("cp").arg("-a").arg(&src).arg(env.root.join("layers")).status().unwrap();
    assert!(st.success());
    let j: Value = serde_json::from_str(&sl(&env, &["ls", "--json"]).ok().stdout).unwrap();
    let stores: Vec<&str> =
        j["layers"].as_array().unwrap().iter().filter(|l| l["chain_id"] == b.as_str()).map(|l| l["store"].as_str().unwrap()).collect();
    assert_eq!(stores, vec!["root", "fallback"]);
    sl(&env, &["verify"]).ok();

    let r = sl(&env, &["rm", "fb:2"]);
    r.ok();
    assert!(r.stdout.contains("removed name fb:2 (fallback)"), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("removed layer {b} (root")), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("removed layer {b} (fallback")), "{}", r.stdout);
    assert!(!root_layer_dir(&env, &b).exists() && !src.exists());
    assert!(env.fallback.join("layers").join(hex(&a)).is_dir(), "fb:1 keeps its layer");
    env.assert_clean();
}

#[test]
fn gc_does_not_follow_symlinks_out_of_the_store() {
    let env = Env::new("gc-symlink");
    env.add(None, Some("app:1"), &file("app\n"));
    let victim = env.dir.join("victim");
    let dead = dead_pid();
    let uniq = sharedloop::store::unique_suffix();
    let host = sharedloop::store::hostname();
    let precious = victim.join("precious");
    let staged = victim.join(format!("layer-x.{host}.{dead}.{uniq}"));
    std::fs::create_dir_all(&precious).unwrap();
    std::fs::create_dir_all(&staged).unwrap();
    std::fs::write(staged.join("keep.txt"), "mine").unwrap();
    backdate(&precious, "3 days ago");
    // uppers/ is a symlink out; tmp/ has a staging-looking symlink out.
    std::os::unix::fs::symlink(&victim, env.root.join("uppers")).unwrap();
    std::fs::create_dir_all(env.root.join("tmp")).unwrap();
    let link = env.root.join("tmp").join(format!("layer-y.{host}.{dead}.{uniq}"));
    std::os::unix::fs::symlink(&staged, &link).unwrap();

    let r = sl(&env, &["gc"]);
    r.ok();
    assert!(!link.exists() && std::fs::symlink_metadata(&link).is_err(), "the link itself goes: {}", r.stdout);
    assert!(precious.is_dir() && staged.join("keep.txt").is_file(), "{}", r.stdout);
    assert!(r.stderr.contains("refusing symlink"), "{}", r.stderr);
    std::fs::remove_file(env.root.join("uppers")).unwrap();
    env.assert_clean();
}

#[test]
fn gc_and_rm_keep_what_a_running_import_claims() {
    // An import claims its whole chain first (tmp/claim.<host>.<pid>.<uniq>):
    // a layer it found already stored must not be collected before it names
    // its image.
    let env = Env::new("claims");
    let old = env.add(None, None, &file("reused by an import\n"));
    let tmp = env.root.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let host = sharedloop::store::hostname();
    let live = tmp.join(format!("claim.{host}.{}.{}", std::process::id(), sharedloop::store::unique_suffix()));
    std::fs::write(&live, format!("{old}\n")).unwrap();
    // A claim whose process is gone protects nothing and is itself removed.
    let dead = tmp.join(format!("claim.{host}.{}.{}", 4_000_000, sharedloop::store::unique_suffix()));
    std::fs::write(&dead, format!("{old}\n")).unwrap();
    let r = sl(&env, &["gc", "--min-age", "0s"]);
    r.ok();
    assert!(has_layer(&env, &old), "claimed by a live import: {}", r.stdout);
    assert!(live.exists());
    assert!(!dead.exists(), "stale claim removed: {}", r.stdout);
    // rm of the layer keeps it too while the claim lives.
    let r = sl(&env, &["rm", &old]);
    r.fails(32, &format!("cannot remove layer {old}: an import still at work uses it"));
    assert!(has_layer(&env, &old));
    std::fs::remove_file(&live).unwrap();
    sl(&env, &["gc", "--min-age", "0s"]).ok();
    assert!(!has_layer(&env, &old), "unclaimed and unreferenced: collected");
    env.assert_clean();
}

#[test]
fn add_says_what_it_did_not_do() {
    let env = Env::new("add-notes");
    // One tree, added twice (its mtimes are part of the diff ID).
    let src = env.dir.join("again");
    make_tree(&src, &file("same\n"));
    let s = src.to_str().unwrap();
    let r = sl(&env, &["add", s]);
    r.ok();
    let a = r.stdout.trim().to_string();
    // The same tree as erofs: the same chain ID, the ext4 layer stays, and
    // add says so.
    let r = sl(&env, &["add", s, "--fstype", "erofs"]);
    r.ok();
    assert_eq!(r.stdout.trim(), a);
    let root = env.root.display();
    assert!(
        r.stderr.contains(&format!("layer {a} is stored as ext4 in {root}; not stored again as erofs (`sharedloop rm` it first to change its format)")),
        "{}",
        r.stderr
    );
    assert_eq!(meta(&env, &a)["fstype"], "ext4");
    // Asked for ext4 again: nothing to say.
    let r = sl(&env, &["add", s]);
    r.ok();
    assert_eq!(r.stderr, "");
    // A name moved to another layer: done, and said.
    let r = sl(&env, &["add", s, "--name", "app:1"]);
    r.ok();
    assert_eq!(r.stderr, "", "a new name is no news");
    let r = sl(&env, &["add", s, "--name", "app:1"]);
    assert_eq!(r.stdout.trim(), a);
    assert_eq!(r.stderr, "", "the same target again is no news");
    std::fs::write(src.join("f.txt"), "other\n").unwrap();
    let r = sl(&env, &["add", s, "--name", "app:1"]);
    r.ok();
    let b = r.stdout.trim().to_string();
    assert_ne!(a, b);
    assert!(r.stderr.contains(&format!("name app:1: re-pointed from {a} to {b} in {root}")), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(env.root.join("names/app:1")).unwrap(), format!("{b}\n"));
    std::fs::remove_dir_all(&src).unwrap();
    env.assert_clean();
}
