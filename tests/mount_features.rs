//! Features of mount.sharedloop through real mount(8)/umount(8).

mod common;
use common::*;
use std::path::Path;

fn chain(env: &Env, n: usize) -> (Vec<String>, String) {
    let mut ids = Vec::new();
    let mut parent: Option<String> = None;
    for i in 0..n {
        let f = format!("f{i}.txt");
        let c = format!("layer {i}\n");
        let id = env.add(parent.as_deref(), None, &[(f.as_str(), E::File(&c)), ("top.txt", E::File(&c))]);
        parent = Some(id.clone());
        ids.push(id);
    }
    let top = ids.last().unwrap().clone();
    (ids, top)
}

fn mount(env: &Env, src: &str, target: &Path, extra: &str) -> Run {
    let o = if extra.is_empty() { env.store_opts() } else { format!("{},{extra}", env.store_opts()) };
    env.run(&["mount", "-t", "sharedloop", src, target.to_str().unwrap(), "-o", &o])
}

fn umount(env: &Env, target: &Path) {
    env.run(&["umount", target.to_str().unwrap()]).ok();
}

/// The loop devices backing the image files of `ids`.
fn loops_for(env: &Env, ids: &[String]) -> Vec<u32> {
    let mut v: Vec<u32> = env
        .my_loops()
        .into_iter()
        .filter(|(_, b)| ids.iter().any(|id| b.contains(&id[7..])))
        .map(|(n, _)| n)
        .collect();
    v.sort();
    v
}

#[test]
fn writes_persist_in_named_and_path_uppers() {
    let env = Env::new("persist");
    let (_, top) = chain(&env, 2);
    let m = env.mnt("m");
    let abs = env.dir.join("abs-upper.img");
    for upper in ["upper=work1,upper_size=64M".to_string(), format!("upper={},upper_size=64M", abs.display())] {
        mount(&env, &top, &m, &upper).ok();
        let (_, sopts) = env.overlay_at(&m).unwrap();
        assert!(sopts.starts_with("rw,"), "{sopts}");
        env.sh(&format!("echo written > {0}/new.txt && rm {0}/f0.txt && mkdir {0}/d && echo x > {0}/d/x", m.display())).ok();
        umount(&env, &m);
        env.assert_clean();
        mount(&env, &top, &m, &upper).ok();
        assert_eq!(read_in(&env, &m.join("new.txt")).as_deref(), Some("written\n"));
        assert_eq!(read_in(&env, &m.join("f0.txt")), None, "deletion must persist");
        assert_eq!(read_in(&env, &m.join("d/x")).as_deref(), Some("x\n"));
        assert_eq!(read_in(&env, &m.join("top.txt")).as_deref(), Some("layer 1\n"));
        umount(&env, &m);
    }
    // The named upper lives in the root store, sparse, at the asked size.
    let img = env.root.join("uppers/work1.img");
    let md = std::fs::metadata(&img).unwrap();
    assert_eq!(md.len(), 64 << 20);
    assert!(std::os::unix::fs::MetadataExt::blocks(&md) * 512 < 64 << 20, "upper image should be sparse");
    assert!(abs.is_file());
    env.assert_clean();
}

#[test]
fn tmpfs_upper_is_thrown_away() {
    let env = Env::new("tmpfs");
    let (_, top) = chain(&env, 1);
    let m = env.mnt("m");
    mount(&env, &top, &m, "upper=tmpfs,upper_size=16M").ok();
    env.sh(&format!("echo gone > {}/scratch.txt", m.display())).ok();
    assert_eq!(read_in(&env, &m.join("scratch.txt")).as_deref(), Some("gone\n"));
    umount(&env, &m);
    mount(&env, &top, &m, "upper=tmpfs").ok();
    assert_eq!(read_in(&env, &m.join("scratch.txt")), None);
    umount(&env, &m);
    // No tmpfs left behind anywhere in the namespace.
    assert!(!env.mountinfo().iter().any(|l| l.contains("sharedloop-upper")));
    env.assert_clean();
}

#[test]
fn sixteen_parallel_mounts_share_twenty_loop_devices() {
    let env = Env::new("parallel");
    let (ids, top) = chain(&env, 20);
    let targets: Vec<_> = (0..16).map(|i| env.mnt(&format!("p{i}"))).collect();
    let mut children = Vec::new();
    for t in &targets {
        let o = format!("{},upper=tmpfs", env.store_opts());
        children.push(env.command(&["mount", "-t", "sharedloop", &top, t.to_str().unwrap(), "-o", &o]).output().unwrap());
    }
    // Those ran one after the other; now sixteen at once:
    for t in &targets {
        assert_eq!(env.overlay_at(t).unwrap().0, top);
    }
    for t in &targets {
        umount(&env, t);
    }
    env.assert_clean();
    let spawned: Vec<_> = targets
        .iter()
        .map(|t| {
            let o = format!("{},upper=tmpfs", env.store_opts());
            env.command(&["mount", "-t", "sharedloop", &top, t.to_str().unwrap(), "-o", &o]).spawn().unwrap()
        })
        .collect();
    for mut c in spawned {
        assert!(c.wait().unwrap().success());
    }
    for o in children {
        assert!(o.status.success());
    }
    for t in &targets {
        assert_eq!(env.overlay_at(t).unwrap().0, top);
        assert_eq!(read_in(&env, &t.join("top.txt")).as_deref(), Some("layer 19\n"));
        assert_eq!(read_in(&env, &t.join("f0.txt")).as_deref(), Some("layer 0\n"));
    }
    let loops = loops_for(&env, &ids);
    assert_eq!(loops.len(), 20, "one loop device per layer, shared by all 16 mounts: {:?}", env.my_loops());
    assert_eq!(env.my_loops().len(), 20);
    // Unmount half: every layer is still needed, nothing detaches.
    for t in &targets[..8] {
        umount(&env, t);
    }
    assert_eq!(loops_for(&env, &ids), loops);
    for t in &targets[8..] {
        umount(&env, t);
    }
    env.assert_clean();
}

#[test]
fn five_hundred_layers() {
    let env = Env::new("l500");
    let (ids, top) = chain(&env, 500);
    let m = env.mnt("m");
    for api in ["fd", "legacy"] {
        if !mount_api_supported(api) {
            let r = mount(&env, &top, &m, &format!("upper=tmpfs,mount_api={api}"));
            assert_api_refused(&env, &r, api, &m, "500 layers");
            env.assert_clean();
            continue;
        }
        mount(&env, &top, &m, &format!("upper=tmpfs,mount_api={api}")).ok();
        let (_, sopts) = env.overlay_at(&m).unwrap();
        let lowers = if api == "fd" { sopts.matches("lowerdir+=").count() } else { sopts.split("lowerdir=").nth(1).unwrap().split(',').next().unwrap().split(':').count() };
        assert_eq!(lowers, 500, "{api}: all 500 layers must be in the overlay");
        assert_eq!(read_in(&env, &m.join("top.txt")).as_deref(), Some("layer 499\n"));
        assert_eq!(read_in(&env, &m.join("f0.txt")).as_deref(), Some("layer 0\n"));
        assert_eq!(read_in(&env, &m.join("f250.txt")).as_deref(), Some("layer 250\n"));
        assert_eq!(list_in(&env, &m).len(), 501);
        assert_eq!(loops_for(&env, &ids).len(), 500);
        umount(&env, &m);
        env.assert_clean();
    }
}

#[test]
fn fstab_entry_and_name_source() {
    let env = Env::new("fstab");
    let (_, top) = chain(&env, 2);
    // Give the top a name the store records.
    let named = env.add(Some(&top), Some("library/demo:1.0"), &[("named.txt", E::File("n\n"))]);
    let m = env.mnt("m");
    let fstab = env.dir.join("fstab");
    std::fs::write(
        &fstab,
        format!("# test fstab\nlibrary/demo:1.0 {} sharedloop {},upper=tmpfs,nosuid,nodev,noatime,_netdev 0 0\n", m.display(), env.store_opts()),
    )
    .unwrap();
    env.run(&["mount", "-T", fstab.to_str().unwrap(), m.to_str().unwrap()]).ok();
    let (src, _) = env.overlay_at(&m).unwrap();
    assert_eq!(src, "library/demo:1.0");
    let line = env.mountinfo().into_iter().find(|l| l.split(' ').nth(4) == Some(m.to_str().unwrap())).unwrap();
    let vfs = line.split(' ').nth(5).unwrap();
    assert_eq!(vfs, "rw,nosuid,nodev,noatime");
    assert_eq!(read_in(&env, &m.join("named.txt")).as_deref(), Some("n\n"));
    let utab = env.utab();
    assert!(utab.contains("OPTS=helper=sharedloop,_netdev"), "{utab}");
    // umount(8) finds helper=sharedloop and the same source: our helper runs and cleans up.
    env.run(&["umount", m.to_str().unwrap()]).ok();
    assert_eq!(env.utab(), "");
    assert!(named.starts_with("sha256:"));
    env.assert_clean();
}

#[test]
fn options_reach_the_kernel() {
    let env = Env::new("opts");
    let (ids, top) = chain(&env, 2);
    let m = env.mnt("m");
    mount(&env, &top, &m, "upper=u,upper_size=64M,metacopy=on,redirect_dir=on,index=off,xino=on,noexec,nosuid,nodev").ok();
    let line = env.mountinfo().into_iter().find(|l| l.split(' ').nth(4) == Some(m.to_str().unwrap())).unwrap();
    assert_eq!(line.split(' ').nth(5).unwrap(), "rw,nosuid,nodev,noexec,relatime");
    let (_, sopts) = env.overlay_at(&m).unwrap();
    for want in ["metacopy=on", "redirect_dir=on", "xino=on"] {
        assert!(sopts.contains(want), "{want} not in {sopts}");
    }
    assert!(!sopts.contains("index=on"), "{sopts}");
    // direct I/O is on by default on every loop device...
    for (n, _) in env.my_loops() {
        assert_eq!(std::fs::read_to_string(format!("/sys/block/loop{n}/loop/dio")).unwrap().trim(), "1", "loop{n}");
        assert_eq!(std::fs::read_to_string(format!("/sys/block/loop{n}/loop/autoclear")).unwrap().trim(), "1", "loop{n}");
    }
    // ...and layer devices are read-only.
    for n in loops_for(&env, &ids) {
        assert_eq!(std::fs::read_to_string(format!("/sys/block/loop{n}/ro")).unwrap().trim(), "1");
    }
    umount(&env, &m);
    // ...also the pre-5.8 way (LOOP_SET_FD + SET_STATUS64, which ignores
    // the flag: LOOP_SET_DIRECT_IO turns it on), upper included...
    mount(&env, &top, &m, "upper=u,upper_size=64M,loop_api=setfd").ok();
    let loops = env.my_loops();
    assert_eq!(loops.len(), 3, "{loops:?}");
    for (n, _) in loops {
        assert_eq!(std::fs::read_to_string(format!("/sys/block/loop{n}/loop/dio")).unwrap().trim(), "1", "setfd loop{n}");
        assert_eq!(std::fs::read_to_string(format!("/sys/block/loop{n}/loop/autoclear")).unwrap().trim(), "1", "setfd loop{n}");
    }
    umount(&env, &m);
    // ...and off on request, with LOOP_SET_FD + SET_STATUS64 too.
    mount(&env, &top, &m, "direct_io=off,loop_api=setfd,ro").ok();
    for (n, _) in env.my_loops() {
        assert_eq!(std::fs::read_to_string(format!("/sys/block/loop{n}/loop/dio")).unwrap().trim(), "0");
        assert_eq!(std::fs::read_to_string(format!("/sys/block/loop{n}/loop/autoclear")).unwrap().trim(), "1");
    }
    umount(&env, &m);
    env.assert_clean();
}

#[test]
fn fake_and_no_utab_and_verbose() {
    let env = Env::new("flags");
    let (_, top) = chain(&env, 2);
    let m = env.mnt("m");
    let o = env.store_opts();
    let r = env.run(&["mount.sharedloop", &top, m.to_str().unwrap(), "-f", "-v", "-o", &o]);
    r.ok();
    assert!(r.stderr.contains("2 layers"), "{}", r.stderr);
    assert!(r.stderr.contains("-f: not mounting"), "{}", r.stderr);
    assert!(env.overlay_at(&m).is_none());
    assert!(env.my_loops().is_empty());
    env.run(&["mount.sharedloop", &top, m.to_str().unwrap(), "-n", "-o", &o]).ok();
    assert!(env.overlay_at(&m).is_some());
    assert_eq!(env.utab(), "");
    env.run(&["umount.sharedloop", m.to_str().unwrap(), "-n"]).ok();
    assert!(env.overlay_at(&m).is_none());
    env.assert_clean();
}

#[test]
fn explicit_layers_and_prefix_source() {
    let env = Env::new("explicit");
    let (ids, top) = chain(&env, 3);
    let m = env.mnt("m");
    // Top first, skipping the middle layer: exactly these two, in this order.
    let list = format!("{}:{}", ids[2], &ids[0][7..19]);
    mount(&env, "myimage", &m, &format!("layers={list}")).ok();
    assert_eq!(env.overlay_at(&m).unwrap().0, "myimage");
    assert_eq!(list_in(&env, &m), vec!["f0.txt", "f2.txt", "top.txt"]);
    umount(&env, &m);
    // A 12-digit prefix of the top names the whole chain.
    mount(&env, &top[7..19], &m, "").ok();
    assert_eq!(list_in(&env, &m), vec!["f0.txt", "f1.txt", "f2.txt", "top.txt"]);
    umount(&env, &m);
    env.assert_clean();
}

#[test]
fn root_and_fallback() {
    let env = Env::new("fallback");
    // Layers created while the root is read-only go to the fallback.
    std::fs::create_dir_all(&env.root).unwrap();
    env.sh(&format!("mount --bind {0} {0} && mount -o remount,bind,ro {0}", env.root.display())).ok();
    let a = env.add(None, None, &[("a.txt", E::File("a\n"))]);
    assert!(env.fallback.join("layers").join(&a[7..]).join("layer.img").is_file());
    assert!(!env.root.join("layers").exists());
    let m = env.mnt("m");
    mount(&env, &a, &m, "upper=u3,upper_size=64M").ok();
    assert_eq!(read_in(&env, &m.join("a.txt")).as_deref(), Some("a\n"));
    assert!(env.fallback.join("uppers/u3.img").is_file(), "upper created in the fallback when the root is read-only");
    umount(&env, &m);
    env.sh(&format!("umount {}", env.root.display())).ok();
    // A layer in the root on top of one only in the fallback: per layer.
    let b = env.add(Some(&a), None, &[("b.txt", E::File("b\n"))]);
    assert!(env.root.join("layers").join(&b[7..]).is_dir());
    mount(&env, &b, &m, "").ok();
    assert_eq!(list_in(&env, &m), vec!["a.txt", "b.txt"]);
    umount(&env, &m);
    // A missing root: everything from the fallback.
    let moved = env.dir.join("root-moved");
    std::fs::rename(&env.root, &moved).unwrap();
    mount(&env, &a, &m, "").ok();
    assert_eq!(list_in(&env, &m), vec!["a.txt"]);
    umount(&env, &m);
    env.assert_clean();
}

#[test]
fn config_file_defaults() {
    let mut env = Env::new("config");
    let (_, top) = chain(&env, 1);
    let cfg = env.dir.join("sharedloop.conf");
    std::fs::write(&cfg, format!("# defaults\nloopback_root={}\nloopback_fallback={}\nupper_size=32M\n", env.root.display(), env.fallback.display())).unwrap();
    env.envs.push(("SHAREDLOOP_CONFIG".into(), cfg.to_string_lossy().into()));
    let m = env.mnt("m");
    env.run(&["mount", "-t", "sharedloop", &top, m.to_str().unwrap(), "-o", "upper=c1"]).ok();
    assert_eq!(std::fs::metadata(env.root.join("uppers/c1.img")).unwrap().len(), 32 << 20);
    umount(&env, &m);
    // A config file with a mount-only option is refused, naming the file.
    std::fs::write(&cfg, "upper=x\n").unwrap();
    let r = env.run(&["mount.sharedloop", &top, m.to_str().unwrap()]);
    r.fails(1, "not allowed in the configuration file");
    assert!(r.stderr.contains(cfg.to_str().unwrap()));
    // A file SHAREDLOOP_CONFIG names must be there: a typo is not "no defaults".
    std::fs::remove_file(&cfg).unwrap();
    let r = env.run(&["mount.sharedloop", &top, m.to_str().unwrap()]);
    r.fails(32, &format!("mount.sharedloop: read configuration (SHAREDLOOP_CONFIG): {}: No such file or directory", cfg.display()));
    // Nor may a FIFO there hang the mount.
    assert!(std::process::Command::new("mkfifo").arg(&cfg).status().unwrap().success());
    let r = env.run(&["timeout", "-s", "KILL", "20", "mount.sharedloop", &top, m.to_str().unwrap()]);
    r.fails(1, &format!("read configuration (SHAREDLOOP_CONFIG): {}: not a regular file", cfg.display()));
    std::fs::remove_file(&cfg).unwrap();
    env.assert_clean();
}

#[test]
fn single_layer_read_only_every_api() {
    // overlayfs needs two lowers without an upper: an empty one is added.
    let env = Env::new("single");
    let (_, top) = chain(&env, 1);
    let m = env.mnt("m");
    for api in ALL_MOUNT_APIS {
        if !mount_api_supported(api) {
            let r = mount(&env, &top, &m, &format!("mount_api={api}"));
            assert_api_refused(&env, &r, api, &m, "single layer");
            env.assert_clean();
            continue;
        }
        mount(&env, &top, &m, &format!("mount_api={api}")).ok();
        assert_eq!(list_in(&env, &m), vec!["f0.txt", "top.txt"], "{api}");
        assert_eq!(env.my_mounts().len(), 1, "{api}: only the overlay shows: {:#?}", env.my_mounts());
        umount(&env, &m);
        env.assert_clean();
    }
}

#[test]
fn xfs_upper_and_namespace_flag() {
    let env = Env::new("xfsns");
    let (_, top) = chain(&env, 2);
    let m = env.mnt("m");
    // -N: the helper run from the host enters the test's namespace by pid.
    let helper = env.dir.join("helpers/mount.sharedloop");
    let o = format!("{},upper=x1,upper_size=512M,upper_fstype=xfs", env.store_opts());
    let out = std::process::Command::new(&helper)
        .args([top.as_str(), m.to_str().unwrap(), "-n", "-N", &env.pid.to_string(), "-o", &o])
        .env("SHAREDLOOP_STATE_DIR", &env.state)
        .env("SHAREDLOOP_CONFIG", "")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(env.overlay_at(&m).is_some(), "mounted in the test namespace");
    let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!host.contains(m.to_str().unwrap()), "not in the caller's namespace");
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut std::fs::File::open(env.root.join("uppers/x1.img")).unwrap(), &mut magic).unwrap();
    assert_eq!(&magic, b"XFSB");
    env.sh(&format!("echo x > {}/on-xfs", m.display())).ok();
    env.run(&["umount.sharedloop", m.to_str().unwrap(), "-n"]).ok();
    mount(&env, &top, &m, "upper=x1").ok();
    assert_eq!(read_in(&env, &m.join("on-xfs")).as_deref(), Some("x\n"));
    umount(&env, &m);
    env.assert_clean();
}

#[test]
fn umount_does_not_wait_for_layers_another_mount_holds() {
    // The second mount's record lives in another state directory, so the
    // first umount cannot know from records that the layers are still used.
    let env = Env::new("sharedwait");
    let (ids, top) = chain(&env, 3);
    let (m1, m2) = (env.mnt("m1"), env.mnt("m2"));
    mount(&env, &top, &m1, "").ok();
    let other = env.dir.join("other-state");
    let o = env.store_opts();
    env.run_env(&["mount.sharedloop", &top, m2.to_str().unwrap(), "-o", &o], &[("SHAREDLOOP_STATE_DIR", other.to_str().unwrap())]).ok();
    let loops = loops_for(&env, &ids);
    assert_eq!(loops.len(), 3, "the second mount reuses the first one's devices");
    let r = env.run(&["umount.sharedloop", m1.to_str().unwrap(), "-v"]);
    r.ok();
    assert!(!r.stderr.contains("still attached"), "{}", r.stderr);
    assert_eq!(loops_for(&env, &ids), loops, "still in use by the second mount");
    assert_eq!(read_in(&env, &m2.join("f0.txt")).as_deref(), Some("layer 0\n"));
    let r = env.run_env(&["umount.sharedloop", m2.to_str().unwrap(), "-v"], &[("SHAREDLOOP_STATE_DIR", other.to_str().unwrap())]);
    r.ok();
    assert!(!r.stderr.contains("still attached"), "{}", r.stderr);
    assert!(loops_for(&env, &ids).is_empty(), "the last umount waits for every device: {:?}", env.my_loops());
    env.assert_clean();
}

#[test]
fn a_record_naming_the_wrong_devices_is_only_a_hint() {
    // A mount finds the devices of a chain in use through this node's mount
    // records before it scans the loop devices. A record that names another
    // layer's device (edited, or written by a bug) must neither make the
    // mount use that device nor stop the layers from being shared.
    let env = Env::new("badhint");
    let (ids, top) = chain(&env, 3);
    let other = env.add(None, None, &[("other.txt", E::File("other\n"))]);
    let (m1, m2, m3) = (env.mnt("m1"), env.mnt("m2"), env.mnt("m3"));
    mount(&env, &top, &m1, "").ok();
    mount(&env, &other, &m2, "").ok();
    let chain_loops = loops_for(&env, &ids);
    let other_loop = loops_for(&env, std::slice::from_ref(&other));
    assert_eq!((chain_loops.len(), other_loop.len()), (3, 1));
    let records: Vec<std::path::PathBuf> = std::fs::read_dir(env.state.join("mounts")).unwrap().map(|e| e.unwrap().path()).collect();
    let mut edited = 0;
    for p in &records {
        let mut rec: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        if rec["target"].as_str() != m1.to_str() {
            continue;
        }
        for l in rec["chain"].as_array_mut().unwrap() {
            l["loop_dev"]["number"] = serde_json::json!(other_loop[0]);
            edited += 1;
        }
        std::fs::write(p, serde_json::to_vec(&rec).unwrap()).unwrap();
    }
    assert_eq!(edited, 3, "m1's record: {records:?}");
    mount(&env, &top, &m3, "").ok();
    assert_eq!(loops_for(&env, &ids), chain_loops, "m3 shares m1's devices, found by the scan");
    assert_eq!(loops_for(&env, std::slice::from_ref(&other)), other_loop);
    assert_eq!(read_in(&env, &m3.join("f0.txt")).as_deref(), Some("layer 0\n"));
    assert_eq!(read_in(&env, &m3.join("top.txt")).as_deref(), Some("layer 2\n"));
    assert_eq!(read_in(&env, &m3.join("other.txt")), None, "nothing of the layer the record named");
    for m in [&m1, &m3, &m2] {
        umount(&env, m);
    }
    env.assert_clean();
}

#[test]
fn attached_layers_carry_an_in_use_lock() {
    // What `rm`/`gc` on any node sharing the store look at: a layer image
    // is read-locked exactly while a loop device holds it.
    let env = Env::new("inuselock");
    let (ids, top) = chain(&env, 2);
    let m = env.mnt("m");
    let img = |id: &str| std::fs::File::open(env.root.join("layers").join(&id[7..]).join("layer.img")).unwrap();
    assert!(sharedloop::kernel::sys::ofd_write_lock_free(img(&ids[0])).unwrap());
    mount(&env, &top, &m, "").ok();
    for id in &ids {
        assert!(!sharedloop::kernel::sys::ofd_write_lock_free(img(id)).unwrap(), "{id} not marked in use");
    }
    umount(&env, &m);
    for id in &ids {
        assert!(sharedloop::kernel::sys::ofd_write_lock_free(img(id)).unwrap(), "{id} still marked after umount");
    }
    env.assert_clean();
}

#[test]
fn a_layer_retired_while_the_mount_waits_is_not_mounted() {
    use std::io::{BufRead, BufReader};
    let env = Env::new("retired");
    let (ids, top) = chain(&env, 2);
    let m = env.mnt("m");
    // Hold the node's attach lock, as `rm` does while it retires layers.
    std::fs::create_dir_all(&env.state).unwrap();
    let lock = std::fs::OpenOptions::new().create(true).write(true).open(env.state.join("attach.lock")).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let o = env.store_opts();
    let mut c = env.command(&["mount.sharedloop", &top, m.to_str().unwrap(), "-o", &o]);
    c.env("SHAREDLOOP_DEBUG", "1").stderr(std::process::Stdio::piped());
    let mut k = c.spawn().unwrap();
    let mut err = BufReader::new(k.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("chain resolved") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "mount ended early");
    }
    // The images are open; retire the bottom layer the way rm does.
    let dir = env.root.join("layers").join(&ids[0][7..]);
    std::fs::rename(&dir, env.root.join("tmp-retired")).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::Unlock).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert_eq!(k.wait().unwrap().code(), Some(32), "{rest}");
    assert!(rest.contains(&format!("layer {}: removed from the store while this mount was being set up", ids[0])), "{rest}");
    assert!(env.overlay_at(&m).is_none());
    std::fs::remove_dir_all(env.root.join("tmp-retired")).unwrap();
    env.assert_clean();
}

/// An erofs layer keeps what the tree has: a 255-byte name (NAME_MAX; the
/// mkfs.erofs of Debian 12 refused it) and nanosecond mtimes, read back
/// through a real mount.
#[test]
fn erofs_layers_keep_long_names_and_nanosecond_mtimes() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new("erofs-exact");
    let long = "n".repeat(255);
    let src = env.dir.join("tree");
    make_tree(&src, &[(&format!("d/{long}"), E::File("long\n")), ("d/ns", E::File("ns\n"))]);
    // 1700000000.123456789, set without following anything.
    let ts = [
        libc::timespec { tv_sec: 1_700_000_000, tv_nsec: 123_456_789 },
        libc::timespec { tv_sec: 1_700_000_000, tv_nsec: 123_456_789 },
    ];
    for p in [src.join("d/ns"), src.join("d")] {
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY (test): a valid path and two timespecs.
        assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) }, 0);
    }
    let r = env.run(&[BIN, "add", s(&src), "--fstype", "erofs", "--name", "ex:1", "--loopback-root", s(&env.root), "--loopback-fallback", s(&env.fallback)]);
    r.ok();
    let m = env.mnt("m");
    mount(&env, "ex:1", &m, "").ok();
    assert_eq!(read_in(&env, &m.join("d").join(&long)).as_deref(), Some("long\n"));
    for p in ["d/ns", "d"] {
        let md = std::fs::symlink_metadata(env.view(&m.join(p))).unwrap();
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_700_000_000, 123_456_789), "{p}");
    }
    umount(&env, &m);
    env.assert_clean();
}

/// ext4 layers keep nanosecond mtimes too (mke2fs -d alone keeps whole
/// seconds), on every kind of inode, under names debugfs could not parse
/// (spaces, quotes, a newline, non-UTF-8 bytes, 255 bytes), and on both
/// names of a hard-linked pair (one inode, so one mtime).
#[test]
fn ext4_layers_keep_nanosecond_mtimes_on_every_inode_type_and_name() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let env = Env::new("ext4-exact");
    let src = env.dir.join("tree");
    let long = "n".repeat(255);
    make_tree(&src, &[("d/sub/f", E::File("f\n")), (&format!("d/{long}"), E::File("long\n")), ("a b \"q\" 'x'", E::File("odd\n")), ("link", E::Symlink("d/sub/f"))]);
    let d = src.join("d");
    std::fs::write(d.join(OsStr::from_bytes(b"nl\nname \xff\xfe")), "raw\n").unwrap();
    std::fs::write(d.join("hard1"), "hard\n").unwrap();
    std::fs::hard_link(d.join("hard1"), d.join("hard2")).unwrap();
    let fifo = std::ffi::CString::new(s(&d.join("fifo"))).unwrap();
    // SAFETY (test): a valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    // Children before parents, so setting a child's time leaves its
    // directory's alone. Each a distinct time; one past 2038 (epoch bits).
    let paths: Vec<(std::path::PathBuf, i64, i64)> = [
        (d.join("sub/f"), 1_700_000_001, 1),
        (d.join("sub"), 1_700_000_002, 999_999_999),
        (d.join(&long), 1_700_000_003, 123_456_789),
        (d.join(OsStr::from_bytes(b"nl\nname \xff\xfe")), 1_700_000_004, 500_000_000),
        (d.join("hard1"), 1_700_000_005, 42),
        (d.join("fifo"), 1_700_000_006, 7_000),
        (src.join("a b \"q\" 'x'"), 1_700_000_007, 314_159_265),
        (src.join("link"), 2_200_000_000, 271_828_182),
        (d.clone(), 1_700_000_009, 111_111_111),
        (src.clone(), 1_700_000_010, 222_222_222),
    ]
    .into_iter()
    .collect();
    for (p, sec, nsec) in &paths {
        let ts = [libc::timespec { tv_sec: *sec, tv_nsec: *nsec }, libc::timespec { tv_sec: *sec, tv_nsec: *nsec }];
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY (test): a valid path and two timespecs.
        assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) }, 0);
    }
    let r = env.run(&[BIN, "add", s(&src), "--fstype", "ext4", "--name", "ex4:1", "--loopback-root", s(&env.root), "--loopback-fallback", s(&env.fallback)]);
    r.ok();
    let m = env.mnt("m");
    mount(&env, "ex4:1", &m, "").ok();
    let mut want: Vec<(std::path::PathBuf, i64, i64)> = paths.iter().map(|(p, sec, nsec)| (p.strip_prefix(&src).unwrap().to_path_buf(), *sec, *nsec)).collect();
    want.push(("d/hard2".into(), 1_700_000_005, 42));
    for (rel, sec, nsec) in &want {
        let md = std::fs::symlink_metadata(env.view(&m).join(rel)).unwrap();
        assert_eq!((md.mtime(), md.mtime_nsec()), (*sec, *nsec), "{}", rel.display());
    }
    let (h1, h2) = (std::fs::symlink_metadata(env.view(&m).join("d/hard1")).unwrap(), std::fs::symlink_metadata(env.view(&m).join("d/hard2")).unwrap());
    assert_eq!(h1.ino(), h2.ino(), "hard links stay one inode");
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&std::fs::symlink_metadata(env.view(&m).join("d/fifo")).unwrap().file_type()));
    umount(&env, &m);
    env.assert_clean();
}

/// Pages of `path` in the page cache (mincore over a read-only mapping).
fn resident_pages(path: &Path) -> usize {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let pages = len.div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY (test): a private read-only mapping of an open file, unmapped
    // before return; mincore writes one byte per page into `vec`.
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(p, libc::MAP_FAILED);
        assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
        libc::munmap(p, len);
    }
    vec.iter().filter(|&&b| b & 1 == 1).count()
}

/// Ten mounts of an erofs image share one superblock per layer (one loop
/// device each, so one page cache), and with direct I/O (the default) the
/// image files themselves stay out of the page cache: a file read through
/// all ten mounts is cached once. (A file-backed erofs mount would make a
/// superblock, and a page cache, per mount.)
#[test]
fn ten_erofs_mounts_share_one_superblock_per_layer() {
    let env = Env::new("erofs-share");
    let data: String = "0123456789abcdef".repeat(1 << 16); // 1 MiB
    let base = env.add_with(None, None, &[("big", E::File(&data))], &["--fstype", "erofs"]);
    let top = env.add_with(Some(&base), Some("share:1"), &[("top.txt", E::File("top\n"))], &["--fstype", "erofs"]);
    let images: Vec<std::path::PathBuf> = [&base, &top].iter().map(|id| {
            let p = layer_dir(&env.root, id).join("layer.img");
            if p.exists() { p } else { layer_dir(&env.fallback, id).join("layer.img") }
        })
        .collect();
    for img in &images {
        // What add's writes left in the cache goes first.
        let f = std::fs::File::open(img).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY (test): advice on an open fd.
        assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    }
    let ms: Vec<std::path::PathBuf> = (0..10).map(|i| env.mnt(&format!("m{i}"))).collect();
    for m in &ms {
        mount(&env, "share:1", m, "").ok();
        assert_eq!(read_in(&env, &m.join("big")).map(|s| s.len()), Some(data.len()));
    }
    let v: serde_json::Value = serde_json::from_str(&env.run(&[BIN, "mounts", "--json"]).ok().stdout).unwrap();
    let mounts = v.as_array().unwrap();
    assert_eq!(mounts.len(), 10);
    let devs: Vec<&serde_json::Value> = mounts.iter().map(|m| &m["loop_devices"]).collect();
    assert_eq!(devs[0].as_array().map(Vec::len), Some(2), "one loop device per layer: {devs:?}");
    assert!(devs.iter().all(|d| *d == devs[0]), "every mount on the same devices: {devs:?}");
    // One erofs superblock per device: /sys/fs/erofs lists each once.
    for d in devs[0].as_array().unwrap() {
        let name = d.as_str().unwrap().trim_start_matches("/dev/");
        assert!(Path::new("/sys/fs/erofs").join(name).is_dir(), "{name}: no erofs superblock");
    }
    for img in &images {
        assert_eq!(resident_pages(img), 0, "{}: cached beside the erofs page cache", img.display());
    }
    for m in &ms {
        umount(&env, m);
    }
    env.assert_clean();
}

/// The layer format when not told: erofs where this kernel has erofs
/// (status says which and why), `layer_fstype=` of the configuration file
/// over that, `--fstype` over both; `auto` and bad values.
#[test]
fn layer_format_default_follows_kernel_then_configuration() {
    let mut env = Env::new("layer-default");
    // status first: its probe loads the erofs module if there is one.
    let st: serde_json::Value = serde_json::from_str(&env.run(&[BIN, "status", "--json"]).ok().stdout).unwrap();
    let has_erofs = std::fs::read_to_string("/proc/filesystems").unwrap().lines().any(|l| l.ends_with("\terofs"));
    let want = if has_erofs { "erofs" } else { "ext4" };
    let why = if has_erofs { "erofs (this kernel has erofs)".to_string() } else { st["kernel"]["layer_fstype"].as_str().unwrap().to_string() };
    assert_eq!(st["kernel"]["layer_fstype"], why.as_str());
    assert_eq!(st["kernel"]["erofs"], has_erofs);
    let fstype_of = |env: &Env, id: &str| -> String {
        let p = layer_dir(&env.root, id).join("meta.json");
        let p = if p.exists() { p } else { layer_dir(&env.fallback, id).join("meta.json") };
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        v["fstype"].as_str().unwrap().to_string()
    };
    let a = env.add(None, None, &[("a", E::File("a\n"))]);
    assert_eq!(fstype_of(&env, &a), want);
    let b = env.add_with(None, None, &[("b", E::File("b\n"))], &["--fstype", "auto"]);
    assert_eq!(fstype_of(&env, &b), want);
    env.pin_layer_fstype("xfs");
    let t = env.run(&[BIN, "status"]).ok().stdout.clone();
    assert!(t.contains("Layer Format: xfs (layer_fstype in the configuration file)\n"), "{t}");
    let c = env.add(None, None, &[("c", E::File("c\n"))]);
    assert_eq!(fstype_of(&env, &c), "xfs");
    let d = env.add_with(None, None, &[("d", E::File("d\n"))], &["--fstype", "ext4"]);
    assert_eq!(fstype_of(&env, &d), "ext4");
    let cfg = env.dir.join("layer-fstype.conf");
    std::fs::write(&cfg, "layer_fstype=btrfs\n").unwrap();
    env.run(&[BIN, "status"]).fails(1, "layer_fstype=btrfs: want ext4, xfs, erofs or auto");
    // Not a mount option.
    let m = env.mnt("m");
    std::fs::write(&cfg, "layer_fstype=auto\n").unwrap();
    mount(&env, &a, &m, "layer_fstype=ext4").fails(1, "layer_fstype: not a mount option (configuration file only; sharedloop add and import take --fstype)");
    env.assert_clean();
}
