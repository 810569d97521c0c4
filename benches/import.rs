//! Import throughput: `sharedloop import` against the pipeline it replaces,
//! on the same OCI images built here with umoci:
//!
//! - baseline: for each layer, `tar -x` of its blob into a directory, then
//!   `mkfs.ext4 -d` of that directory into an image (what one would script);
//! - reference: `umoci unpack` of the whole image (the merged rootfs only,
//!   no per-layer images), to show what unpacking alone costs.
//!
//! Images: "large" (3 layers: a 64 MiB file, 5,000 small files, a 16 MiB
//! file plus changes) and 12 "small" ones (one layer of 40 small files
//! each), for images per minute. Every round imports into a fresh store.
//! Also prints the store's overhead: image bytes (apparent and allocated)
//! against the layers' content.
//!
//! Then the same for erofs: `sharedloop import --fstype erofs` (the image
//! written straight from the tar stream, no unpacked tree) against
//! `tar -x` + `mkfs.erofs` (uncompressed) per layer, and `erofs-lz4`:
//! `--fstype erofs --compress lz4` against `mkfs.erofs -zlz4`.
//!
//! Run as root: `cargo bench --bench import` (`-- --quick` for 1 round,
//! `-- ext4`, `-- erofs` or `-- erofs-lz4` for one format's rounds).
//! The binary under test is the `bench`-profile (release) build.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[path = "util/mod.rs"]
mod util;
use util::{Work, run, sh, umoci_image};

const BIN: &str = env!("CARGO_BIN_EXE_sharedloop");

/// The gzip blobs of an image's layers, bottom first, and their
/// uncompressed size.
fn layers(layout: &Path, tag: &str) -> (Vec<PathBuf>, u64) {
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let m = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap();
    let blob = |d: &str| layout.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    let man: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(m["digest"].as_str().unwrap())).unwrap()).unwrap();
    let mut paths = vec![];
    let mut size = 0;
    for l in man["layers"].as_array().unwrap() {
        let p = blob(l["digest"].as_str().unwrap());
        let out = Command::new("sh").args(["-c", &format!("gzip -dc {} | wc -c", p.display())]).output().unwrap();
        size += String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().unwrap();
        paths.push(p);
    }
    (paths, size)
}

fn import(layout: &Path, tag: &str, store: &Path, fstype: &str) -> f64 {
    let t = Instant::now();
    // `erofs-lz4`: erofs with --compress lz4.
    let (fs, compress) = match fstype {
        "erofs-lz4" => ("erofs", "lz4"),
        f => (f, "none"),
    };
    let compress: &[&str] = if fs == "erofs" { &["--compress", compress] } else { &[] };
    run(Command::new(BIN)
        .args(["import", "--quiet", "--fstype", fs, &format!("oci:{}:{tag}", layout.display())])
        .args(compress)
        .arg("--loopback-root")
        .arg(store.join("root"))
        .arg("--loopback-fallback")
        .arg(store.join("fallback"))
        .env("SHAREDLOOP_CONFIG", ""));
    t.elapsed().as_secs_f64()
}

/// tar -x each layer, mkfs.ext4 -d each directory (sized like content +
/// 30%), or mkfs.erofs (uncompressed, its default) of each.
fn baseline(blobs: &[PathBuf], dir: &Path, fstype: &str) -> f64 {
    let t = Instant::now();
    for (i, b) in blobs.iter().enumerate() {
        let d = dir.join(format!("l{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let mkfs = if fstype == "erofs" {
            "mkfs.erofs --quiet {d}.img {d}"
        } else if fstype == "erofs-lz4" {
            "mkfs.erofs --quiet -zlz4 {d}.img {d}"
        } else {
            "kb=$(du -sk {d} | cut -f1); truncate -s $(( (kb * 13 / 10 + 16384) * 1024 )) {d}.img; \
             mkfs.ext4 -q -F -O ^has_journal -d {d} {d}.img"
        };
        let tar = format!(
            "tar --numeric-owner --xattrs --xattrs-include='*' -xzf {b} -C {d}; ",
            b = b.display(),
            d = d.display()
        );
        sh(&(tar + &mkfs.replace("{d}", &d.display().to_string())));
    }
    t.elapsed().as_secs_f64()
}

fn umoci_unpack(layout: &Path, tag: &str, dir: &Path) -> f64 {
    let t = Instant::now();
    run(Command::new("umoci").args(["unpack", "--image"]).arg(format!("{}:{tag}", layout.display())).arg(dir));
    t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Apparent and allocated bytes of the layer images in a store.
fn store_bytes(store: &Path) -> (u64, u64) {
    let out = Command::new("sh")
        .args(["-c", &format!("find {} -name layer.img -printf '%s %b\\n'", store.display())])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().fold((0, 0), |(a, b), l| {
        let mut f = l.split_whitespace().map(|x| x.parse::<u64>().unwrap());
        (a + f.next().unwrap(), b + f.next().unwrap() * 512)
    })
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = if quick { 1 } else { 3 };
    let w = Work(PathBuf::from(format!("/var/tmp/sl-import-bench-{}", std::process::id())));
    std::fs::create_dir_all(&w.0).unwrap();
    let layout = w.0.join("layout");
    eprintln!("building images with umoci in {}", w.0.display());
    umoci_image(
        &layout,
        "large",
        &[
            "mkdir -p big && head -c 64M /dev/urandom > big/blob",
            "mkdir -p many && for d in $(seq 1 50); do mkdir many/$d; for f in $(seq 1 100); do head -c $((1024 + (d * f) % 3072)) /dev/urandom > many/$d/$f; done; done",
            "head -c 16M /dev/urandom > big/second && rm -r many/1 && chmod 4755 big/blob",
        ],
    );
    let small: Vec<String> = (0..12).map(|i| format!("small{i}")).collect();
    for s in &small {
        umoci_image(
            &layout,
            s,
            &[&format!("mkdir etc app && for f in $(seq 1 40); do echo {s}-$f > app/$f; done && echo {s} > etc/id")],
        );
    }

    let rounds = |fstype: &str| bench(&w, &layout, &small, reps, fstype);
    // `-- ext4` or `-- erofs`: that round only.
    let only: Vec<String> = std::env::args().filter(|a| a == "ext4" || a == "erofs" || a == "erofs-lz4").collect();
    for f in ["ext4", "erofs", "erofs-lz4"] {
        if only.is_empty() || only.iter().any(|o| o == f) {
            rounds(f);
        }
    }
}

fn bench(w: &Work, layout: &Path, small: &[String], reps: usize, fstype: &str) {
    let layout = layout.to_path_buf();
    let (blobs, content) = layers(&layout, "large");
    let mut sl = vec![];
    let mut base = vec![];
    let mut um = vec![];
    let mut overhead = (0, 0);
    for r in 0..reps {
        let store = w.0.join(format!("store-{fstype}{r}"));
        sl.push(import(&layout, "large", &store, fstype));
        overhead = store_bytes(&store);
        let _ = std::fs::remove_dir_all(&store);
        let bdir = w.0.join(format!("base-{fstype}{r}"));
        base.push(baseline(&blobs, &bdir, fstype));
        let _ = std::fs::remove_dir_all(&bdir);
        let udir = w.0.join(format!("umoci-{fstype}{r}"));
        um.push(umoci_unpack(&layout, "large", &udir));
        let _ = std::fs::remove_dir_all(&udir);
    }
    let mb = content as f64 / 1e6;
    let (s, b, u) = (median(sl), median(base), median(um));

    let mut sl_small = vec![];
    let mut base_small = vec![];
    for r in 0..reps {
        let store = w.0.join(format!("sstore-{fstype}{r}"));
        let t = Instant::now();
        for s in small {
            import(&layout, s, &store, fstype);
        }
        sl_small.push(t.elapsed().as_secs_f64());
        let _ = std::fs::remove_dir_all(&store);
        let t = Instant::now();
        for (i, s) in small.iter().enumerate() {
            let (bl, _) = layers(&layout, s);
            baseline(&bl, &w.0.join(format!("sb{fstype}{r}-{i}")), fstype);
        }
        base_small.push(t.elapsed().as_secs_f64());
    }
    let per_min = |secs: f64| small.len() as f64 * 60.0 / secs;
    let (ss, bs) = (median(sl_small), median(base_small));

    let mkfs = if fstype == "erofs" {
        "mkfs.erofs"
    } else if fstype == "erofs-lz4" {
        "mkfs.erofs -zlz4"
    } else {
        "mkfs.ext4 -d"
    };
    println!("### import throughput ({fstype}): sharedloop import vs tar -x + {mkfs} per layer\n");
    println!(
        "kernel {}, {} rounds, medians; images built with umoci (gzip layers)\n",
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        reps
    );
    println!(
        "| image | content | sharedloop import --fstype {fstype} | tar -x + {mkfs} | umoci unpack (merged rootfs only) | speed-up vs tar+mkfs |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| large (3 layers: 64 MiB file, 5,000 small files, 16 MiB) | {mb:.1} MB | {s:.2} s ({:.0} MB/s) | {b:.2} s ({:.0} MB/s) | {u:.2} s | {:.2}x |",
        mb / s,
        mb / b,
        b / s
    );
    println!(
        "| {} small (1 layer, 41 files) | | {:.0} images/min | {:.0} images/min | | {:.2}x |",
        small.len(),
        per_min(ss),
        per_min(bs),
        bs / ss
    );
    println!(
        "\nstore overhead for \"large\": layer images {:.1} MB apparent, {:.1} MB allocated, for {mb:.1} MB of layer content ({:+.0}% allocated)",
        overhead.0 as f64 / 1e6,
        overhead.1 as f64 / 1e6,
        (overhead.1 as f64 / content as f64 - 1.0) * 100.0
    );
}
