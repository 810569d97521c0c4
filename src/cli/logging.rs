//! Messages go to stderr (as `PROG: message`) and to syslog under the
//! program's name (mount.sharedloop, umount.sharedloop, sharedloop),
//! facility LOG_DAEMON, through /dev/log (or $SHAREDLOOP_SYSLOG_SOCKET). `-v` shows info on stderr;
//! SHAREDLOOP_DEBUG=1 shows debug too. Syslog gets warnings and errors
//! always, info with -v.

use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    prog: &'static str,
    stderr_level: LevelFilter,
    syslog: Mutex<Option<syslog::Logger<syslog::LoggerBackend, syslog::Formatter3164>>>,
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= self.stderr_level || m.level() <= Level::Warn
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let msg = r.args().to_string();
        if r.level() <= self.stderr_level {
            let prefix = match r.level() {
                Level::Warn => "warning: ",
                _ => "",
            };
            eprintln!("{}: {prefix}{msg}", self.prog);
        }
        if let Ok(mut g) = self.syslog.lock()
            && let Some(s) = g.as_mut() {
                let _ = match r.level() {
                    Level::Error => s.err(&msg),
                    Level::Warn => s.warning(&msg),
                    Level::Info => s.info(&msg),
                    _ => Ok(()),
                };
            }
    }

    fn flush(&self) {}
}

pub fn init(prog: &'static str, verbose: bool) {
    let debug = std::env::var("SHAREDLOOP_DEBUG").is_ok_and(|v| !v.is_empty() && v != "0");
    let stderr_level = if debug {
        LevelFilter::Debug
    } else if verbose {
        LevelFilter::Info
    } else {
        LevelFilter::Warn
    };
    let formatter = syslog::Formatter3164 {
        facility: syslog::Facility::LOG_DAEMON,
        hostname: None,
        process: prog.into(),
        pid: std::process::id(),
    };
    // SHAREDLOOP_SYSLOG_SOCKET: another datagram socket than /dev/log (for
    // tests, and containers that forward syslog elsewhere).
    let sl = match std::env::var_os("SHAREDLOOP_SYSLOG_SOCKET") {
        Some(p) => syslog::unix_custom(formatter, p).ok(),
        None => syslog::unix(formatter).ok(),
    };
    let logger = Logger { prog, stderr_level, syslog: Mutex::new(sl) };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(stderr_level.max(LevelFilter::Warn));
    }
}
