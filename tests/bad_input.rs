//! Bad input of every kind: the exact exit code, a clear message naming
//! what is wrong, and nothing left behind.

mod common;
use common::*;

use std::path::Path;

/// bottom <- mid <- top (named "bad:top"); returns (bottom, mid, top).
fn chain3(env: &Env) -> (String, String, String) {
    let a = env.add(None, None, &[("a.txt", E::File("a\n"))]);
    let b = env.add(Some(&a), None, &[("b.txt", E::File("b\n"))]);
    let c = env.add(Some(&b), Some("bad:top"), &[("c.txt", E::File("c\n"))]);
    (a, b, c)
}

fn mount8(env: &Env, src: &str, target: &Path, extra: &str) -> Run {
    let o = if extra.is_empty() { env.store_opts() } else { format!("{},{extra}", env.store_opts()) };
    env.run(&["mount", "-t", "sharedloop", src, s(target), "-o", &o])
}

fn umount(env: &Env, target: &Path) {
    env.run(&["umount", s(target)]).ok();
}

// ---------------------------------------------------------------- options

#[test]
fn bad_options_exit_1() {
    let env = Env::new("badopts");
    let (_, _, top) = chain3(&env);
    let m = env.mnt("m");
    let cases: &[(&str, &str, &[&str])] = &[
        ("unknown option", "bogus", &["unknown option \"bogus\""]),
        ("unknown option with value", "bogus=1", &["unknown option \"bogus=1\""]),
        ("size with a bad unit", "upper_size=10X", &["upper_size=10X: not a size"]),
        ("zero size", "upper_size=0", &["upper_size=0: not a size"]),
        ("bad on/off", "metacopy=maybe", &["metacopy=maybe: want one of on, off"]),
        ("relative store", "loopback_root=relative", &["loopback_root=relative: must be an absolute path"]),
        ("dot-dot store", "loopback_root=/a/../b", &["loopback_root=/a/../b: '..' is not allowed"]),
        ("dot-dot fallback", "loopback_fallback=/a/../b", &["loopback_fallback=/a/../b: '..' is not allowed"]),
        ("empty store", "loopback_root=", &["loopback_root: needs a value"]),
        ("unbalanced quote", "loopback_root=\"/x,ro", &["unbalanced double quote"]),
        ("xino without value", "xino", &["xino: needs a value (on, off, auto)"]),
        ("flag with a value", "ro=1", &["ro: takes no value"]),
        ("override with a value", "override_kernel_check=yes", &["override_kernel_check: takes no value"]),
        ("bad fstype", "upper=u,upper_fstype=btrfs", &["upper_fstype=btrfs: want ext4 or xfs"]),
        ("bad mount_api", "mount_api=new", &["mount_api=new: want one of auto, fd, path, legacy"]),
        ("upper with dot-dot", "upper=../x", &["upper=: \"../x\": invalid name"]),
        ("upper path with dot-dot", "upper=/srv/../etc/x.img", &["'..' is not allowed"]),
        ("upper path is a directory", "upper=/srv/dir/", &["names a directory"]),
        ("volatile without upper", "volatile", &["volatile: needs a writable upper (upper=)"]),
        ("tmpfs with fstype", "upper=tmpfs,upper_fstype=xfs", &["upper_fstype: not used with upper=tmpfs"]),
        ("bad upper_alloc", "upper=u,upper_alloc=thin", &["upper_alloc=thin: want one of full, sparse"]),
        ("upper_alloc without value", "upper=u,upper_alloc", &["upper_alloc: needs a value"]),
        ("layers not hex", "layers=zzzzzzzzzzzzzzzz", &["layers=:", "a layer ID is sha256: and lowercase hex digits"]),
        ("layers prefix too short", "layers=abcdef", &["layers=:", "at least 12 hex digits"]),
        ("layers empty element", "layers=sha256:", &["layers=:"]),
    ];
    for (what, o, frags) in cases {
        let r = helper(&env, &top, &m, o);
        check_failed(&env, &r, 1, frags, &m, what);
    }
    // mount(8) passes the helper's code and message on.
    let r = mount8(&env, &top, &m, "bogus");
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("unknown option \"bogus\""), "{}", r.stderr);
    env.assert_clean();
}

#[test]
fn sloppy_ignores_unknown_options() {
    let env = Env::new("sloppy");
    let (_, _, top) = chain3(&env);
    let m = env.mnt("m");
    let o = format!("{},bogus,also=1", env.store_opts());
    let r = env.run(&["mount.sharedloop", &top, s(&m), "-s", "-o", &o]);
    r.ok();
    assert!(r.stderr.contains("warning: ignoring unknown option \"bogus\""), "{}", r.stderr);
    assert!(r.stderr.contains("warning: ignoring unknown option \"also=1\""), "{}", r.stderr);
    assert!(env.overlay_at(&m).is_some());
    umount(&env, &m);
    // Through mount(8) -s as well.
    let r = env.run(&["mount", "-s", "-t", "sharedloop", &top, s(&m), "-o", &o]);
    r.ok();
    assert!(r.stderr.contains("ignoring unknown option \"bogus\""), "{}", r.stderr);
    assert!(env.overlay_at(&m).is_some());
    umount(&env, &m);
    env.assert_clean();
}

// ---------------------------------------------------------------- SOURCE

#[test]
fn bad_sources() {
    let env = Env::new("badsrc");
    let (a, _, top) = chain3(&env);
    let m = env.mnt("m");
    let (r_, f_) = (env.root.display().to_string(), env.fallback.display().to_string());
    let unknown = format!("sha256:{}", "0".repeat(63) + "1");
    let short11 = &hex(&top)[..11];
    let not_found = format!("not found in {r_} nor {f_}");
    let cases: Vec<(&str, String, String, i32, Vec<String>)> = vec![
        ("unknown full ID", unknown.clone(), String::new(), 32, vec![format!("layer {unknown}: {not_found}")]),
        ("unknown bare full ID", hex(&unknown).to_string(), String::new(), 32, vec![format!("layer {unknown}: {not_found}")]),
        (
            "unknown prefix",
            "000000000000".into(),
            String::new(),
            32,
            vec![format!("layer sha256:000000000000: no layer with this ID prefix in {r_} nor {f_}")],
        ),
        (
            "11 hex digits are a name",
            short11.to_string(),
            String::new(),
            32,
            vec![format!("image {short11}: no such name in {r_} nor {f_}")],
        ),
        (
            "sha256: with 11 hex digits",
            format!("sha256:{short11}"),
            String::new(),
            1,
            vec!["an ID prefix needs at least 12 hex digits".into()],
        ),
        ("unknown name", "nosuch:1".into(), String::new(), 32, vec![format!("image nosuch:1: no such name in {r_} nor {f_}")]),
        ("dot-dot name", "../etc".into(), String::new(), 1, vec!["\"../etc\": invalid name: must start with a letter or digit".into()]),
        ("dot-dot inside a name", "a/../etc".into(), String::new(), 1, vec!["\"a/../etc\": invalid name".into()]),
        ("leading slash", "/etc/passwd".into(), String::new(), 1, vec!["\"/etc/passwd\": invalid name: must start with a letter or digit".into()]),
        ("space", "a b".into(), String::new(), 1, vec!["\"a b\": SOURCE must be at most 255 bytes without spaces or commas".into()]),
        ("comma", "a,b".into(), String::new(), 1, vec!["\"a,b\": SOURCE must be at most 255 bytes without spaces or commas".into()]),
        ("too long", "a".repeat(256), String::new(), 1, vec!["SOURCE must be at most 255 bytes".into()]),
        ("uppercase ID", top.to_uppercase().replace("SHA256:", "sha256:"), String::new(), 1, vec!["a layer ID is sha256: and lowercase hex digits".into()]),
        // layers=
        ("layers= unknown ID", "x".into(), format!("layers={unknown}"), 32, vec![format!("layer {unknown}: {not_found}")]),
        ("layers= duplicate", "x".into(), format!("layers={top}:{a}:{top}"), 1, vec![format!("layers=: layer {top} is named twice")]),
        (
            "layers= duplicate by prefix",
            "x".into(),
            format!("layers={}:{}", &hex(&a)[..12], hex(&a)),
            1,
            vec![format!("layers=: layer {a} is named twice")],
        ),
    ];
    for (what, src, extra, code, frags) in &cases {
        let r = helper(&env, src, &m, extra);
        let frags: Vec<&str> = frags.iter().map(|f| f.as_str()).collect();
        check_failed(&env, &r, *code, &frags, &m, what);
    }
    // The good forms all mount: full ID, bare ID, 12-digit prefix, name, layers=.
    for (src, extra) in [
        (top.clone(), String::new()),
        (hex(&top).to_string(), String::new()),
        (hex(&top)[..12].to_string(), String::new()),
        ("bad:top".to_string(), String::new()),
        ("anything".to_string(), format!("layers={}:{}", &hex(&top)[..12], a)),
    ] {
        helper(&env, &src, &m, &extra).ok();
        umount(&env, &m);
    }
    env.assert_clean();
}

/// Two layer directories whose names share a 12-digit prefix: the prefix
/// is refused as ambiguous before any metadata is read.
#[test]
fn ambiguous_prefix() {
    let env = Env::new("ambiguous");
    let (_, _, top) = chain3(&env);
    let m = env.mnt("m");
    let h = hex(&top);
    // Same first 13 digits, different 14th: a copy with metadata that does
    // not match its (crafted) name.
    let c14 = if &h[13..14] == "0" { '1' } else { '0' };
    let crafted = format!("{}{}{}", &h[..13], c14, &h[14..]);
    let out = env.sh(&format!("cp -a {} {}", layer_dir(&env.root, &top).display(), env.root.join("layers").join(&crafted).display()));
    out.ok();
    let p12 = &h[..12];
    let r = helper(&env, p12, &m, "");
    check_failed(&env, &r, 32, &[&format!("layer sha256:{p12}: ambiguous ID prefix, 2 layers match")], &m, "12-digit prefix");
    assert!(!r.stderr.contains("metadata"), "ambiguity must be found before metadata is read: {}", r.stderr);
    // Through layers= too.
    let r = helper(&env, "x", &m, &format!("layers={p12}"));
    check_failed(&env, &r, 32, &["ambiguous ID prefix, 2 layers match"], &m, "layers= prefix");
    // A longer prefix that tells them apart resolves; the real one mounts...
    helper(&env, &h[..14], &m, "").ok();
    umount(&env, &m);
    // ...and the crafted one is refused by its metadata.
    let r = helper(&env, &crafted[..14], &m, "");
    check_failed(&env, &r, 32, &[&format!("metadata names {top} but is stored as sha256:{crafted}")], &m, "crafted copy");
}

/// The ambiguity message lists `short()` (12 digits) of each match, which
/// for a prefix of 12 or more digits are all the same string.
#[test]
fn ambiguous_prefix_message_tells_matches_apart() {
    let env = Env::new("ambiguous-msg");
    let (_, _, top) = chain3(&env);
    let m = env.mnt("m");
    let h = hex(&top);
    let c14 = if &h[13..14] == "0" { '1' } else { '0' };
    let crafted = format!("{}{}{}", &h[..13], c14, &h[14..]);
    env.sh(&format!("cp -a {} {}", layer_dir(&env.root, &top).display(), env.root.join("layers").join(&crafted).display())).ok();
    let r = helper(&env, &h[..12], &m, "");
    assert_eq!(r.code, 32);
    // Each match must be shown at least up to where they differ.
    assert!(r.stderr.contains(&h[..14]) && r.stderr.contains(&crafted[..14]), "{}", r.stderr);
}

// ---------------------------------------------------------------- store content

fn edit(path: &Path, f: impl FnOnce(String) -> String) {
    let t = std::fs::read_to_string(path).unwrap();
    let n = f(t.clone());
    assert_ne!(t, n, "edit of {} changed nothing", path.display());
    std::fs::write(path, n).unwrap();
}

#[test]
fn missing_middle_layer() {
    let env = Env::new("broken");
    let (_, b, top) = chain3(&env);
    let m = env.mnt("m");
    let (r_, f_) = (env.root.display().to_string(), env.fallback.display().to_string());
    std::fs::remove_dir_all(layer_dir(&env.root, &b)).unwrap();
    let r = helper(&env, &top, &m, "");
    check_failed(&env, &r, 32, &[&format!("chain of {top} is broken: layer {b}: not found in {r_} nor {f_}")], &m, "missing middle");
    // By name and through mount(8) the same.
    let r = mount8(&env, "bad:top", &m, "");
    assert_eq!(r.code, 32, "{r:?}");
    assert!(r.stderr.contains(&format!("chain of {top} is broken")), "{}", r.stderr);
    env.assert_clean();
    // A missing image with its metadata present.
    let env = Env::new("broken-img");
    let (_, b, top) = chain3(&env);
    let m = env.mnt("m");
    let img = layer_dir(&env.root, &b).join("layer.img");
    std::fs::remove_file(&img).unwrap();
    let r = helper(&env, &top, &m, "");
    // Publishing is atomic, so this is damage: said as such, not "not found".
    let want = format!("chain of {top} is broken: layer {b}: {}: image missing beside its metadata", img.display());
    check_failed(&env, &r, 32, &[&want], &m, "missing image");
}

#[test]
fn corrupt_metadata() {
    let env = Env::new("badmeta");
    let (a, _, top) = chain3(&env);
    let m = env.mnt("m");
    let meta_top = layer_dir(&env.root, &top).join("meta.json");
    let meta_bottom = layer_dir(&env.root, &a).join("meta.json");
    for (what, text) in [("garbage", "{ this is not json"), ("empty", ""), ("wrong type", "[1,2,3]")] {
        std::fs::write(&meta_top, text).unwrap();
        let r = helper(&env, &top, &m, "");
        check_failed(&env, &r, 32, &[&format!("layer {top}"), &format!("{}: corrupt metadata", meta_top.display())], &m, what);
    }
    std::fs::write(&meta_bottom, "\0\0\0garbage").unwrap();
    let r = helper(&env, &a, &m, "");
    check_failed(&env, &r, 32, &[&format!("{}: corrupt metadata", meta_bottom.display())], &m, "garbage bottom meta");
}

/// Metadata that does not agree with itself or with where it is stored.
#[test]
fn inconsistent_metadata() {
    let env = Env::new("inconsistent");
    let (a, b, top) = chain3(&env);
    let m = env.mnt("m");
    // A parent that does not give the stored chain ID.
    let meta_b = layer_dir(&env.root, &b).join("meta.json");
    edit(&meta_b, |t| t.replace(&format!("\"parent\": \"{a}\""), &format!("\"parent\": \"{top}\"")));
    let r = helper(&env, &top, &m, "");
    check_failed(
        &env,
        &r,
        32,
        &[&format!("chain of {top} is broken"), &format!("metadata of {b} is inconsistent: parent {top}")],
        &m,
        "inconsistent middle",
    );
    // A root layer that claims a parent.
    let meta_a = layer_dir(&env.root, &a).join("meta.json");
    edit(&meta_a, |t| t.replace("\"parent\": null", &format!("\"parent\": \"{top}\"")));
    let r = helper(&env, &a, &m, "");
    check_failed(&env, &r, 32, &[&format!("metadata of {a} is inconsistent")], &m, "inconsistent bottom");
    // Metadata naming another layer than the directory it is in.
    let meta_top = layer_dir(&env.root, &top).join("meta.json");
    std::fs::write(&meta_top, std::fs::read_to_string(&meta_b).unwrap()).unwrap();
    let r = helper(&env, &top, &m, "");
    check_failed(&env, &r, 32, &[&format!("metadata names {b} but is stored as {top}")], &m, "misplaced meta");
}

/// A store error message names the layer once.
#[test]
fn metadata_error_names_the_layer_once() {
    let env = Env::new("meta-once");
    let (_, _, top) = chain3(&env);
    let m = env.mnt("m");
    std::fs::write(layer_dir(&env.root, &top).join("meta.json"), "garbage").unwrap();
    let r = helper(&env, &top, &m, "");
    assert_eq!(r.code, 32);
    assert_eq!(r.stderr.matches(&format!("layer {top}")).count(), 1, "{}", r.stderr);
}

// ---------------------------------------------------------------- symlinks

#[test]
fn symlinks_in_the_store_are_refused() {
    let env = Env::new("symlinks");
    let (_, mid, top) = chain3(&env);
    let m = env.mnt("m");
    let elsewhere = env.dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let refuse = "refusing symlink or path outside the store";
    let eloop = "Too many levels of symbolic links";

    // names/<name> is a symlink to a copy outside the store.
    let name_rec = env.root.join("names/bad:top");
    std::fs::copy(&name_rec, elsewhere.join("name")).unwrap();
    std::fs::remove_file(&name_rec).unwrap();
    std::os::unix::fs::symlink(elsewhere.join("name"), &name_rec).unwrap();
    let r = helper(&env, "bad:top", &m, "");
    check_failed(&env, &r, 32, &[refuse, &format!("{}: {eloop}", name_rec.display())], &m, "name symlink");

    // layers/<hex> (the middle one) is a symlink to a copy elsewhere.
    let d = layer_dir(&env.root, &mid);
    let copy = elsewhere.join(hex(&mid));
    env.sh(&format!("cp -a {} {} && rm -rf {}", d.display(), copy.display(), d.display())).ok();
    std::os::unix::fs::symlink(&copy, &d).unwrap();
    let r = helper(&env, &top, &m, "");
    check_failed(&env, &r, 32, &[&format!("layer {mid}"), refuse, &format!("{}/meta.json: {eloop}", d.display())], &m, "layer dir symlink");
    // The same layer asked for directly, and through layers=.
    let r = helper(&env, &mid, &m, "");
    check_failed(&env, &r, 32, &[refuse], &m, "layer dir symlink, direct");
    let r = helper(&env, "x", &m, &format!("layers={top}:{mid}"));
    check_failed(&env, &r, 32, &[refuse], &m, "layer dir symlink, layers=");
    // Put it back: it mounts.
    std::fs::remove_file(&d).unwrap();
    env.sh(&format!("mv {} {}", copy.display(), d.display())).ok();
    helper(&env, &top, &m, "").ok();
    umount(&env, &m);

    // layer.img alone is a symlink (to the real image, moved away).
    let img = d.join("layer.img");
    let moved = elsewhere.join("layer.img");
    std::fs::rename(&img, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &img).unwrap();
    let r = helper(&env, &top, &m, "");
    check_failed(&env, &r, 32, &[refuse, &format!("{}: {eloop}", img.display())], &m, "layer.img symlink");
    std::fs::remove_file(&img).unwrap();
    std::fs::rename(&moved, &img).unwrap();

    // The `layers` directory itself is a symlink.
    let layers = env.root.join("layers");
    let moved = elsewhere.join("layers");
    std::fs::rename(&layers, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &layers).unwrap();
    let r = helper(&env, &top, &m, "");
    check_failed(&env, &r, 32, &[refuse], &m, "layers dir symlink");
    std::fs::remove_file(&layers).unwrap();
    std::fs::rename(&moved, &layers).unwrap();

    // Uppers: a named upper whose image is a symlink, and upper=<path> to a symlink.
    helper(&env, &top, &m, &format!("upper={},upper_size=64M", env.dir.join("real.img").display())).ok();
    umount(&env, &m);
    std::fs::create_dir_all(env.root.join("uppers")).unwrap();
    let named = env.root.join("uppers/lnk.img");
    std::os::unix::fs::symlink(env.dir.join("real.img"), &named).unwrap();
    let r = helper(&env, &top, &m, "upper=lnk");
    check_failed(&env, &r, 32, &["upper lnk", refuse, &format!("{}: {eloop}", named.display())], &m, "named upper symlink");
    let link = env.dir.join("link.img");
    std::os::unix::fs::symlink(env.dir.join("real.img"), &link).unwrap();
    let r = helper(&env, &top, &m, &format!("upper={}", link.display()));
    check_failed(&env, &r, 32, &[&format!("upper image is a symlink, refusing: {}: {eloop}", link.display())], &m, "upper path symlink");
    // The real image was not touched (and not locked): it mounts.
    helper(&env, &top, &m, &format!("upper={}", env.dir.join("real.img").display())).ok();
    umount(&env, &m);
    env.assert_clean();
}

// ---------------------------------------------------------------- root and fallback

#[test]
fn layers_only_in_fallback_mount() {
    let env = Env::new("fallback-only");
    let (_, _, top) = chain3(&env);
    let m = env.mnt("m");
    // The whole root store moves to the fallback: root is missing. (The
    // fallback held only the adds' node-local staging, empty now.)
    assert_eq!(std::fs::read_dir(env.fallback.join("tmp")).unwrap().count(), 0);
    std::fs::remove_dir_all(&env.fallback).unwrap();
    std::fs::rename(&env.root, &env.fallback).unwrap();
    assert!(!env.root.exists());
    for src in [top.as_str(), "bad:top", &hex(&top)[..12]] {
        mount8(&env, src, &m, "").ok();
        let loops = env.my_loops();
        assert_eq!(loops.len(), 3);
        assert!(loops.iter().all(|(_, b)| b.starts_with(s(&env.fallback))), "{loops:?}");
        umount(&env, &m);
    }
    // Root exists but lacks layers/ and names/: the same.
    std::fs::create_dir_all(&env.root).unwrap();
    mount8(&env, "bad:top", &m, "upper=fb,upper_size=64M").ok();
    // A new upper goes to the root, which is writable.
    assert!(env.root.join("uppers/fb.img").is_file());
    umount(&env, &m);
    env.assert_clean();
}

#[test]
fn root_errors_other_than_the_rule_do_not_fall_back() {
    let env = Env::new("no-fallback");
    let (_, _, top) = chain3(&env);
    let m = env.mnt("m");
    // A full copy in the fallback, which would work if it were used.
    env.sh(&format!("cp -a {} {}", env.root.display(), env.fallback.display())).ok();
    // root/layers is a regular file: ENOTDIR, not a fallback errno.
    let layers = env.root.join("layers");
    env.sh(&format!("mv {0} {0}.away && echo x > {0}", layers.display())).ok();
    let want = format!("{}: Not a directory", layer_dir(&env.root, &top).join("meta.json").display());
    for (src, extra) in [(top.as_str(), ""), ("bad:top", "")] {
        let r = helper(&env, src, &m, extra);
        check_failed(&env, &r, 32, &[&format!("layer {top}"), &want], &m, src);
        assert!(!r.stderr.contains(s(&env.fallback)), "fallback must not be used: {}", r.stderr);
    }
    // A prefix lists layers/: the same errno, named on the root path.
    let r = helper(&env, &hex(&top)[..12], &m, "");
    check_failed(&env, &r, 32, &[&format!("{}: Not a directory", layers.display())], &m, "prefix");
    // Same for names/ as a file.
    env.sh(&format!("rm {0} && mv {0}.away {0}", layers.display())).ok();
    let names = env.root.join("names");
    env.sh(&format!("rm -rf {0} && echo x > {0}", names.display())).ok();
    let r = helper(&env, "bad:top", &m, "");
    // (Names are read through a listing of names/ first: the error names it.)
    check_failed(&env, &r, 32, &[&format!("{}: Not a directory", names.display())], &m, "names file");
    assert!(!r.stderr.contains(s(&env.fallback)), "{}", r.stderr);
}

// ---------------------------------------------------------------- target

#[test]
fn bad_targets() {
    let env = Env::new("badtarget");
    let (_, _, top) = chain3(&env);
    let missing = env.dir.join("mnt/missing");
    let file = env.dir.join("afile");
    std::fs::write(&file, "x").unwrap();
    let r = helper(&env, &top, &missing, "");
    check_failed(&env, &r, 32, &[&format!("mount point: {}: No such file or directory", missing.display())], &missing, "missing");
    let r = helper(&env, &top, &file, "");
    check_failed(&env, &r, 32, &[&format!("mount point: {}: Not a directory", file.display())], &file, "file");
    let r = env.run(&["mount.sharedloop", &top, "relative/dir", "-o", &env.store_opts()]);
    check_failed(&env, &r, 1, &["relative/dir: mount point must be an absolute path"], &missing, "relative");
    // An upper=<path> whose directory does not exist.
    let m = env.mnt("m");
    let up = env.dir.join("nodir/u.img");
    let r = helper(&env, &top, &m, &format!("upper={},upper_size=64M", up.display()));
    let want = format!("upper {}: directory for the upper image: {}: No such file or directory", up.display(), env.dir.join("nodir").display());
    check_failed(&env, &r, 32, &[&want], &m, "upper in missing dir");
}

// ---------------------------------------------------------------- upper in use

#[test]
fn second_rw_mount_of_an_upper() {
    let env = Env::new("inuse");
    let (_, _, top) = chain3(&env);
    let m1 = env.mnt("m1");
    let m2 = env.mnt("m2");
    mount8(&env, &top, &m1, "upper=shared,upper_size=64M").ok();
    let loops = env.my_loops();
    let mounts = env.my_mounts();
    let utab = env.utab();
    let img = env.root.join("uppers/shared.img");
    for api in ALL_MOUNT_APIS {
        let r = helper(&env, &top, &m2, &format!("upper=shared,mount_api={api}"));
        if !mount_api_supported(api) {
            // A way this kernel lacks: refused for that, before the upper.
            assert_api_refused(&env, &r, api, &m2, "second rw mount");
        } else {
            assert_eq!(r.code, 32, "{r:?}");
            let want = format!("upper image {}: already mounted read-write at {} (source {top})", img.display(), m1.display());
            assert!(r.stderr.contains(&want), "{api}: want {want:?} in {}", r.stderr);
        }
        assert!(env.overlay_at(&m2).is_none());
        assert_eq!(env.my_mounts(), mounts, "{api}: second attempt left a mount");
        assert_eq!(env.my_loops(), loops, "{api}: second attempt left a loop device");
        assert_eq!(env.utab(), utab);
        assert_eq!(records(&env).len(), 1);
    }
    // By path too, and through mount(8).
    let r = mount8(&env, &top, &m2, &format!("upper={}", img.display()));
    r.fails(32, &format!("already mounted read-write at {}", m1.display()));
    // A read-only mount of the same layers beside it is fine.
    mount8(&env, &top, &m2, "").ok();
    umount(&env, &m2);
    umount(&env, &m1);
    env.assert_clean();
    // Free again.
    mount8(&env, &top, &m2, "upper=shared").ok();
    umount(&env, &m2);
    env.assert_clean();
    // A lock held by someone else (not a mount of ours): refused, and said so.
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
    sharedloop::kernel::sys::ofd_try_write_lock(&f).unwrap();
    let r = helper(&env, &top, &m2, "upper=shared");
    check_failed(
        &env,
        &r,
        32,
        &[&format!("upper image {}: already mounted read-write by another process or node (it holds the lock)", img.display())],
        &m2,
        "foreign lock",
    );
    drop(f);
    mount8(&env, &top, &m2, "upper=shared").ok();
    umount(&env, &m2);
    env.assert_clean();
}

// ---------------------------------------------------------------- kernel

#[test]
fn old_kernel_refused_unless_overridden() {
    let env = Env::new("oldkernel");
    let (_, _, top) = chain3(&env);
    let m = env.mnt("m");
    let rel = env.dir.join("osrelease");
    std::fs::write(&rel, "3.10.0-1160.el7.x86_64\n").unwrap();
    env.sh(&format!("mount --bind {} /proc/sys/kernel/osrelease", rel.display())).ok();
    assert_eq!(env.sh("cat /proc/sys/kernel/osrelease").stdout.trim(), "3.10.0-1160.el7.x86_64");
    let r = helper(&env, &top, &m, "");
    check_failed(&env, &r, 32, &["kernel 3.10.0 is older than 4.0", "override_kernel_check"], &m, "old kernel");
    let r = mount8(&env, &top, &m, "");
    assert_eq!(r.code, 32, "{r:?}");
    assert!(r.stderr.contains("older than 4.0"), "{}", r.stderr);
    // Overridden: mounts with the old ways (mount(2), LOOP_SET_FD).
    for extra in ["override_kernel_check,mount_api=legacy", "override_kernel_check"] {
        mount8(&env, &top, &m, extra).ok();
        assert_eq!(read_in(&env, &m.join("a.txt")).as_deref(), Some("a\n"));
        assert_eq!(env.my_loops().len(), 3);
        umount(&env, &m);
        env.assert_clean();
    }
    // The override also works from the configuration file.
    let cfg = env.dir.join("sl.conf");
    std::fs::write(&cfg, "# backported\noverride_kernel_check\n").unwrap();
    let o = env.store_opts();
    let mut c = env.command(&["mount.sharedloop", &top, s(&m), "-o", &o]);
    c.env("SHAREDLOOP_CONFIG", &cfg);
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    umount(&env, &m);
    env.assert_clean();
}

// ---------------------------------------------------------------- helper argv

#[test]
fn helper_argv() {
    let env = Env::new("argv");
    let usage = "usage: mount.sharedloop SOURCE TARGET";
    let cases: &[(&[&str], i32, &str)] = &[
        (&["mount.sharedloop", "onlyone"], 1, usage),
        (&["mount.sharedloop"], 1, usage),
        (&["mount.sharedloop", "a", "b", "c"], 1, usage),
        (&["mount.sharedloop", "a", "b", "-q"], 1, "mount.sharedloop: invalid option -- 'q'"),
        (&["mount.sharedloop", "a", "b", "-o"], 1, "option -o requires an argument"),
        (&["mount.sharedloop", "", "/b"], 1, "empty SOURCE or TARGET"),
        (&["umount.sharedloop", "/not/mounted"], 32, "umount.sharedloop: /not/mounted: not mounted (No such file or directory)\n"),
        (&["umount.sharedloop"], 1, "usage: umount.sharedloop TARGET"),
        (&["umount.sharedloop", "/a", "/b"], 1, "usage: umount.sharedloop TARGET"),
        (&["umount.sharedloop", "/a", "-x"], 1, "invalid option -- 'x'"),
    ];
    for (argv, code, frag) in cases {
        let r = env.run(argv);
        assert_eq!(r.code, *code, "{argv:?}: {r:?}");
        assert!(r.stderr.contains(frag), "{argv:?}: stderr lacks {frag:?}: {}", r.stderr);
    }
    // umount.sharedloop of an existing directory that is not a mount point.
    let m = env.mnt("m");
    let r = env.run(&["umount.sharedloop", s(&m)]);
    r.fails(32, &format!("umount.sharedloop: {}: not mounted\n", m.display()));
    env.assert_clean();
}

// ---------------------------------------------------------------- upper paths

#[test]
fn bad_upper_images() {
    let env = Env::new("badupper");
    let (_, _, top) = chain3(&env);
    let m = env.mnt("m");
    let dir = env.dir.join("adir");
    std::fs::create_dir_all(&dir).unwrap();
    let small = env.dir.join("small.img");
    let cases: Vec<(String, Vec<String>)> = vec![
        (format!("upper={}", dir.display()), vec![format!("open upper image: {}: Is a directory", dir.display())]),
        ("upper=/dev/null".into(), vec!["upper image /dev/null: not a regular file".into()]),
        (
            format!("upper={},upper_size=1K", small.display()),
            vec!["create upper filesystem".into(), "mkfs.ext4".into()],
        ),
        ("upper=tiny,upper_size=1K".into(), vec!["upper tiny: create upper filesystem".into()]),
    ];
    for (extra, frags) in &cases {
        let r = helper(&env, &top, &m, extra);
        let frags: Vec<&str> = frags.iter().map(|f| f.as_str()).collect();
        check_failed(&env, &r, 32, &frags, &m, extra);
    }
    assert!(!small.exists(), "a failed creation leaves no image");
    assert!(!env.root.join("uppers/tiny.img").exists());
}

/// Options each valid alone that overlayfs refuses together: the kernel's
/// EINVAL at the overlay step, on the target, and everything undone.
#[test]
fn overlay_options_the_kernel_refuses() {
    let env = Env::new("kernel-refuses");
    let (_, _, top) = chain3(&env);
    let m = env.mnt("m");
    for o in ["metacopy=on,redirect_dir=nofollow", "nfs_export=on,metacopy=on"] {
        for upper in ["upper=tmpfs", "upper=kr,upper_size=64M"] {
            for api in ALL_MOUNT_APIS {
                let extra = format!("{upper},{o},mount_api={api}");
                let r = helper(&env, &top, &m, &extra);
                if !mount_api_supported(api) {
                    assert_api_refused(&env, &r, api, &m, &extra);
                    env.assert_clean();
                    continue;
                }
                let what = if api == "legacy" { "mount overlay" } else { "overlay: create superblock" };
                check_failed(&env, &r, 32, &[&format!("{what}: {}: Invalid argument", m.display())], &m, &extra);
            }
        }
    }
    // The lock of the named upper was released each time.
    helper(&env, &top, &m, "upper=kr").ok();
    umount(&env, &m);
    env.assert_clean();
}

#[test]
fn symlinked_store_directories_are_never_written_through() {
    // `names -> /etc` must not let `--name passwd` replace /etc/passwd.
    let env = Env::new("store-symlinks");
    let base = env.add(None, None, &[("a", E::File("a"))]);
    let outside = env.dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("passwd"), "precious\n").unwrap();
    let src = env.dir.join("src-x");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("x"), "x").unwrap();
    let add = |extra: &[&str]| {
        let mut a = vec![BIN, "add", src.to_str().unwrap(), "--loopback-root", env.root.to_str().unwrap(), "--loopback-fallback", env.fallback.to_str().unwrap(), "--parent", &base];
        a.extend_from_slice(extra);
        env.run(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>().iter().map(|s| s.as_str()).collect::<Vec<_>>())
    };
    for sub in ["names", "tmp", "layers"] {
        let real = env.root.join(sub);
        let moved = env.dir.join(format!("{sub}-real"));
        std::fs::create_dir_all(&real).unwrap();
        std::fs::rename(&real, &moved).unwrap();
        std::os::unix::fs::symlink(&outside, &real).unwrap();
        // New content each round, so that every add has to stage and publish.
        std::fs::write(src.join("x"), sub).unwrap();
        let r = add(&["--name", "passwd"]);
        assert_eq!(r.code, 32, "{sub}: {r:?}");
        assert!(r.stderr.contains("refusing symlink or path outside the store"), "{sub}: {}", r.stderr);
        assert!(r.stderr.contains(real.to_str().unwrap()), "{sub}: {}", r.stderr);
        assert_eq!(std::fs::read_to_string(outside.join("passwd")).unwrap(), "precious\n", "{sub}");
        let listed: Vec<_> = std::fs::read_dir(&outside).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(listed.len(), 1, "{sub}: nothing may be created outside: {listed:?}");
        std::fs::remove_file(&real).unwrap();
        std::fs::rename(&moved, &real).unwrap();
    }
    // Restored, the same add works and names the layer.
    let r = add(&["--name", "passwd"]);
    r.ok();
    assert_eq!(std::fs::read_to_string(env.root.join("names/passwd")).unwrap(), r.stdout);
    // The staging area is private to root.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(env.root.join("tmp")).unwrap().permissions().mode() & 0o777, 0o700);
    env.assert_clean();
}
