//! Image config -> OCI runtime-spec `config.json` (ociVersion 1.0.2):
//! what the image says to run (Env, Entrypoint + Cmd, WorkingDir, User),
//! in the container `runc spec` makes (its namespaces, mounts,
//! capabilities, masked and read-only paths), rootless of nothing.

use serde_json::{Value, json};

use super::user::User;
use crate::error::{Error, Result};
use crate::import::config::RunConfig;

pub const OCI_VERSION: &str = "1.0.2";
/// What Docker, Podman and runc put in PATH when the image sets none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The process of an image without a config (one made by `add`) and no
/// `-- ARGS`.
pub const DEFAULT_ARGS: &[&str] = &["sh"];
/// runc spec's capability set.
pub const CAPABILITIES: &[&str] = &["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];
pub const READONLY_PATHS: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];
/// The mount points the spec's mounts need in the image (runc creates
/// missing ones, which a read-only rootfs cannot take).
pub const MOUNT_POINTS: &[&str] = &["/proc", "/dev", "/sys"];

/// Everything the spec is made of.
pub struct SpecInput<'a> {
    /// The image config's run part (default for an image without one).
    pub run: &'a RunConfig,
    /// `-- ARGS`: replaces Cmd (Entrypoint stays), as `docker run IMAGE ARGS`.
    pub args: Option<&'a [String]>,
    pub user: &'a User,
    pub readonly: bool,
    pub hostname: &'a str,
    pub annotations: &'a [(&'a str, String)],
}

/// The process's environment: the image's, with PATH added when it has none.
pub fn environment(env: Option<&[String]>) -> Vec<String> {
    let mut out: Vec<String> = env.unwrap_or_default().to_vec();
    if !out.iter().any(|e| e.starts_with("PATH=")) {
        out.insert(0, DEFAULT_PATH.into());
    }
    out
}

/// Entrypoint + Cmd, Cmd replaced by `args` when given.
pub fn arguments(run: &RunConfig, args: Option<&[String]>) -> Result<Vec<String>> {
    let mut out: Vec<String> = run.entrypoint.clone().unwrap_or_default();
    match args {
        Some(a) => out.extend_from_slice(a),
        None => out.extend(run.cmd.clone().unwrap_or_default()),
    }
    if out.is_empty() {
        return Err(Error::Usage("the image config has neither Entrypoint nor Cmd: give the command after --".into()));
    }
    Ok(out)
}

/// WorkingDir, `/` when unset; it must be absolute.
pub fn working_dir(run: &RunConfig) -> Result<String> {
    match run.working_dir.as_deref() {
        None | Some("") => Ok("/".into()),
        Some(w) if w.starts_with('/') => Ok(w.into()),
        Some(w) => Err(Error::bad_image(format!("image WorkingDir {w:?}"), "not an absolute path")),
    }
}

pub fn runtime_spec(i: &SpecInput) -> Result<Value> {
    let caps: Vec<&str> = CAPABILITIES.to_vec();
    let mut user = json!({"uid": i.user.uid, "gid": i.user.gid});
    if !i.user.additional_gids.is_empty() {
        user["additionalGids"] = json!(i.user.additional_gids);
    }
    let annotations: serde_json::Map<String, Value> = i.annotations.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    Ok(json!({
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": false,
            "user": user,
            "args": arguments(i.run, i.args)?,
            "env": environment(i.run.env.as_deref()),
            "cwd": working_dir(i.run)?,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "ambient": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": i.readonly},
        "hostname": i.hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "annotations": annotations,
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn process_from_config() {
        struct Case {
            env: Option<Vec<String>>,
            entrypoint: Option<Vec<String>>,
            cmd: Option<Vec<String>>,
            wd: Option<&'static str>,
            args: Option<Vec<String>>,
            want_args: std::result::Result<Vec<String>, &'static str>,
            want_env: Vec<String>,
            want_cwd: std::result::Result<&'static str, &'static str>,
        }
        let cases = vec![
            Case { env: None, entrypoint: None, cmd: Some(v(&["sh"])), wd: None, args: None, want_args: Ok(v(&["sh"])), want_env: v(&[DEFAULT_PATH]), want_cwd: Ok("/") },
            Case {
                env: Some(v(&["PATH=/bin", "FOO=bar"])),
                entrypoint: Some(v(&["/bin/sh", "-c"])),
                cmd: Some(v(&["echo hi"])),
                wd: Some("/srv"),
                args: None,
                want_args: Ok(v(&["/bin/sh", "-c", "echo hi"])),
                want_env: v(&["PATH=/bin", "FOO=bar"]),
                want_cwd: Ok("/srv"),
            },
            Case {
                env: Some(v(&["FOO=bar"])),
                entrypoint: Some(v(&["/bin/sh", "-c"])),
                cmd: Some(v(&["echo hi"])),
                wd: Some(""),
                args: Some(v(&["echo other"])),
                want_args: Ok(v(&["/bin/sh", "-c", "echo other"])),
                want_env: v(&[DEFAULT_PATH, "FOO=bar"]),
                want_cwd: Ok("/"),
            },
            Case { env: None, entrypoint: None, cmd: Some(v(&["x"])), wd: None, args: Some(v(&["ls", "-l"])), want_args: Ok(v(&["ls", "-l"])), want_env: v(&[DEFAULT_PATH]), want_cwd: Ok("/") },
            Case { env: None, entrypoint: None, cmd: None, wd: Some("rel"), args: None, want_args: Err("neither Entrypoint nor Cmd"), want_env: v(&[DEFAULT_PATH]), want_cwd: Err("not an absolute path") },
            Case { env: None, entrypoint: Some(vec![]), cmd: Some(vec![]), wd: None, args: Some(vec![]), want_args: Err("give the command after --"), want_env: v(&[DEFAULT_PATH]), want_cwd: Ok("/") },
        ];
        for (n, c) in cases.into_iter().enumerate() {
            let run = RunConfig { user: None, env: c.env, entrypoint: c.entrypoint, cmd: c.cmd, working_dir: c.wd.map(String::from) };
            let got = arguments(&run, c.args.as_deref()).map_err(|e| e.to_string());
            match (&c.want_args, &got) {
                (Ok(w), Ok(g)) => assert_eq!(w, g, "case {n}"),
                (Err(f), Err(e)) => assert!(e.contains(f), "case {n}: {e}"),
                _ => panic!("case {n}: {got:?}"),
            }
            assert_eq!(environment(run.env.as_deref()), c.want_env, "case {n}");
            let cwd = working_dir(&run).map_err(|e| e.to_string());
            match (c.want_cwd, &cwd) {
                (Ok(w), Ok(g)) => assert_eq!(w, g, "case {n}"),
                (Err(f), Err(e)) => assert!(e.contains(f), "case {n}: {e}"),
                _ => panic!("case {n}: {cwd:?}"),
            }
        }
    }

    #[test]
    fn spec_document() {
        let run = RunConfig { user: Some("bob".into()), env: Some(v(&["A=1"])), entrypoint: None, cmd: Some(v(&["id"])), working_dir: Some("/w".into()) };
        let user = User { uid: 1000, gid: 100, additional_gids: vec![10] };
        for readonly in [true, false] {
            let ann = [("org.sharedloop.image", "img:1".to_string())];
            let s = runtime_spec(&SpecInput { run: &run, args: None, user: &user, readonly, hostname: "h", annotations: &ann }).unwrap();
            assert_eq!(s["ociVersion"], "1.0.2");
            assert_eq!(s["process"]["terminal"], false);
            assert_eq!(s["process"]["args"], json!(["id"]));
            assert_eq!(s["process"]["env"], json!([DEFAULT_PATH, "A=1"]));
            assert_eq!(s["process"]["cwd"], "/w");
            assert_eq!(s["process"]["user"], json!({"uid": 1000, "gid": 100, "additionalGids": [10]}));
            assert_eq!(s["root"], json!({"path": "rootfs", "readonly": readonly}));
            assert_eq!(s["annotations"]["org.sharedloop.image"], "img:1");
            let ns: Vec<&str> = s["linux"]["namespaces"].as_array().unwrap().iter().map(|n| n["type"].as_str().unwrap()).collect();
            assert_eq!(ns, ["pid", "network", "ipc", "uts", "mount"]);
            let dests: Vec<&str> = s["mounts"].as_array().unwrap().iter().map(|m| m["destination"].as_str().unwrap()).collect();
            assert_eq!(dests, ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys"]);
            assert_eq!(s["process"]["capabilities"]["bounding"], json!(CAPABILITIES));
            assert_eq!(s["linux"]["maskedPaths"], json!(MASKED_PATHS));
            assert_eq!(s["linux"]["readonlyPaths"], json!(READONLY_PATHS));
        }
        let root = User { uid: 0, gid: 0, additional_gids: vec![] };
        let s = runtime_spec(&SpecInput { run: &run, args: None, user: &root, readonly: true, hostname: "h", annotations: &[] }).unwrap();
        assert_eq!(s["process"]["user"], json!({"uid": 0, "gid": 0}), "no additionalGids key when there are none");
    }
}
