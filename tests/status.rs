//! `sharedloop status` and `sharedloop mounts` against real mounts.

mod common;
use common::*;

#[test]
fn status_shows_driver_store_and_shared_layers() {
    let env = Env::new("status");
    let a = env.add(None, None, &[("a", E::File("a"))]);
    let b = env.add(Some(&a), Some("img:1"), &[("b", E::File("b"))]);
    let (m1, m2) = (env.mnt("one"), env.mnt("two"));
    for (m, up) in [(&m1, "upper=tmpfs"), (&m2, "upper=u1,upper_size=64M")] {
        env.run(&["mount", "-t", "sharedloop", "img:1", m.to_str().unwrap(), "-o", &format!("{},{up}", env.store_opts())]).ok();
    }
    let root = env.root.to_str().unwrap();
    let fb = env.fallback.to_str().unwrap();
    let store_args = ["--loopback-root", root, "--loopback-fallback", fb];

    let mut argv = vec![BIN, "status"];
    argv.extend(store_args);
    let text = env.run(&argv).ok().stdout.clone();
    // The name for the filesystem the store really is on (statfs magic).
    let magic = std::process::Command::new("stat").args(["-f", "-c", "%t", root]).output().unwrap().stdout;
    let magic = i64::from_str_radix(String::from_utf8_lossy(&magic).trim(), 16).unwrap();
    let fs = sharedloop::manage::status::fs_name(magic);
    assert!(!fs.starts_with("<unknown"), "{fs}");
    let head = format!("Storage Driver: sharedloop\n Backing Filesystem: {fs}\n");
    assert!(text.starts_with(&head), "{text}");
    assert!(text.contains(&format!(" Loopback Root Directory: {root}\n Loopback Fallback Directory: {fb}\n")), "{text}");
    assert!(text.contains(" Root: 2 layers"), "{text}");
    assert!(text.contains("1 names, 1 uppers"), "{text}");
    assert!(text.contains("Active Mounts: 2\n"), "{text}");
    assert!(text.contains(&format!(" {a}  /dev/loop")), "{text}");
    assert!(text.contains("shared by 2 mounts"), "{text}");
    // What the kernel can do, each found by trying it (issue 9: on the
    // emulated 4.18 and 5.14 too), and the way a mount takes.
    let want = expected_features();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(text.contains(&format!(" Kernel: {}\n{}", release.trim(), want.line())), "want {:?} in {text}", want.line());
    assert!(text.contains(&format!("  Mount Path: {}\n", want.mount_api)), "{text}");

    argv.push("--json");
    let v: serde_json::Value = serde_json::from_str(&env.run(&argv).ok().stdout).unwrap();
    assert_eq!(v["storage_driver"], "sharedloop");
    assert_eq!(v["loopback_root"], root);
    assert_eq!(v["kernel"]["release"], release.trim());
    want.assert_json(&v["kernel"]);
    assert_eq!(v["store"]["root"]["layers"], 2);
    // The fallback holds only the adds' node-local staging (tmp/, empty).
    assert_eq!(v["store"]["fallback"]["layers"], 0);
    let mounts = v["mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 2);
    assert_eq!(mounts[0]["target"], m1.to_str().unwrap());
    assert_eq!(mounts[0]["source"], "img:1");
    assert_eq!(mounts[0]["top"], b.as_str());
    assert_eq!(mounts[0]["layers"], 2);
    assert_eq!(mounts[0]["upper"], "tmpfs");
    assert!(mounts[1]["upper"].as_str().unwrap().contains("uppers/u1.img (/dev/loop"), "{}", mounts[1]["upper"]);
    // The layer loop devices reported are exactly the attached ones.
    let mut reported: Vec<String> = v["layers_in_use"].as_array().unwrap().iter().map(|l| l["loop_device"].as_str().unwrap().to_string()).collect();
    reported.sort();
    let mut attached: Vec<String> = env.my_loops().into_iter().filter(|(_, p)| p.contains("/layers/")).map(|(n, _)| format!("/dev/loop{n}")).collect();
    attached.sort();
    assert_eq!(reported, attached);
    assert!(v["layers_in_use"].as_array().unwrap().iter().all(|l| l["mounts"] == 2));

    // `mounts` lists the same two; after umount, none.
    let ms: serde_json::Value = serde_json::from_str(&env.run(&[BIN, "mounts", "--json"]).ok().stdout).unwrap();
    assert_eq!(ms.as_array().unwrap().len(), 2);
    let t = env.run(&[BIN, "mounts"]).ok().stdout.clone();
    assert!(t.contains(&format!(" {}\n  Source: img:1\n", m1.display())), "{t}");
    for m in [&m1, &m2] {
        env.run(&["umount", m.to_str().unwrap()]).ok();
    }
    // Nothing mounted: said, not left blank (findmnt cannot tell: these
    // mounts are of type overlay); JSON: an empty list.
    assert_eq!(env.run(&[BIN, "mounts"]).ok().stdout, "no sharedloop mounts\n");
    let ms: serde_json::Value = serde_json::from_str(&env.run(&[BIN, "mounts", "--json"]).ok().stdout).unwrap();
    assert_eq!(ms, serde_json::json!([]));

    // Sizes: what stat(2) says, allocated first (the images are sparse),
    // the same figures ls shows for these layers. Unmounted, so that
    // nothing writes to the upper meanwhile.
    let layers: Vec<(u64, u64)> = [&a, &b].iter().map(|id| stat_usage(&env.root.join("layers").join(hex(id)))).collect();
    let lsum = layers.iter().fold((0, 0), |t, u| (t.0 + u.0, t.1 + u.1));
    let upper = stat_usage(&env.root.join("uppers/u1.img"));
    assert!(upper.0 < upper.1, "{upper:?}");
    let v: serde_json::Value = serde_json::from_str(&env.run(&argv).ok().stdout).unwrap();
    let r = &v["store"]["root"];
    assert_eq!(
        *r,
        serde_json::json!({"layers": 2, "layer_allocated_bytes": lsum.0, "layer_apparent_bytes": lsum.1, "names": 1,
                           "uppers": 1, "upper_allocated_bytes": upper.0, "upper_apparent_bytes": upper.1,
                           "present": true})
    );
    argv.pop();
    let text = env.run(&argv).ok().stdout.clone();
    let h = sharedloop::manage::human_size;
    let want = format!(
        " Root: 2 layers ({}, apparent {}), 1 names, 1 uppers ({}, apparent {})\n",
        h(lsum.0),
        h(lsum.1),
        h(upper.0),
        h(upper.1)
    );
    assert!(text.contains(&want), "want {want:?} in {text}");
    let ls: serde_json::Value = serde_json::from_str(&env.sl(&["ls", "--json"]).ok().stdout).unwrap();
    let ls_sum = ls["layers"].as_array().unwrap().iter().map(|l| l["allocated_bytes"].as_u64().unwrap()).sum::<u64>();
    assert_eq!(ls_sum, lsum.0, "status and ls agree");
    env.assert_clean();
}

/// The demo shows its own store's loop devices only, not every image under
/// some /layers/ another user or store has attached.
#[test]
fn demo_lists_only_its_own_loop_devices() {
    let env = Env::new("demo");
    // Another user's store, its layer attached.
    let other = env.dir.join("other-user/layers").join("ab".repeat(32));
    std::fs::create_dir_all(&other).unwrap();
    let img = other.join("layer.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let o = std::process::Command::new("losetup").args(["--find", "--show", "--read-only"]).arg(&img).output().unwrap();
    assert!(o.status.success(), "losetup: {}", String::from_utf8_lossy(&o.stderr));
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let dev = Detach(String::from_utf8_lossy(&o.stdout).trim().to_string());

    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo.sh");
    let (root, fb) = (env.root.to_str().unwrap(), env.fallback.to_str().unwrap());
    let r = env.run_env(&["bash", demo], &[("SHAREDLOOP", BIN), ("SHAREDLOOP_ROOT", root), ("SHAREDLOOP_FALLBACK", fb)]);
    r.ok();
    let out = &r.stdout;
    let section: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("== loop devices of this store"))
        .skip(1)
        .take_while(|l| !l.starts_with("== "))
        .collect();
    let layers = format!(" {}/layers/", std::fs::canonicalize(&env.root).unwrap().display());
    // Three ext4 layers, three devices, all of this store.
    assert_eq!(section.len(), 3, "{out}");
    assert!(section.iter().all(|l| l.contains(&layers)), "{out}");
    assert!(!out.contains(img.to_str().unwrap()) && !out.contains(&format!("{} ", dev.0)), "{out}");
    assert!(out.contains("== done: nothing left mounted"), "{out}");
    assert!(out.contains("image sharedloop-sample:1 (root): top sha256:"), "{out}");
    drop(dev);
    env.assert_clean();
}
