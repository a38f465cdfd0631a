//! A registry's credentials, found where podman, skopeo and Docker keep them, and whether it may
//! be spoken to in plain HTTP.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;

use super::RegistryError;

/// The files credentials are read from, first first: `$REGISTRY_AUTH_FILE`,
/// `$XDG_RUNTIME_DIR/containers/auth.json` (podman's and skopeo's), `$DOCKER_CONFIG/config.json`
/// or else `~/.docker/config.json` (Docker's).
pub(super) fn auth_files() -> Vec<PathBuf> {
    auth_files_in(|k| std::env::var_os(k))
}

/// [`auth_files`] with the environment read through `env`.
fn auth_files_in(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Vec<PathBuf> {
    let var = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let mut files = Vec::new();
    files.extend(var("REGISTRY_AUTH_FILE"));
    files.extend(var("XDG_RUNTIME_DIR").map(|d| d.join("containers/auth.json")));
    match var("DOCKER_CONFIG") {
        Some(d) => files.push(d.join("config.json")),
        None => files.extend(var("HOME").map(|h| h.join(".docker/config.json"))),
    }
    files
}

/// The credentials for `host` (`HOST[:PORT]`) in the first of `files` that has any: an
/// `auths` key equal to the host, or to the host with a scheme in front (`https://HOST`), whose
/// `auth` is base64 `USER:PASSWORD`. None: anonymous.
pub(super) fn credentials(host: &str, files: &[PathBuf]) -> Result<RegistryAuth, RegistryError> {
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(RegistryError::AuthFile {
                    path: file.clone(),
                    source: AuthFileError::Read(source),
                })
            }
        };
        if let Some(auth) = in_file(host, file, &text)? {
            return Ok(auth);
        }
    }
    Ok(RegistryAuth::Anonymous)
}

fn in_file(host: &str, file: &Path, text: &str) -> Result<Option<RegistryAuth>, RegistryError> {
    let bad = |source: AuthFileError| RegistryError::AuthFile {
        path: file.to_owned(),
        source,
    };
    let doc: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(AuthFileError::NotJson(e)))?;
    let Some(auths) = doc.get("auths").and_then(|a| a.as_object()) else {
        return Ok(None);
    };
    let entry = auths.iter().find_map(|(key, v)| {
        let k = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/');
        (k == host || k.strip_suffix("/v2").is_some_and(|k| k == host)).then_some(v)
    });
    let Some(encoded) = entry.and_then(|e| e.get("auth")).and_then(|a| a.as_str()) else {
        return Ok(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|source| {
            bad(AuthFileError::NotBase64 {
                host: host.to_owned(),
                source,
            })
        })?;
    let decoded = String::from_utf8(decoded)
        .map_err(|_| bad(AuthFileError::NotUserPassword(host.to_owned())))?;
    let (user, password) = decoded
        .split_once(':')
        .ok_or_else(|| bad(AuthFileError::NotUserPassword(host.to_owned())))?;
    Ok(Some(RegistryAuth::Basic(
        user.to_owned(),
        password.to_owned(),
    )))
}

static INSECURE: OnceLock<Vec<String>> = OnceLock::new();

/// The hosts (`HOST[:PORT]`, as in `config.toml`'s `insecure-registries`) that may be spoken to
/// in plain HTTP besides loopback ones. Set once, before any registry cache is opened.
pub fn allow_plain_http(hosts: &[String]) {
    let _ = INSECURE.set(hosts.to_vec());
}

/// Whether `host` (`HOST[:PORT]`) is spoken to in plain HTTP: a loopback host, or one listed
/// in `insecure-registries`.
pub(super) fn plain_http(host: &str) -> bool {
    plain_http_in(host, INSECURE.get().map_or(&[], Vec::as_slice))
}

/// [`plain_http`] with `listed` as the `insecure-registries` (each `HOST` or `HOST:PORT`).
fn plain_http_in(host: &str, listed: &[String]) -> bool {
    let name = match host.rsplit_once(':') {
        Some((n, port)) if port.chars().all(|c| c.is_ascii_digit()) => n,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let loopback = name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    loopback || listed.iter().any(|h| h == host || h == name)
}

/// What is wrong with a credentials file.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("cannot read it")]
    Read(#[source] std::io::Error),
    #[error("not JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("auths.{host}.auth is not base64")]
    NotBase64 {
        host: String,
        #[source]
        source: base64::DecodeError,
    },
    #[error("auths.{0}.auth is not base64 of USER:PASSWORD")]
    NotUserPassword(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_from_the_first_file_naming_the_host() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("auth.json"), t.path().join("config.json"));
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        std::fs::write(
            &a,
            format!(
                r#"{{"auths":{{"other:5000":{{"auth":"{}"}}}}}}"#,
                enc("x:y")
            ),
        )
        .unwrap();
        std::fs::write(
            &b,
            format!(
                r#"{{"auths":{{"https://reg.test:5000":{{"auth":"{}"}}}}}}"#,
                enc("alice:s3:cret")
            ),
        )
        .unwrap();
        let files = [t.path().join("missing.json"), a.clone(), b];
        match credentials("reg.test:5000", &files).unwrap() {
            RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), ("alice", "s3:cret")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            credentials("nowhere:1", &files).unwrap(),
            RegistryAuth::Anonymous
        ));
        std::fs::write(&a, r#"{"auths":{"reg.test:5000":{"auth":"%%%"}}}"#).unwrap();
        let err = credentials("reg.test:5000", &files)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("auth.json") && err.contains("not base64"),
            "{err}"
        );
    }

    #[test]
    fn plain_http_only_for_loopback_and_listed_hosts() {
        assert!(plain_http("127.0.0.1:5000"));
        assert!(plain_http("localhost:5000"));
        assert!(plain_http("[::1]:5000"));
        assert!(!plain_http("registry.test:5000"));
        assert!(!plain_http("10.0.0.1"));
        let listed = ["registry.test".to_owned(), "cache.test:5000".to_owned()];
        // A listed name allows every port; a listed HOST:PORT only that port.
        assert!(plain_http_in("registry.test:5000", &listed));
        assert!(plain_http_in("registry.test", &listed));
        assert!(plain_http_in("cache.test:5000", &listed));
        assert!(!plain_http_in("cache.test:5001", &listed));
        assert!(!plain_http_in("cache.test", &listed));
        assert!(!plain_http_in("other.test:5000", &listed));
        assert!(plain_http_in("127.0.0.1:5000", &[]));
    }

    #[test]
    fn auth_files_are_read_in_podmans_order_then_dockers() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        const ALL: &[(&str, &str)] = &[
            ("REGISTRY_AUTH_FILE", "/a/auth.json"),
            ("XDG_RUNTIME_DIR", "/run/user/7"),
            ("DOCKER_CONFIG", "/d"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(
            auth_files_in(env(ALL)),
            [
                "/a/auth.json",
                "/run/user/7/containers/auth.json",
                "/d/config.json"
            ]
            .map(PathBuf::from)
        );
        // Without DOCKER_CONFIG, Docker's file in the home directory; empty values count as unset.
        assert_eq!(
            auth_files_in(env(&[
                ("REGISTRY_AUTH_FILE", ""),
                ("XDG_RUNTIME_DIR", "/run/user/7"),
                ("HOME", "/home/u"),
            ])),
            [
                "/run/user/7/containers/auth.json",
                "/home/u/.docker/config.json"
            ]
            .map(PathBuf::from)
        );
        assert!(auth_files_in(env(&[])).is_empty());
    }
}
