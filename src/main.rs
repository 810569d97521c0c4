//! One binary, three names: `mount.sharedloop` and `umount.sharedloop`
//! (installed as links in /sbin, where mount(8) looks; cargo cannot name a
//! binary with a dot) and the admin CLI `sharedloop`.

#![deny(unsafe_code)]

use std::ffi::OsString;
use std::path::Path;

fn main() {
    // Bytes, not text: a mount point or store path need not be UTF-8.
    let args: Vec<OsString> = std::env::args_os().collect();
    let prog = args.first().and_then(|a| Path::new(a).file_name()).map(|f| f.to_os_string()).unwrap_or_default();
    let rest = &args[1.min(args.len())..];
    let (name, result) = match prog.as_encoded_bytes() {
        b"mount.sharedloop" => ("mount.sharedloop", sharedloop::cli::helper::mount_main(rest)),
        b"umount.sharedloop" => ("umount.sharedloop", sharedloop::cli::helper::umount_main(rest)),
        _ => ("sharedloop", sharedloop::cli::main(&args)),
    };
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            let e = sharedloop::interrupt::after_signal(e);
            if log::log_enabled!(log::Level::Error) {
                log::error!("{e}");
            } else {
                eprintln!("{name}: {e}");
            }
            e.exit_code() as i32
        }
    };
    std::process::exit(code);
}
