//! The one way sharedloop runs an external command (mkfs.*, debugfs, the
//! xfs copy, the filesystem checkers, skopeo).
//!
//! A [`Cmd`] finds its tool in the system directories first (mount(8) runs
//! helpers with a PATH that lacks /sbin), runs it with `LC_ALL=C` (messages
//! we match on stay English), stdin from /dev/null or from piped input,
//! stdout and stderr captured, and dies with us: a killed sharedloop never
//! leaves a mkfs writing into the store ([`sys::die_with_parent`]), and a
//! SIGINT or SIGTERM while it runs kills it ([`crate::interrupt`]). A
//! failure becomes `Error::Command` with the command line, how it ended
//! (`status N` or `signal N`) and the last lines of its stderr.

use std::ffi::OsStr;
use std::io::Write;
use std::ops::{Deref, DerefMut};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::error::{Error, Result};
use crate::kernel::sys;

/// Lines of stderr an error keeps.
const STDERR_TAIL: usize = 3;

/// An external command, set up as described in the module documentation.
/// It derefs to `std::process::Command` for arguments and environment.
pub struct Cmd {
    cmd: Command,
    /// The tool as asked for (`mkfs.ext4`), shown in messages.
    name: String,
}

impl Cmd {
    pub fn new(name: &str) -> Cmd {
        let mut cmd = Command::new(tool(name));
        cmd.env("LC_ALL", "C");
        sys::die_with_parent(&mut cmd);
        Cmd { cmd, name: name.to_string() }
    }

    /// Run to completion. Ok: its stderr (some tools report there even when
    /// they succeed). Err: `Error::Command`, or `Error::Sys` if it could not
    /// be started.
    pub fn run(&mut self, what: &str) -> Result<String> {
        self.run_with(what, None)
    }

    /// The same, with `input` on its stdin.
    pub fn run_with_input(&mut self, what: &str, input: &[u8]) -> Result<String> {
        self.run_with(what, Some(input))
    }

    fn run_with(&mut self, what: &str, input: Option<&[u8]>) -> Result<String> {
        self.run_checked(what, input, |e| tail(e, STDERR_TAIL)).map(|out| String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Run to completion with stdin from /dev/null. Ok: its stdout. Err as
    /// [`Cmd::run`], with `message` making the error's text of its stderr
    /// (for a tool whose last lines are not its message: skopeo).
    pub fn run_stdout(&mut self, what: &str, message: fn(&str) -> String) -> Result<Vec<u8>> {
        self.run_checked(what, None, message).map(|out| out.stdout)
    }

    fn run_checked(&mut self, what: &str, input: Option<&[u8]>, message: fn(&str) -> String) -> Result<Output> {
        let program = PathBuf::from(self.cmd.get_program());
        let out = self.exec(input).map_err(|f| match f {
            Failure::Spawn(e) => Error::io(format!("{what}: run"), &program, &e),
            Failure::Write(e) => Error::io(format!("{what}: write to"), &program, &e),
            Failure::Wait(e) => Error::io(format!("{what}: wait for"), &program, &e),
            Failure::Interrupted => Error::Interrupted,
        })?;
        if out.status.success() {
            return Ok(out);
        }
        let status = match (out.status.code(), out.status.signal()) {
            (Some(c), _) => format!("status {c}"),
            (None, s) => format!("signal {}", s.unwrap_or(0)),
        };
        let stderr = message(&String::from_utf8_lossy(&out.stderr));
        Err(Error::Command { what: what.into(), cmd: self.render(), status, stderr })
    }

    /// Run with stdin from /dev/null and hand back everything, for callers
    /// that judge the result themselves (a checker's report on stdout).
    /// Interruptible like [`Cmd::run`]: a signal kills the command and
    /// gives an error of kind `Interrupted`.
    pub fn output(&mut self) -> std::io::Result<Output> {
        self.exec(None).map_err(|f| match f {
            Failure::Spawn(e) | Failure::Write(e) | Failure::Wait(e) => e,
            Failure::Interrupted => std::io::ErrorKind::Interrupted.into(),
        })
    }

    /// Spawn it with `input` (or /dev/null) on stdin and stdout and stderr
    /// captured, and wait for it interruptibly.
    fn exec(&mut self, input: Option<&[u8]>) -> std::result::Result<Output, Failure> {
        self.cmd
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.cmd.spawn().map_err(Failure::Spawn)?;
        // The input goes in from a thread while the output is drained: a
        // tool that echoes what it reads (debugfs -f -) would otherwise
        // fill its stdout pipe and block while we block writing its stdin,
        // and a signal meanwhile would go unseen.
        let writer = match (input, child.stdin.take()) {
            (Some(data), Some(mut stdin)) => {
                let data = data.to_vec();
                Some(std::thread::spawn(move || stdin.write_all(&data)))
            }
            _ => None,
        };
        let out = wait_interruptibly(child)?;
        match writer.map(|w| w.join()) {
            // It exited without reading all: its status and stderr say why.
            Some(Ok(Err(e))) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Failure::Write(e)),
            _ => Ok(out),
        }
    }

    /// The command line as a shell would take it, with the tool's name as
    /// asked for.
    pub fn render(&self) -> String {
        std::iter::once(OsStr::new(&self.name))
            .chain(self.cmd.get_args())
            .map(|a| shell_quote(&a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Deref for Cmd {
    type Target = Command;
    fn deref(&self) -> &Command {
        &self.cmd
    }
}

impl DerefMut for Cmd {
    fn deref_mut(&mut self) -> &mut Command {
        &mut self.cmd
    }
}

/// mount(8) runs helpers with a sanitized PATH that lacks /sbin: look in
/// the system directories first, then in PATH; the bare name if nowhere.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .into_iter()
        .map(String::from)
        .chain(path.split(':').filter(|d| !d.is_empty()).map(String::from))
        .map(|d| Path::new(&d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The last `n` non-empty lines, trimmed, joined with "; ".
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("; ")
}

fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./:=,^@%+-".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Why a command gave no exit status to judge.
enum Failure {
    Spawn(std::io::Error),
    /// Writing its input failed (other than by its exiting early).
    Write(std::io::Error),
    Wait(std::io::Error),
    /// A signal came while it ran; it was killed.
    Interrupted,
}

/// The child's output once it exits; a SIGINT or SIGTERM meanwhile kills
/// it (a mkfs on a store that stopped answering must not outlive us) and
/// gives `Failure::Interrupted`. Its pipes are drained by threads while we
/// poll, so a child that writes a lot never blocks on a full pipe.
fn wait_interruptibly(mut child: std::process::Child) -> std::result::Result<Output, Failure> {
    fn drain(p: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    }
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    // 1 ms doubling to 10 ms: a quick command is not held up by the poll.
    let mut pause = std::time::Duration::from_millis(1);
    let status = loop {
        if let Some(st) = child.try_wait().map_err(Failure::Wait)? {
            break st;
        }
        if crate::interrupt::interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Failure::Interrupted);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(10));
    };
    Ok(Output { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sbin_tools_without_path() {
        assert!(tool("mkfs.ext4").is_absolute(), "{}", tool("mkfs.ext4").display());
        assert_eq!(tool("no-such-tool-here"), PathBuf::from("no-such-tool-here"));
    }

    #[test]
    fn success_gives_stderr_failure_gives_command_error() {
        let mut c = Cmd::new("sh");
        c.args(["-c", "echo $LC_ALL >&2; cat >&2"]);
        assert_eq!(c.run_with_input("test", b"in\n").unwrap(), "C\nin\n");

        let mut c = Cmd::new("sh");
        c.args(["-c", "printf 'a\\n\\n b \\nc\\nd\\n' >&2; exit 3", "it's"]);
        match c.run("do the thing").unwrap_err() {
            Error::Command { what, cmd, status, stderr } => {
                assert_eq!(what, "do the thing");
                assert_eq!(cmd, r#"sh -c 'printf '\''a\n\n b \nc\nd\n'\'' >&2; exit 3' 'it'\''s'"#);
                assert_eq!(status, "status 3");
                assert_eq!(stderr, "b; c; d");
            }
            e => panic!("want Error::Command, got {e:?}"),
        }

        let mut c = Cmd::new("sh");
        c.args(["-c", "kill -9 $$"]);
        let e = c.run("die").unwrap_err();
        assert_eq!(e.to_string(), "die: sh -c 'kill -9 $$' exited with signal 9");

        let e = Cmd::new("no-such-tool-here").run("try").unwrap_err();
        assert_eq!(e.errno(), Some(rustix::io::Errno::NOENT));
        assert!(e.to_string().starts_with("try: run: no-such-tool-here: "), "{e}");
    }

    /// A tool echoing all its input (as debugfs -f - does) gets it all
    /// while its stdout is drained: 4 MiB, far past any pipe buffer.
    #[test]
    fn large_input_to_an_echoing_tool_does_not_deadlock() {
        let input = vec![b'x'; 4 << 20];
        let mut c = Cmd::new("sh");
        c.args(["-c", "cat; echo done >&2"]);
        assert_eq!(c.run_with_input("echo", &input).unwrap(), "done\n");
    }

    #[test]
    fn output_hands_back_everything() {
        let mut c = Cmd::new("sh");
        c.args(["-c", "read x || echo eof; echo $LC_ALL; echo err >&2; exit 4"]);
        let out = c.output().unwrap();
        assert_eq!((out.stdout.as_slice(), out.stderr.as_slice()), (&b"eof\nC\n"[..], &b"err\n"[..]));
        assert_eq!(out.status.code(), Some(4));

        let e = Cmd::new("no-such-tool-here").output().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }

    /// PR_SET_PDEATHSIG follows the spawning thread: a child whose
    /// spawning thread ends without waiting is killed.
    #[test]
    fn child_dies_with_the_thread_that_spawned_it() {
        let pid = std::thread::spawn(|| {
            let mut c = Cmd::new("sleep");
            c.arg("100").stdin(Stdio::null());
            c.spawn().unwrap().id()
        })
        .join()
        .unwrap();
        let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
        let start = std::time::Instant::now();
        loop {
            match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG).unwrap() {
                Some((_, st)) => {
                    assert_eq!(st.terminating_signal(), Some(libc::SIGKILL), "{st:?}");
                    break;
                }
                None => {
                    assert!(start.elapsed().as_secs() < 10, "sleep outlived the thread that spawned it");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
    }
}
