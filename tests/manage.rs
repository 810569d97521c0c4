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

/// What stat(2) says the layer directory occupies: (allocated, apparent).
fn usage(env: &Env, id: &str) -> (u64, u64) {
    stat_usage(&root_layer_dir(env, id))
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
    let mut env = Env::new("ls");
    env.pin_layer_fstype("ext4");
    let a = env.add(None, None, &file("base\n"));
    let b = env.add(Some(&a), Some("app:1"), &file("app\n"));
    let c = env.add_with(Some(&a), Some("tool:2"), &file("tool\n"), &["--fstype", "erofs"]);
    let u = env.add(None, None, &file("loose\n"));
    std::fs::create_dir(env.root.join("layers").join("junk")).unwrap();
    let m = env.mnt("m");
    mount(&env, "app:1", &m);

    // Human: two tables, sorted by name and by ID. Sizes are what stat(2)
    // says: allocated bytes first (the images are sparse: a layer of a few
    // bytes has an image of many MiB, few of them written), apparent beside.
    for id in [&a, &b, &u] {
        // ext4 (erofs images are as small as their content).
        let (alloc, apparent) = usage(&env, id);
        assert!(alloc < apparent && apparent > size(&env, id), "{id}: {alloc} {apparent}");
    }
    let r = sl(&env, &["ls"]);
    r.ok();
    let sum = |ids: &[&str]| ids.iter().map(|id| usage(&env, id)).fold((0, 0), |t, u| (t.0 + u.0, t.1 + u.1));
    let mut images = vec![strs(&["NAME", "TOP", "LAYERS", "SIZE", "APPARENT", "STORE"])];
    let (ab, cb) = (sum(&[&a, &b]), sum(&[&a, &c]));
    images.push(vec!["app:1".into(), short(&b).into(), "2".into(), human(ab.0), human(ab.1), "root".into()]);
    images.push(vec!["tool:2".into(), short(&c).into(), "2".into(), human(cb.0), human(cb.1), "root".into()]);
    let row = |id: &str, parent: &str, fstype: &str, mounts: &str, names: &str| {
        let diff = meta(&env, id)["diff_id"].as_str().unwrap().to_string();
        vec![
            short(id).to_string(),
            short(&diff).to_string(),
            if parent.is_empty() { "-".to_string() } else { short(parent).to_string() },
            fstype.to_string(),
            human(usage(&env, id).0),
            human(usage(&env, id).1),
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
    let mut layers =
        vec![strs(&["CHAIN ID", "DIFF ID", "PARENT", "FSTYPE", "SIZE", "APPARENT", "STORE", "MOUNTS", "ELSEWHERE", "NAMES"])];
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
        assert_eq!(
            keys(i),
            BTreeSet::from(["name", "store", "top", "layers", "size", "allocated_bytes", "apparent_bytes", "error"])
        );
    }
    assert_eq!(
        imgs[0],
        serde_json::json!({"name": "app:1", "store": "root", "top": b, "layers": 2,
                           "size": size(&env, &a) + size(&env, &b),
                           "allocated_bytes": ab.0, "apparent_bytes": ab.1, "error": null})
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
                "chain_id", "diff_id", "parent", "fstype", "size", "created", "store", "allocated_bytes", "apparent_bytes",
                "names", "mounts", "loop_devices", "held_elsewhere"
            ])
        );
        let id = l["chain_id"].as_str().unwrap();
        assert_eq!((l["allocated_bytes"].as_u64().unwrap(), l["apparent_bytes"].as_u64().unwrap()), usage(&env, id), "{id}");
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
fn ls_image_shows_its_layers_bottom_to_top() {
    let mut env = Env::new("ls-image");
    env.pin_layer_fstype("ext4");
    let a = env.add(None, None, &file("base\n"));
    let b = env.add_with(Some(&a), Some("app:1"), &file("middle\n"), &["--fstype", "erofs"]);
    let c = env.add(Some(&b), Some("app:2"), &file("top\n"));
    let other = env.add(None, Some("other:1"), &file("other\n"));
    // A second copy of the base layer in the fallback.
    std::fs::create_dir_all(env.fallback.join("layers")).unwrap();
    let st = Command::new("cp").arg("-a").arg(root_layer_dir(&env, &a)).arg(env.fallback.join("layers")).status().unwrap();
    assert!(st.success());
    let m = env.mnt("m");
    mount(&env, "app:2", &m);

    let total = [&a, &b, &c].iter().map(|id| usage(&env, id)).fold((0, 0), |t, u| (t.0 + u.0, t.1 + u.1));
    let row = |n: &str, id: &str, fstype: &str, store: &str, users: &str| {
        let u = usage(&env, id);
        strs(&[n, id, fstype, &human(u.0), &human(u.1), store, users])
    };
    let used = m.to_str().unwrap();
    let table = render(&[
        strs(&["#", "CHAIN ID", "FSTYPE", "SIZE", "APPARENT", "STORE", "USED BY"]),
        row("1", &a, "ext4", "root,fallback", used),
        row("2", &b, "erofs", "root", used),
        row("3", &c, "ext4", "root", used),
    ]);
    let r = sl(&env, &["ls", "app:2"]);
    r.ok();
    assert_eq!(
        r.stdout,
        format!("image app:2 (root): top {c}, 3 layers, {} allocated, {} apparent\n{table}", human(total.0), human(total.1))
    );

    // JSON: the same, with every field; loop devices are those attached.
    let r = sl(&env, &["ls", "app:2", "--json"]);
    r.ok();
    let mut j: Value = serde_json::from_str(&r.stdout).unwrap();
    let mine: BTreeSet<u64> = env.my_loops().into_iter().map(|(n, _)| n as u64).collect();
    for l in j["layers"].as_array_mut().unwrap() {
        let loops = l.as_object_mut().unwrap().remove("loop_devices").unwrap();
        let loops: Vec<u64> = loops.as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect();
        let erofs = l["fstype"] == "erofs";
        // An erofs layer may be mounted straight from its file.
        assert!(loops.iter().all(|n| mine.contains(n)) && (erofs || loops.len() == 1), "{l}: {loops:?} of {mine:?}");
    }
    let layer = |id: &str, parent: Option<&str>, fstype: &str, stores: &[&str], mounted: bool| {
        let u = usage(&env, id);
        let mounts = if mounted { serde_json::json!([{"target": used, "source": "app:2"}]) } else { serde_json::json!([]) };
        serde_json::json!({"chain_id": id, "diff_id": meta(&env, id)["diff_id"], "parent": parent, "fstype": fstype,
                           "stores": stores, "allocated_bytes": u.0, "apparent_bytes": u.1, "mounts": mounts,
                           "held_elsewhere": false})
    };
    assert_eq!(
        j,
        serde_json::json!({"image": "app:2", "store": "root", "top": c, "allocated_bytes": total.0,
                           "apparent_bytes": total.1,
                           "layers": [layer(&a, None, "ext4", &["root", "fallback"], true),
                                      layer(&b, Some(&a), "erofs", &["root"], true),
                                      layer(&c, Some(&b), "ext4", &["root"], true)],
                           "error": null})
    );
    umount(&env, &m);

    // By ID prefix: the chain below that layer, no name.
    let r = sl(&env, &["ls", "--json", short(&b)]);
    r.ok();
    let j: Value = serde_json::from_str(&r.stdout).unwrap();
    let (ua, ub) = (usage(&env, &a), usage(&env, &b));
    assert_eq!(j["image"], Value::Null);
    assert_eq!(j["store"], Value::Null);
    assert_eq!(j["top"], b.as_str());
    assert_eq!((j["allocated_bytes"].as_u64().unwrap(), j["apparent_bytes"].as_u64().unwrap()), (ua.0 + ub.0, ua.1 + ub.1));
    let mut unmounted = vec![layer(&a, None, "ext4", &["root", "fallback"], false), layer(&b, Some(&a), "erofs", &["root"], false)];
    for l in &mut unmounted {
        l["loop_devices"] = serde_json::json!([]);
    }
    assert_eq!(j["layers"], Value::Array(unmounted));
    let r = sl(&env, &["ls", &b]);
    r.ok();
    let table = render(&[
        strs(&["#", "CHAIN ID", "FSTYPE", "SIZE", "APPARENT", "STORE", "USED BY"]),
        row("1", &a, "ext4", "root,fallback", "-"),
        row("2", &b, "erofs", "root", "-"),
    ]);
    assert_eq!(
        r.stdout,
        format!("layer {b}: top {b}, 2 layers, {} allocated, {} apparent\n{table}", human(ua.0 + ub.0), human(ua.1 + ub.1))
    );
    let j: Value = serde_json::from_str(&sl(&env, &["ls", "--json", "other:1"]).ok().stdout).unwrap();
    assert_eq!(j["layers"].as_array().unwrap().len(), 1);
    assert_eq!(j["layers"][0]["chain_id"], other.as_str());

    // Bad input: an unknown name or ID is a store error, a malformed one a
    // usage error.
    sl(&env, &["ls", "nosuch:1"]).fails(32, &format!("image nosuch:1: no such name in {}", env.root.display()));
    sl(&env, &["ls", "deadbeefdead"]).fails(32, "layer sha256:deadbeefdead: no layer with this ID prefix in");
    sl(&env, &["ls", "Bad Name!"]).fails(1, "invalid name");
    sl(&env, &["ls", "app:1", "app:2"]).fails(1, "");
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

    // Dry run: says, does nothing. The sizes are those ls shows and
    // stat(2) says of the layer directories: allocated, then apparent.
    let (ud, ub) = (usage(&env, &d), usage(&env, &b));
    let line = |verb: &str, id: &str, u: (u64, u64)| format!("{verb} layer {id} (root, {}, apparent {})\n", human(u.0), human(u.1));
    let total = (ud.0 + ub.0, ud.1 + ub.1);
    let r = sl(&env, &["rm", "--dry-run", &d]);
    r.ok();
    let freed = |verb: &str| format!("{verb} {} bytes ({}, apparent {})\n", total.0, human(total.0), human(total.1));
    assert_eq!(r.stdout, format!("{}{}{}", line("would remove", &d, ud), line("would remove", &b, ub), freed("would free")));
    assert_eq!(layers_in_store(&env).len(), 4);
    let j: Value = serde_json::from_str(&sl(&env, &["rm", "--dry-run", "--json", &d]).ok().stdout).unwrap();
    let layer_json = |id: &str, u: (u64, u64)| serde_json::json!({"chain_id": id, "store": "root", "allocated_bytes": u.0, "apparent_bytes": u.1});
    assert_eq!(
        j,
        serde_json::json!({"dry_run": true, "names": [], "layers": [layer_json(&d, ud), layer_json(&b, ub)],
                           "allocated_bytes": total.0, "apparent_bytes": total.1})
    );
    assert_eq!(layers_in_store(&env).len(), 4);
    let ls: Value = serde_json::from_str(&sl(&env, &["ls", "--json"]).ok().stdout).unwrap();
    let in_ls = |id: &str| {
        let l = ls["layers"].as_array().unwrap().iter().find(|l| l["chain_id"] == id).unwrap();
        (l["allocated_bytes"].as_u64().unwrap(), l["apparent_bytes"].as_u64().unwrap())
    };
    assert_eq!((in_ls(&d), in_ls(&b)), (ud, ub), "ls and rm agree");

    // d by ID takes b with it (children first); a is tool:2's.
    let r = sl(&env, &["rm", &d]);
    r.ok();
    assert_eq!(r.stdout, format!("{}{}{}", line("removed", &d, ud), line("removed", &b, ub), freed("freed")));
    assert_eq!(layers_in_store(&env), BTreeSet::from([a.clone(), c.clone()]));

    // The last name takes the rest.
    let (uc, ua) = (usage(&env, &c), usage(&env, &a));
    let r = sl(&env, &["rm", "--json", "tool:2"]);
    r.ok();
    let j: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        j,
        serde_json::json!({"dry_run": false, "names": [{"name": "tool:2", "store": "root"}],
                           "layers": [layer_json(&c, uc), layer_json(&a, ua)],
                           "allocated_bytes": uc.0 + ua.0, "apparent_bytes": uc.1 + ua.1})
    );
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
    let j: Value = serde_json::from_str(&sl(&env, &["rm", "--name-only", "--dry-run", "--json", "x:latest"]).ok().stdout).unwrap();
    assert_eq!(
        j,
        serde_json::json!({"dry_run": true, "names": [{"name": "x:latest", "store": "root"}], "layers": [],
                           "allocated_bytes": 0, "apparent_bytes": 0})
    );
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

    // Sizes: what stat(2) says of the layer directory, as ls and rm say.
    let uo = usage(&env, &old);
    let r = sl(&env, &["gc", "--dry-run"]);
    r.ok();
    assert_eq!(
        r.stdout,
        format!(
            "would remove layer {old} (root, {}, apparent {}): not referenced\ngc: would remove 1 items, free {} bytes ({}, apparent {})\n",
            human(uo.0),
            human(uo.1),
            uo.0,
            human(uo.0),
            human(uo.1)
        )
    );
    assert_eq!(layers_in_store(&env).len(), 5);

    // Default grace (1h): only the old one.
    let r = sl(&env, &["gc", "--json"]);
    r.ok();
    let j: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        j,
        serde_json::json!({"dry_run": false,
                           "layers": [{"chain_id": old, "store": "root", "allocated_bytes": uo.0, "apparent_bytes": uo.1}],
                           "temporaries": [], "removed": 1, "allocated_bytes": uo.0, "apparent_bytes": uo.1})
    );
    assert_eq!(layers_in_store(&env), BTreeSet::from([a.clone(), b.clone(), u1.clone(), u2.clone()]));

    // No grace: the unnamed chain goes (top first), the named image stays.
    let r = sl(&env, &["gc", "--min-age", "0s"]);
    r.ok();
    let i2 = r.stdout.find(&format!("removed layer {u2}")).expect(&r.stdout);
    let i1 = r.stdout.find(&format!("removed layer {u1}")).expect(&r.stdout);
    assert!(i2 < i1, "children first: {}", r.stdout);
    assert_eq!(layers_in_store(&env), BTreeSet::from([a.clone(), b.clone()]));
    assert_eq!(sl(&env, &["gc", "--min-age", "0"]).ok().stdout, "gc: nothing to remove\n");
    let j: Value = serde_json::from_str(&sl(&env, &["gc", "--json", "--min-age", "0"]).ok().stdout).unwrap();
    assert_eq!(
        j,
        serde_json::json!({"dry_run": false, "layers": [], "temporaries": [], "removed": 0, "allocated_bytes": 0, "apparent_bytes": 0})
    );
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
    // JSON: each temporary with what stat(2) says it occupies.
    let j: Value = serde_json::from_str(&sl(&env, &["gc", "--dry-run", "--json"]).ok().stdout).unwrap();
    assert_eq!(j["dry_run"], true);
    assert_eq!(j["layers"], serde_json::json!([]));
    let temps = j["temporaries"].as_array().unwrap();
    let mut listed: Vec<&str> = temps.iter().map(|t| t["path"].as_str().unwrap()).collect();
    listed.sort();
    let mut want: Vec<&str> = gone.iter().map(|p| p.to_str().unwrap()).collect();
    want.sort();
    assert_eq!(listed, want);
    let mut total = (0, 0);
    for t in temps {
        assert_eq!(keys(t), BTreeSet::from(["path", "store", "allocated_bytes", "apparent_bytes", "reason"]));
        let p = Path::new(t["path"].as_str().unwrap());
        let u = stat_usage(p);
        assert_eq!((t["allocated_bytes"].as_u64().unwrap(), t["apparent_bytes"].as_u64().unwrap()), u, "{}", p.display());
        let store = if p.starts_with(&env.fallback) { "fallback" } else { "root" };
        assert_eq!(t["store"], store);
        assert!(!t["reason"].as_str().unwrap().is_empty());
        total = (total.0 + u.0, total.1 + u.1);
    }
    assert_eq!((j["removed"].as_u64().unwrap(), j["allocated_bytes"].as_u64().unwrap(), j["apparent_bytes"].as_u64().unwrap()), (gone.len() as u64, total.0, total.1));
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
    let mut env = Env::new("verify");
    env.pin_layer_fstype("ext4");
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
    let j: Value = serde_json::from_str(&sl(&env, &["verify", "--json", "good:2"]).ok().stdout).unwrap();
    let check = |kind: &str, subject: &str, ok: bool, errors: Vec<String>| {
        serde_json::json!({"kind": kind, "subject": subject, "store": "root", "ok": ok, "errors": errors, "notes": []})
    };
    assert_eq!(
        j,
        serde_json::json!({"checks": [check("layer", &e, true, vec![]), check("layer", &g, true, vec![]),
                                      check("image", "good:2", true, vec![])],
                           "checked": 3, "failed": 0})
    );
    // A failure: the document still comes, and the exit code says it.
    let r = sl(&env, &["verify", "--json", "zeroed:1"]);
    r.fails(32, "verify: 1 of 2 checks failed");
    let j: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        j,
        serde_json::json!({"checks": [check("layer", &z, false, vec!["no ext4 superblock magic at byte 1080".into()]),
                                      check("image", "zeroed:1", true, vec![])],
                           "checked": 2, "failed": 1})
    );
    let r = sl(&env, &["verify", "--json", "missing:1"]);
    r.fails(32, "verify: 1 of 1 checks failed");
    let j: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        j["checks"],
        serde_json::json!([{"kind": "image", "subject": "missing:1", "store": null, "ok": false,
                            "errors": ["no such name in the store"], "notes": []}])
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
    let mut env = Env::new("verify-deep");
    env.pin_layer_fstype("ext4");
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
    let mut env = Env::new("add-notes");
    env.pin_layer_fstype("ext4");
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
