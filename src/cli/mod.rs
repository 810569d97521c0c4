//! The admin CLI, `sharedloop`: everything that is not a mount.

pub mod argv;
pub mod config;
pub mod helper;
pub mod logging;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::cli::helper::{effective_options, store_of};
use crate::error::{Error, Result};
use crate::store::FsType;

#[derive(Parser)]
#[command(
    name = "sharedloop",
    version,
    about = "Layered images from filesystem image files, mounted with loop devices and overlayfs"
)]
struct Cli {
    /// Store root (default from the configuration file, else /var/lib/sharedloop/root)
    #[arg(long, global = true)]
    loopback_root: Option<PathBuf>,
    /// Fallback store (default from the configuration file, else /var/lib/sharedloop/private)
    #[arg(long, global = true)]
    loopback_fallback: Option<PathBuf>,
    /// Print each step
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Turn a directory into a layer image and store it; prints the chain ID
    Add {
        dir: PathBuf,
        /// Chain ID (or unique prefix, or name) of the parent layer
        #[arg(long)]
        parent: Option<String>,
        /// Name to record for the new top layer (e.g. debian:12)
        #[arg(long)]
        name: Option<String>,
        /// Filesystem of the layer image (default: layer_fstype from the configuration file, else auto: erofs where the kernel has it, else ext4)
        #[arg(long, value_parser = ["ext4", "xfs", "erofs", "auto"])]
        fstype: Option<String>,
        /// Compression of erofs layer files: none or lz4 (default: layer_compression from the configuration file, else none)
        #[arg(long, value_parser = ["none", "lz4"])]
        compress: Option<String>,
        /// Node-local directory to build the image in (default: staging_dir from the configuration file, else tmp/ of the fallback store)
        #[arg(long, value_name = "DIR")]
        staging_dir: Option<PathBuf>,
    },
    /// Import an OCI or Docker image, layer by layer; prints the top chain ID
    #[command(
        after_help = "SOURCE is oci:DIR[:TAG] (OCI image layout), oci-archive:FILE[:TAG] (a tar of one), docker-archive:FILE[:REF] (docker save, podman save) or docker://[HOST[:PORT]/]PATH[:TAG][@DIGEST] (pulled from a registry with skopeo; layers already in the store are not downloaded), as skopeo spells them."
    )]
    Import {
        /// oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:REF] or docker://REF
        source: String,
        /// Name to record for the image (default: TAG or REF, if given or in the archive)
        #[arg(long)]
        name: Option<String>,
        /// Filesystem of the layer images (default: layer_fstype from the configuration file, else auto: erofs where the kernel has it, else ext4)
        #[arg(long, value_parser = ["ext4", "xfs", "erofs", "auto"])]
        fstype: Option<String>,
        /// Compression of erofs layer files: none or lz4 (default: layer_compression from the configuration file, else none)
        #[arg(long, value_parser = ["none", "lz4"])]
        compress: Option<String>,
        /// No progress output
        #[arg(short, long)]
        quiet: bool,
        /// Node-local directory to unpack and build in (default: staging_dir from the configuration file, else tmp/ of the fallback store)
        #[arg(long, value_name = "DIR")]
        staging_dir: Option<PathBuf>,
        /// docker://: credentials for the registry (without PASS: read from stdin)
        #[arg(long, value_name = "USER[:PASS]")]
        creds: Option<String>,
        /// docker://: auth.json to use (default: skopeo's, REGISTRY_AUTH_FILE or $XDG_RUNTIME_DIR/containers/auth.json)
        #[arg(long, value_name = "FILE")]
        authfile: Option<PathBuf>,
        /// docker://: check the registry's TLS certificate (default true, unless registries.conf says insecure)
        #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
        tls_verify: Option<bool>,
        /// docker://: directory of CA certificates (*.crt) and client keys for the registry
        #[arg(long, value_name = "DIR")]
        cert_dir: Option<PathBuf>,
        /// docker://: the image of a multi-platform index to pull (default linux/this machine)
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<String>,
        /// docker://: registries.conf to use (mirrors; default: CONTAINERS_REGISTRIES_CONF, else skopeo's)
        #[arg(long, value_name = "FILE")]
        registries_conf: Option<PathBuf>,
    },
    /// Make an OCI runtime bundle in DIR: the image mounted at DIR/rootfs, DIR/config.json from its image config
    #[command(
        after_help = "Run it with `runc run --bundle DIR ID`, `crun run --bundle DIR ID` or `podman run --rootfs DIR/rootfs`; remove it with `sharedloop unbundle DIR`."
    )]
    Bundle {
        /// Image name, layer chain ID or unique ID prefix
        image: String,
        /// Bundle directory: created, or an empty directory
        dir: PathBuf,
        /// Mount options for DIR/rootfs, as mount.sharedloop takes them (default: read-only; e.g. upper=tmpfs)
        #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
        options: Option<std::ffi::OsString>,
        /// The command to run instead of the image's Cmd (its Entrypoint stays)
        #[arg(last = true, value_name = "ARGS")]
        args: Option<Vec<String>>,
    },
    /// Unmount DIR/rootfs and remove what `sharedloop bundle` wrote in DIR
    Unbundle {
        /// Bundle directory made by `sharedloop bundle`
        dir: PathBuf,
    },
    /// The driver, its store, what the kernel offers, and the active mounts
    Status {
        /// One JSON document instead of text
        #[arg(long)]
        json: bool,
    },
    /// The active sharedloop mounts on this node
    Mounts {
        /// One JSON document instead of text
        #[arg(long)]
        json: bool,
    },
    /// List images (names) and layers in the store, or one image's layers
    Ls {
        /// An image name, layer chain ID or unique ID prefix: its layers, bottom to top
        image: Option<String>,
        /// One JSON document instead of tables
        #[arg(long)]
        json: bool,
    },
    /// Remove images (names) or layers, and the layers nothing else needs
    Rm {
        /// Image names, layer chain IDs or unique ID prefixes
        #[arg(required = true)]
        targets: Vec<String>,
        /// Remove only the name records; the layers stay until gc
        #[arg(long)]
        name_only: bool,
        /// Say what would be removed, remove nothing
        #[arg(long)]
        dry_run: bool,
        /// One JSON document instead of lines
        #[arg(long)]
        json: bool,
    },
    /// Remove unreferenced layers and what crashed processes left in the store
    Gc {
        /// Say what would be removed, remove nothing
        #[arg(long)]
        dry_run: bool,
        /// Keep unreferenced layers younger than this (e.g. 30m, 1h, 2d, 0)
        #[arg(long, default_value = "1h", value_parser = crate::manage::parse_duration)]
        min_age: std::time::Duration,
        /// One JSON document instead of lines
        #[arg(long)]
        json: bool,
    },
    /// Recheck stored layers (all, or the chains of the given images/IDs)
    Verify {
        /// Image names, layer chain IDs or unique ID prefixes
        targets: Vec<String>,
        /// Also run the filesystem checker read-only (e2fsck -fn, xfs_repair -n, fsck.erofs)
        #[arg(long)]
        deep: bool,
        /// One JSON document instead of lines
        #[arg(long)]
        json: bool,
    },
}

/// A store directory given on the command line: absolute, no `..` (the
/// rule `loopback_root=` has), bytes kept as they are.
fn store_dir_arg(flag: &str, p: &std::path::Path) -> Result<PathBuf> {
    if !p.is_absolute() {
        return Err(Error::Usage(format!("{flag} {}: must be an absolute path", p.display())));
    }
    if p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(Error::Usage(format!("{flag} {}: '..' is not allowed", p.display())));
    }
    Ok(p.to_path_buf())
}

pub fn main(args: &[std::ffi::OsString]) -> Result<()> {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            if usage {
                return Err(Error::Usage("bad command line (see sharedloop --help)".into()));
            }
            std::process::exit(0);
        }
    };
    crate::cli::logging::init("sharedloop", cli.verbose);
    crate::interrupt::install();
    let given = crate::mount::opts::MountOptions {
        loopback_root: cli.loopback_root.as_deref().map(|p| store_dir_arg("--loopback-root", p)).transpose()?,
        loopback_fallback: cli
            .loopback_fallback
            .as_deref()
            .map(|p| store_dir_arg("--loopback-fallback", p))
            .transpose()?,
        ..Default::default()
    };
    // The store given on the command line, for mounts made in this process.
    let (opts_root, opts_fallback) = (given.loopback_root.clone(), given.loopback_fallback.clone());
    let (opts, _) = effective_options(given)?;
    let store = store_of(&opts);
    // --staging-dir, else staging_dir= from the configuration file.
    let staging = |given: Option<PathBuf>| -> Result<Option<PathBuf>> {
        match given {
            Some(d) => std::path::absolute(&d).map(Some).map_err(|e| Error::io("--staging-dir", &d, &e)),
            None => Ok(opts.staging_dir.clone()),
        }
    };
    // --fstype, else layer_fstype= from the configuration file, else auto.
    let layer_fstype = |given: Option<String>| -> Result<FsType> {
        let configured = match given {
            Some(s) => Some(crate::store::parse_layer_fstype(&s)?),
            None => opts.layer_fstype,
        };
        let (t, why) = crate::store::default_layer_fstype(configured.flatten());
        if configured.flatten().is_none() {
            log::info!("layer format {t}: {why}");
        }
        Ok(t)
    };
    // --compress, else layer_compression= from the configuration file,
    // else none. Only erofs layers can be compressed: --compress lz4 with
    // another format is refused, the configured default only applies to
    // erofs (a node that falls back to ext4 still imports).
    let layer_compression = |given: Option<String>, fstype: FsType| -> Result<bool> {
        let lz4 = match given {
            Some(s) => crate::store::parse_layer_compression(&s)?,
            None => fstype == FsType::Erofs && opts.layer_compression.unwrap_or(false),
        };
        if lz4 && fstype != FsType::Erofs {
            return Err(Error::Usage(format!(
                "lz4 compression needs erofs layers, not {fstype} (--compress none, or --fstype erofs)"
            )));
        }
        Ok(lz4)
    };
    match cli.cmd {
        Cmd::Import {
            source,
            name,
            fstype,
            compress,
            quiet,
            staging_dir,
            creds,
            authfile,
            tls_verify,
            cert_dir,
            platform,
            registries_conf,
        } => {
            let name = name.map(|n| crate::store::ids::Name::parse(&n)).transpose()?;
            let staging_dir = staging(staging_dir)?;
            let fstype = layer_fstype(fstype)?;
            let opts = crate::import::ImportOptions {
                source: &source,
                name: name.as_ref(),
                fstype,
                compress: layer_compression(compress, fstype)?,
                quiet,
                staging_dir: staging_dir.as_deref(),
                registry: crate::import::registry::RegistryOptions {
                    creds,
                    authfile,
                    tls_verify,
                    cert_dir,
                    platform,
                    registries_conf,
                },
            };
            println!("{}", crate::import::import(&store, &opts)?);
            Ok(())
        }
        Cmd::Status { json } => {
            let st = crate::manage::status::gather(&store, &opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st).expect("serialize"));
            } else {
                print!("{}", crate::manage::status::format_status(&st));
            }
            Ok(())
        }
        Cmd::Mounts { json } => {
            let ms = crate::manage::status::mounts_info(&crate::manage::status::mounts()?);
            if json {
                println!("{}", serde_json::to_string_pretty(&ms).expect("serialize"));
            } else if ms.is_empty() {
                // Said, not left blank: findmnt and mount -t sharedloop show
                // nothing either (these mounts are of type overlay).
                println!("no sharedloop mounts");
            } else {
                print!("{}", crate::manage::status::format_mounts(&ms));
            }
            Ok(())
        }
        Cmd::Bundle { image, dir, options, args } => crate::bundle::bundle(
            &store,
            &crate::bundle::BundleOptions {
                image: &image,
                dir: &dir,
                options: options.as_deref(),
                args: args.as_deref(),
                store_options: crate::bundle::store_options(opts_root.as_deref(), opts_fallback.as_deref())?,
                verbose: cli.verbose,
            },
        ),
        Cmd::Unbundle { dir } => crate::bundle::unbundle(&dir, cli.verbose),
        Cmd::Ls { image, json } => crate::manage::ls(&store, image.as_deref(), json),
        Cmd::Rm { targets, name_only, dry_run, json } => {
            crate::manage::rm(&store, &targets, &crate::manage::RmOptions { name_only, dry_run, json })
        }
        Cmd::Gc { dry_run, min_age, json } => {
            crate::manage::gc(&store, &crate::manage::GcOptions { dry_run, min_age, json })
        }
        Cmd::Verify { targets, deep, json } => {
            crate::manage::verify(&store, &targets, &crate::manage::VerifyOptions { deep, json })
        }
        Cmd::Add { dir, parent, name, fstype, compress, staging_dir } => {
            let parent = parent.map(|p| store.resolve(&crate::store::ids::LayerRef::parse(&p)?)).transpose()?;
            let name = name.map(|n| crate::store::ids::Name::parse(&n)).transpose()?;
            let fstype = layer_fstype(fstype)?;
            let compress = layer_compression(compress, fstype)?;
            let staging_dir = staging(staging_dir)?;
            let id = crate::image::add_layer(
                &store,
                &crate::image::AddOptions {
                    dir: &dir,
                    parent,
                    name: name.as_ref(),
                    fstype,
                    compress,
                    quiet: !cli.verbose,
                    staging_dir: staging_dir.as_deref(),
                },
            )?;
            println!("{id}");
            Ok(())
        }
    }
}
