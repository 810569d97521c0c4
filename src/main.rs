//! One binary, three names: `mount.sharedloop` and `umount.sharedloop`
//! (installed as links in /sbin, where mount(8) looks; cargo cannot name a
//! binary with a dot) and the admin CLI `sharedloop`.

#![deny(unsafe_code)]

use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let prog = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|f| f.to_str())
        .unwrap_or("sharedloop")
        .to_string();
    let rest = &args[1.min(args.len())..];
    let (name, result) = match prog.as_str() {
        "mount.sharedloop" => ("mount.sharedloop", sharedloop::helper::mount_main(rest)),
        "umount.sharedloop" => ("umount.sharedloop", sharedloop::helper::umount_main(rest)),
        _ => ("sharedloop", sharedloop::cli::main(&args)),
    };
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            if log::log_enabled!(log::Level::Error) {
                log::error!("{e}");
            } else {
                eprintln!("{name}: {e}");
            }
            std::process::exit(e.exit_code() as i32);
        }
    }
}
