//! Writing OCI image layouts (image-spec v1: `oci-layout`, `index.json`, `blobs/sha256/…`).
//!
//! [`write_layout`] takes already-compressed layers and an [`ImageConfig`] and writes the config,
//! the manifest and the index as compact JSON with a fixed field order, so that the same inputs
//! always give the same manifest digest. Debian architecture names are translated to the OCI/Go
//! platform names tools expect (`armhf` → `arm`/`v7`, `i386` → `386`, `ppc64el` → `ppc64le`, …).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ArchiveError;

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_TYPE_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
/// The config of an artifact manifest that has none (image-spec 1.1's empty descriptor).
pub const MEDIA_TYPE_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// The directory, inside an image layout, of the layout that lists its referrers.
pub const REFERRERS_DIR: &str = "referrers";

/// Whether [`write_layout`] copies the layer blobs in, or writes only the config, the manifest
/// and the index (all an image's digest depends on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerBlobs {
    Copy,
    Omit,
}

/// A file to attach to an image as an OCI 1.1 referrer: an artifact manifest of
/// `artifact_type` whose one layer is the file and whose `subject` is the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Referrer {
    pub artifact_type: String,
    pub path: PathBuf,
}

/// One compressed layer, bottom first in a `&[Layer]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// A compressed tar on disk.
    pub blob_path: PathBuf,
    /// Its media type ([`MEDIA_TYPE_LAYER_GZIP`] or [`MEDIA_TYPE_LAYER_ZSTD`]).
    pub media_type: String,
    /// `sha256:…` of the uncompressed tar.
    pub diff_id: String,
    /// `sha256:…` of the compressed blob.
    pub digest: String,
    /// Size of the compressed blob in bytes.
    pub size: u64,
    /// The history line of this layer.
    pub created_by: String,
}

/// What goes into the image config besides the layers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Debian (`amd64`, `armhf`, …) or OCI (`arm`, `386`, …) architecture name.
    pub architecture: String,
    pub os: String,
    /// RFC 3339 creation time, normally [`rfc3339`] of SOURCE_DATE_EPOCH.
    pub created: String,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The OCI (GOARCH-style) architecture and variant for a Debian architecture name; names that are
/// not Debian-specific pass through unchanged.
pub fn oci_platform(arch: &str) -> (&str, Option<&'static str>) {
    match arch {
        "arm64" => ("arm64", Some("v8")),
        "armhf" => ("arm", Some("v7")),
        "armel" => ("arm", Some("v5")),
        "i386" => ("386", None),
        "ppc64el" => ("ppc64le", None),
        "mips64el" => ("mips64le", None),
        "mipsel" => ("mipsle", None),
        other => (other, None),
    }
}

/// Write an OCI image layout of `layers` (bottom first) and `config` into `out` (created if
/// missing). With [`LayerBlobs::Copy`], layer blobs are copied in and verified against their
/// descriptor. With `ref_name`, the index entry carries it as `org.opencontainers.image.ref.name`.
/// Returns the manifest digest (`sha256:…`).
pub fn write_layout(
    out: &Path,
    layers: &[Layer],
    config: &ImageConfig,
    ref_name: Option<&str>,
    blobs_mode: LayerBlobs,
) -> Result<String, ArchiveError> {
    let blobs = start_layout(out, ref_name)?;

    for layer in layers {
        check_digest(&layer.diff_id).map_err(malformed(&layer.blob_path))?;
        if blobs_mode == LayerBlobs::Copy {
            copy_blob(layer, &blobs)?;
        }
    }

    let (arch, variant) = oci_platform(&config.architecture);
    let config_json = ConfigJson {
        created: &config.created,
        architecture: arch,
        variant,
        os: &config.os,
        config: ExecConfig {
            user: config.user.as_deref().filter(|s| !s.is_empty()),
            env: &config.env,
            entrypoint: config.entrypoint.as_deref(),
            cmd: config.cmd.as_deref(),
            working_dir: config.working_dir.as_deref().filter(|s| !s.is_empty()),
            labels: &config.labels,
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids: layers.iter().map(|l| l.diff_id.as_str()).collect(),
        },
        history: layers
            .iter()
            .map(|l| History {
                created: &config.created,
                created_by: &l.created_by,
            })
            .collect(),
    };
    let config_desc = write_json_blob(&blobs, MEDIA_TYPE_CONFIG, &config_json)?;

    let manifest = Manifest {
        schema_version: 2,
        media_type: MEDIA_TYPE_MANIFEST,
        config: config_desc,
        layers: layers
            .iter()
            .map(|l| Descriptor {
                media_type: &l.media_type,
                digest: l.digest.clone(),
                size: l.size,
                platform: None,
                annotations: BTreeMap::new(),
            })
            .collect(),
    };
    let mut manifest_desc = write_json_blob(&blobs, MEDIA_TYPE_MANIFEST, &manifest)?;
    let digest = manifest_desc.digest.clone();
    manifest_desc.platform = Some(Platform {
        architecture: arch,
        os: &config.os,
        variant,
    });
    if let Some(r) = ref_name {
        manifest_desc
            .annotations
            .insert(ANNOTATION_REF_NAME.to_owned(), r.to_owned());
    }
    let index = Index {
        schema_version: 2,
        media_type: MEDIA_TYPE_INDEX,
        manifests: vec![manifest_desc],
    };
    write_file(&out.join("index.json"), &to_json(&index)?)?;
    Ok(digest)
}

/// Write an OCI image layout holding one multi-platform image: the single-image layouts
/// `images` (as [`write_layout`] makes them) merged, their blobs copied in, and `index.json`
/// naming one image index (carrying `ref_name`) that lists each image's manifest with its
/// platform — the form `podman pull --arch ARCH oci:DIR` chooses from. Returns the digest of
/// that image index.
pub fn write_multi_platform_layout(
    out: &Path,
    images: &[&Path],
    ref_name: Option<&str>,
) -> Result<String, ArchiveError> {
    let blobs = start_layout(out, ref_name)?;
    let mut manifests = Vec::new();
    let mut referrers = Vec::new();
    for image in images {
        let index = read_json(&image.join("index.json"))?;
        referrers.extend(listed_referrers(image)?);
        for m in index["manifests"].as_array().into_iter().flatten() {
            let mut m = m.clone();
            if let Some(o) = m.as_object_mut() {
                o.remove("annotations");
            }
            manifests.push(m);
        }
        let from = image.join("blobs").join("sha256");
        let entries = fs::read_dir(&from).map_err(|e| ArchiveError::io(&from, e))?;
        for e in entries {
            let e = e.map_err(|e| ArchiveError::io(&from, e))?;
            let dst = blobs.join(e.file_name());
            if !dst.exists() {
                fs::copy(e.path(), &dst).map_err(|err| ArchiveError::io(&dst, err))?;
            }
        }
    }
    let inner = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": manifests,
    });
    let mut desc = write_json_blob(&blobs, MEDIA_TYPE_INDEX, &inner)?;
    let digest = desc.digest.clone();
    if let Some(r) = ref_name {
        desc.annotations
            .insert(ANNOTATION_REF_NAME.to_owned(), r.to_owned());
    }
    let index = Index {
        schema_version: 2,
        media_type: MEDIA_TYPE_INDEX,
        manifests: vec![desc],
    };
    let top = serde_json::to_value(&index.manifests[0]).map_err(|e| ArchiveError::Codec {
        what: "OCI JSON".into(),
        problem: e.to_string(),
    })?;
    write_file(&out.join("index.json"), &to_json(&index)?)?;
    if !referrers.is_empty() {
        // Each image's referrers name that image's manifest, which the index lists.
        write_referrers_layout(out, top, referrers)?;
    }
    Ok(digest)
}

/// Attach `referrers` to the one image the layout `out` holds, as OCI 1.1 referrers: for each, the
/// file as a blob and an artifact manifest (`artifactType`, the empty config, the file as its one
/// layer, `subject` the image, `created` as its creation annotation), in `out`'s blobs.
///
/// `out/index.json` keeps listing the image alone: podman and skopeo (containers/image) refuse
/// `oci:DIR` when it lists more than one manifest, and umoci refuses a tag whose index reaches
/// more than one. The referrers are listed instead in a second layout, `out/referrers/`, that
/// shares `out`'s blobs (`blobs` is the link `../blobs`) and lists the image (with its ref.name)
/// and every artifact manifest — the layout ORAS reads referrers from, and copies to a registry
/// with them. Returns the artifact manifests' digests.
pub fn attach_referrers(
    out: &Path,
    referrers: &[Referrer],
    created: &str,
) -> Result<Vec<String>, ArchiveError> {
    let (top, subject) = single_top_descriptor(out)?;
    let blobs = out.join("blobs").join("sha256");
    let empty = write_bytes_blob(&blobs, b"{}")?;
    let mut artifacts = Vec::new();
    let mut digests = Vec::new();
    for r in referrers {
        let bytes = fs::read(&r.path).map_err(|e| ArchiveError::io(&r.path, e))?;
        let file = write_bytes_blob(&blobs, &bytes)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "artifactType": r.artifact_type,
            "config": {
                "mediaType": MEDIA_TYPE_EMPTY,
                "digest": empty.0,
                "size": empty.1,
                "data": "e30=",
            },
            "layers": [{
                "mediaType": r.artifact_type,
                "digest": file.0,
                "size": file.1,
            }],
            "subject": subject,
            "annotations": {ANNOTATION_CREATED: created},
        });
        let (digest, size) = write_bytes_blob(&blobs, &to_json(&manifest)?)?;
        artifacts.push(serde_json::json!({
            "mediaType": MEDIA_TYPE_MANIFEST,
            "digest": digest,
            "size": size,
            "artifactType": r.artifact_type,
            "annotations": {ANNOTATION_CREATED: created},
        }));
        digests.push(digest);
    }
    write_referrers_layout(out, top, artifacts)?;
    Ok(digests)
}

/// The artifact-manifest descriptors `layout`'s `referrers/` lists (none when it has none).
fn listed_referrers(layout: &Path) -> Result<Vec<serde_json::Value>, ArchiveError> {
    let path = layout.join(REFERRERS_DIR).join("index.json");
    if !path.exists() {
        return Ok(vec![]);
    }
    let index = read_json(&path)?;
    Ok(index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m.get("artifactType").is_some())
        .cloned()
        .collect())
}

/// Write `out/referrers/`: an image layout sharing `out`'s blobs, listing `top` (the image, as
/// `out/index.json` lists it) then `artifacts`.
fn write_referrers_layout(
    out: &Path,
    top: serde_json::Value,
    artifacts: Vec<serde_json::Value>,
) -> Result<(), ArchiveError> {
    let dir = out.join(REFERRERS_DIR);
    fs::create_dir_all(&dir).map_err(|e| ArchiveError::io(&dir, e))?;
    write_file(
        &dir.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let link = dir.join("blobs");
    std::os::unix::fs::symlink("../blobs", &link).map_err(|e| ArchiveError::io(&link, e))?;
    let mut manifests = vec![top];
    manifests.extend(artifacts);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": manifests,
    });
    write_file(&dir.join("index.json"), &to_json(&index)?)
}

/// The sha256 (hex) of the one image (manifest or index) `layout`'s `index.json` lists.
pub fn image_digest(layout: &Path) -> Result<String, ArchiveError> {
    let (_, bare) = single_top_descriptor(layout)?;
    let digest = bare["digest"].as_str().unwrap_or_default();
    check_digest(digest)
        .map(str::to_owned)
        .map_err(malformed(&layout.join("index.json")))
}

/// `layout`'s one `index.json` entry, whole, and as a bare descriptor (media type, digest, size).
fn single_top_descriptor(
    layout: &Path,
) -> Result<(serde_json::Value, serde_json::Value), ArchiveError> {
    let path = layout.join("index.json");
    let index = read_json(&path)?;
    match index["manifests"].as_array().map(Vec::as_slice) {
        Some([m]) => {
            let bare = serde_json::json!({
                "mediaType": m["mediaType"],
                "digest": m["digest"],
                "size": m["size"],
            });
            Ok((m.clone(), bare))
        }
        _ => Err(ArchiveError::Codec {
            what: format!("{} (an OCI index)", path.display()),
            problem: "expected exactly one image in \"manifests\"".into(),
        }),
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, ArchiveError> {
    let bytes = fs::read(path).map_err(|e| ArchiveError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Codec {
        what: format!("{} (OCI JSON)", path.display()),
        problem: e.to_string(),
    })
}

/// Store `bytes` as a blob; returns its digest (`sha256:…`) and size.
fn write_bytes_blob(blobs: &Path, bytes: &[u8]) -> Result<(String, u64), ArchiveError> {
    let hex = hex::encode(Sha256::digest(bytes));
    write_file(&blobs.join(&hex), bytes)?;
    Ok((format!("sha256:{hex}"), bytes.len() as u64))
}

/// Check `ref_name`, create `out`'s blob directory and its `oci-layout`; returns the blob
/// directory.
fn start_layout(out: &Path, ref_name: Option<&str>) -> Result<std::path::PathBuf, ArchiveError> {
    if let Some(r) = ref_name {
        check_ref_name(r).map_err(malformed(out))?;
    }
    let blobs = out.join("blobs").join("sha256");
    fs::create_dir_all(&blobs).map_err(|e| ArchiveError::io(&blobs, e))?;
    write_file(
        &out.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(blobs)
}

/// The sha256 (lowercase hex, no `sha256:` prefix) and size of a file.
pub fn sha256_file(path: &Path) -> Result<(String, u64), ArchiveError> {
    let mut f = File::open(path).map_err(|e| ArchiveError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0; 1 << 17];
    let mut size = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ArchiveError::io(path, e)),
        };
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(h.finalize()), size))
}

/// `epoch` (seconds since 1970, UTC) as RFC 3339: `2021-05-01T12:34:56Z`.
pub fn rfc3339(epoch: i64) -> String {
    let days = epoch.div_euclid(86_400);
    let secs = epoch.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[derive(Serialize)]
struct Platform<'a> {
    architecture: &'a str,
    os: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
}

#[derive(Serialize)]
struct Descriptor<'a> {
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    digest: String,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<Platform<'a>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct Manifest<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    config: Descriptor<'a>,
    layers: Vec<Descriptor<'a>>,
}

#[derive(Serialize)]
struct Index<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    manifests: Vec<Descriptor<'a>>,
}

#[derive(Serialize)]
struct ConfigJson<'a> {
    created: &'a str,
    architecture: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
    os: &'a str,
    config: ExecConfig<'a>,
    rootfs: RootFs<'a>,
    history: Vec<History<'a>>,
}

#[derive(Serialize)]
struct ExecConfig<'a> {
    #[serde(rename = "User", skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(rename = "Env", skip_serializing_if = "<[String]>::is_empty")]
    env: &'a [String],
    #[serde(rename = "Entrypoint", skip_serializing_if = "Option::is_none")]
    entrypoint: Option<&'a [String]>,
    #[serde(rename = "Cmd", skip_serializing_if = "Option::is_none")]
    cmd: Option<&'a [String]>,
    #[serde(rename = "WorkingDir", skip_serializing_if = "Option::is_none")]
    working_dir: Option<&'a str>,
    #[serde(rename = "Labels", skip_serializing_if = "BTreeMap::is_empty")]
    labels: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
struct RootFs<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    diff_ids: Vec<&'a str>,
}

#[derive(Serialize)]
struct History<'a> {
    created: &'a str,
    created_by: &'a str,
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, ArchiveError> {
    serde_json::to_vec(v).map_err(|e| ArchiveError::Codec {
        what: "OCI JSON".into(),
        problem: e.to_string(),
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ArchiveError> {
    fs::write(path, bytes).map_err(|e| ArchiveError::io(path, e))
}

/// Serialize `v`, store it as a blob and return its descriptor.
fn write_json_blob<'a, T: Serialize>(
    blobs: &Path,
    media_type: &'a str,
    v: &T,
) -> Result<Descriptor<'a>, ArchiveError> {
    let bytes = to_json(v)?;
    let hex = hex::encode(Sha256::digest(&bytes));
    write_file(&blobs.join(&hex), &bytes)?;
    Ok(Descriptor {
        media_type,
        digest: format!("sha256:{hex}"),
        size: bytes.len() as u64,
        platform: None,
        annotations: BTreeMap::new(),
    })
}

/// A digest or reference name that is not one.
#[derive(Debug, thiserror::Error)]
pub enum Malformed {
    #[error("{0:?} is not a sha256 digest")]
    Digest(String),
    #[error("{0:?} is not a valid OCI reference name")]
    RefName(String),
}

/// `sha256:` followed by 64 lowercase hex digits; returns the hex.
fn check_digest(d: &str) -> Result<&str, Malformed> {
    match d.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => {
            Ok(h)
        }
        _ => Err(Malformed::Digest(d.to_owned())),
    }
}

/// The ref.name grammar of the image-layout spec, loosely: non-empty, of `A-Za-z0-9._:@/+-`.
fn check_ref_name(r: &str) -> Result<(), Malformed> {
    let ok = !r.is_empty()
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@/+-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Malformed::RefName(r.to_owned()))
    }
}

fn malformed(path: &Path) -> impl FnOnce(Malformed) -> ArchiveError + '_ {
    move |source| ArchiveError::Malformed {
        path: path.to_owned(),
        source,
    }
}

/// Copy a layer blob into `blobs`, hashing on the way, and check it against its descriptor.
fn copy_blob(layer: &Layer, blobs: &Path) -> Result<(), ArchiveError> {
    let src = &layer.blob_path;
    let hex = check_digest(&layer.digest).map_err(malformed(src))?;
    let dst = blobs.join(hex);
    let tmp = blobs.join(format!(".{hex}.tmp"));
    let res = (|| {
        let mut r = File::open(src).map_err(|e| ArchiveError::io(src, e))?;
        let mut w = File::create(&tmp).map_err(|e| ArchiveError::io(&tmp, e))?;
        let mut h = Sha256::new();
        let mut buf = vec![0; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ArchiveError::io(src, e)),
            };
            h.update(&buf[..n]);
            w.write_all(&buf[..n])
                .map_err(|e| ArchiveError::io(&tmp, e))?;
            size += n as u64;
        }
        let got = hex::encode(h.finalize());
        if got != hex || size != layer.size {
            return Err(ArchiveError::tree(
                src,
                format!(
                    "layer blob is sha256:{got} ({size} bytes), but its descriptor says {} ({} bytes)",
                    layer.digest, layer.size
                ),
            ));
        }
        fs::rename(&tmp, &dst).map_err(|e| ArchiveError::io(&dst, e))
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn platform_names() {
        assert_eq!(oci_platform("armhf"), ("arm", Some("v7")));
        assert_eq!(oci_platform("i386"), ("386", None));
        assert_eq!(oci_platform("amd64"), ("amd64", None));
    }

    #[test]
    fn ref_names() {
        assert!(check_ref_name("bullseye-minbase:1.0").is_ok());
        assert!(check_ref_name("").is_err());
        assert!(check_ref_name("a b").is_err());
    }
}
