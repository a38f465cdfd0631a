//! The `probe` builder: reports what a sandboxed builder can see and do, as JSON at `$out`.
//! `rbuild doctor` runs it; the tests use it to check the sandbox's isolation.

use std::fs;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::BuildContext;

/// Arguments: `connect=HOST:PORT` (try a TCP connection).
pub fn probe(ctx: &BuildContext) -> anyhow::Result<()> {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default().trim().to_owned();
    let names = |p: &str| {
        let mut v: Vec<String> = fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let interfaces: Vec<String> = read("/proc/net/dev")
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|s| s.trim().to_owned()))
        .collect();
    let mut connects = serde_json::Map::new();
    for a in ctx.args.iter().filter_map(|a| a.strip_prefix("connect=")) {
        let r = match a.to_socket_addrs().map(|mut it| it.next()) {
            Ok(Some(addr)) => match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(_) => "connected".to_owned(),
                Err(e) => format!("failed: {e}"),
            },
            Ok(None) => "failed: no address".to_owned(),
            Err(e) => format!("failed: {e}"),
        };
        connects.insert(a.to_owned(), r.into());
    }
    // What confines this very builder: capabilities, no_new_privs, the seccomp mode.
    let status: serde_json::Map<String, serde_json::Value> = read("/proc/self/status")
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| {
            [
                "CapEff",
                "CapPrm",
                "CapBnd",
                "CapAmb",
                "NoNewPrivs",
                "Seccomp",
            ]
            .contains(k)
        })
        .map(|(k, v)| (k.to_owned(), v.trim().into()))
        .collect();
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    env.sort();
    let report = serde_json::json!({
        "uid": nix::unistd::getuid().as_raw(),
        "gid": nix::unistd::getgid().as_raw(),
        "pid": std::process::id(),
        "uid_map": read("/proc/self/uid_map"),
        "gid_map": read("/proc/self/gid_map"),
        "hostname": nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default(),
        "root": names("/"),
        "dev": names("/dev"),
        "inputs": names("/inputs"),
        "interfaces": interfaces,
        "connect": connects,
        "status": status,
        "env": env.into_iter().map(|(k, v)| (k, serde_json::Value::from(v))).collect::<serde_json::Map<_, _>>(),
    });
    fs::write(&ctx.out, serde_json::to_vec_pretty(&report)?)?;
    Ok(())
}
