//! The builders that check bytes against the signed index: `debian-verify` (the InRelease and
//! the `Packages` indices), `debian-available` (the installed packages' stanzas) and
//! `debian-unpack` (one `.deb`).

use std::fs;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context};
use rbuild_engine::builtins::BuildContext;
use sha2::{Digest, Sha256};

use crate::debian::{self, packages};

/// The checks `verify` makes, on a builder with its inputs `[InRelease, index…]` and
/// arguments `args` (`[suite, keyring, fingerprints, sde, index-path…]`): the InRelease
/// signature against the pinned keys, the suite and date, then each index against the signed
/// Release, and only then decompressed. Returns the Release and each index's path and text.
fn signed_indices(
    ctx: &BuildContext,
    args: &[String],
) -> anyhow::Result<(debian::release::Release, Vec<(String, String)>)> {
    let arg = |i: usize| -> anyhow::Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("missing argument {i}"))
    };
    let suite = arg(0)?;
    let keyring = arg(1)?.as_bytes();
    let pinned: Vec<String> = arg(2)?
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let sde: i64 = arg(3)?.parse().context("source date epoch argument")?;
    let inrelease_file = format!("dists/{suite}/InRelease");
    let inrelease =
        fs::read(&ctx.inputs[0]).with_context(|| format!("reading {inrelease_file}"))?;
    let release = debian::release::verify_inrelease(&inrelease_file, &inrelease, keyring, &pinned)?;
    if release.codename != suite && release.suite != suite {
        bail!("{inrelease_file}: suite check failed: expected {suite}, the signed Release says Suite {} / Codename {}", release.suite, release.codename);
    }
    if release.source_date_epoch != sde {
        bail!("{inrelease_file}: date check failed: the lock says SOURCE_DATE_EPOCH {sde}, the signed Release Date {:?} is {}", release.date, release.source_date_epoch);
    }
    let mut indices = Vec::new();
    for (i, path) in args[4..].iter().enumerate() {
        let input = ctx
            .inputs
            .get(i + 1)
            .with_context(|| format!("no input for {path}"))?;
        let bytes = fs::read(input).with_context(|| format!("reading {path}"))?;
        let rel = path
            .strip_prefix(&format!("dists/{suite}/"))
            .unwrap_or(path);
        debian::release::check_file(rel, &bytes, &release)
            .with_context(|| format!("verifying dists/{suite}/{rel}"))?;
        let text = packages::decompress(path, &bytes)?;
        let text = String::from_utf8(text).with_context(|| format!("{path}: not UTF-8"))?;
        indices.push((path.clone(), text));
    }
    Ok((release, indices))
}

/// `debian-verify`: inputs `[InRelease, index…]`; args `[suite, keyring, fingerprints, sde,
/// index-path…]`. Checks the InRelease signature against the pinned keys, the suite and date,
/// and each index against the signed Release. `$out/index` is the compact verified index (one
/// line per package), `$out/release.json` the signed Release fields.
pub(super) fn verify(ctx: &BuildContext) -> anyhow::Result<()> {
    let mut lines = Vec::new();
    let (release, indices) = signed_indices(ctx, &ctx.args)?;
    for (path, text) in indices {
        for p in packages::parse_packages(&path, &text)? {
            lines.push(packages::index_line(&p));
        }
    }
    lines.sort();
    fs::create_dir_all(&ctx.out)?;
    fs::write(ctx.out.join("index"), lines.join("\n") + "\n")?;
    // The same lines, sharded by the first character of the package name, so that each
    // unpack reads a small file instead of the whole index.
    let shards = ctx.out.join("index.d");
    fs::create_dir_all(&shards)?;
    let mut by_shard: std::collections::BTreeMap<String, String> = Default::default();
    for l in &lines {
        let s = by_shard.entry(shard_name(l)).or_default();
        s.push_str(l);
        s.push('\n');
    }
    for (name, text) in by_shard {
        fs::write(shards.join(name), text)?;
    }
    write_release_json(&ctx.out, &release)
}

/// `DIR/release.json`: the signed Release's fields that the SBOMs and the provenance name.
fn write_release_json(dir: &Path, release: &debian::release::Release) -> anyhow::Result<()> {
    let summary = serde_json::json!({
        "suite": release.suite, "codename": release.codename, "version": release.version,
        "date": release.date, "source_date_epoch": release.source_date_epoch, "signed_by": release.signed_by,
    });
    fs::write(
        dir.join("release.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    Ok(())
}

/// `debian-available`: `verify`'s inputs and arguments, then `"--"` and the packages; makes
/// `verify`'s checks itself ([`signed_indices`]), beside it. `$out/available`
/// holds the stanzas of those packages, verbatim and in index order, each ended by an empty
/// line: what debootstrap's `pkgdetails STANZAS` writes to dpkg's `available`;
/// `$out/index`, their verified index lines (as `verify` writes them); and `$out/release.json`
/// as `verify` writes it.
pub(super) fn available(ctx: &BuildContext) -> anyhow::Result<()> {
    let split = ctx
        .args
        .iter()
        .position(|a| a == "--")
        .context("available: no `--` between verify's arguments and the packages")?;
    let wanted: std::collections::HashSet<&str> =
        ctx.args[split + 1..].iter().map(String::as_str).collect();
    let (release, indices) = signed_indices(ctx, &ctx.args[..split])?;
    let (mut out, mut last) = (String::new(), String::new());
    for (_, text) in &indices {
        let before = last.len();
        select_stanzas(text, &wanted, &mut out, &mut last);
        if last.len() > before {
            last.push('\n');
        }
    }
    // The verified index lines of the same stanzas (and of a last one `available` leaves out),
    // which the `.deb`s are checked against.
    let lines = packages::index_text(&packages::parse_packages(
        "available",
        &(out.clone() + &last),
    )?);
    fs::create_dir_all(&ctx.out)?;
    fs::write(ctx.out.join("available"), out)?;
    fs::write(ctx.out.join("index"), lines)?;
    write_release_json(&ctx.out, &release)
}

/// Append to `out` each stanza of `text` whose `Package` is in `wanted`, with the empty line
/// that ends it; a last stanza with no empty line after it, if selected, goes to `last`
/// instead (debootstrap's `available` leaves it out).
fn select_stanzas(
    text: &str,
    wanted: &std::collections::HashSet<&str>,
    out: &mut String,
    last: &mut String,
) {
    let mut start = 0;
    let mut selected = false;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        if let Some(name) = line
            .strip_prefix("Package: ")
            .map(|n| n.trim_end_matches('\n'))
        {
            selected |= wanted.contains(name);
        }
        pos += line.len();
        if line == "\n" {
            if selected {
                out.push_str(&text[start..pos]);
            }
            selected = false;
            start = pos;
        }
    }
    if selected && start < text.len() {
        last.push_str(&text[start..]);
        if !last.ends_with('\n') {
            last.push('\n');
        }
    }
}

pub(super) fn sha256_of(path: &Path) -> anyhow::Result<(String, u64)> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n_total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        n_total += n as u64;
        h.update(&buf[..n]);
    }
    Ok((hex::encode(h.finalize()), n_total))
}

/// The index shard a package name belongs to (its first character).
fn shard_name(name: &str) -> String {
    name.chars()
        .next()
        .map(|c| c.to_string())
        .unwrap_or_else(|| "_".into())
}

/// The verified index lines that can hold `name`.
fn read_index_for(verified: &Path, name: &str) -> anyhow::Result<String> {
    let p = verified.join("index.d").join(shard_name(name));
    match fs::read_to_string(&p) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Check a `.deb` against the sha256 and size the signed index lists for `name` `version` `arch`.
pub(super) fn verify_deb(
    verified: &Path,
    name: &str,
    version: &str,
    arch: &str,
    deb: &Path,
) -> anyhow::Result<()> {
    verify_deb_in(&read_index_for(verified, name)?, name, version, arch, deb)
}

/// [`verify_deb`] against `lines`, verified index lines ([`packages::index_text`]).
pub(super) fn verify_deb_in(
    lines: &str,
    name: &str,
    version: &str,
    arch: &str,
    deb: &Path,
) -> anyhow::Result<()> {
    let entries = packages::lookup_index_line(lines, name);
    let Some(entry) = entries
        .iter()
        .find(|e| e.version == version && e.architecture == arch)
    else {
        bail!(
            "verify: package {name} {version} ({arch}) is not in the signed Packages index (it lists: {})",
            if entries.is_empty() {
                "no such package".to_owned()
            } else {
                entries.iter().map(|e| format!("{} {}", e.version, e.architecture)).collect::<Vec<_>>().join(", ")
            }
        );
    };
    let (sha, size) = sha256_of(deb)?;
    if sha != entry.sha256 || size != entry.size {
        bail!(
            "verify: {}: sha256 check against the signed Packages index failed for {name} {version}: expected {} ({} bytes), got {sha} ({size} bytes)",
            entry.filename, entry.sha256, entry.size
        );
    }
    Ok(())
}

/// `debian-unpack`: inputs `[verified index, .deb]`; args `[name, version, arch]`. Checks the
/// `.deb` against the sha256 the signed index lists for that package, then unpacks it.
pub(super) fn unpack(ctx: &BuildContext) -> anyhow::Result<()> {
    let (name, version, arch) = (ctx.arg(0)?, ctx.arg(1)?, ctx.arg(2)?);
    let deb = &ctx.inputs[1];
    verify_deb(&ctx.inputs[0], name, version, arch, deb)?;
    fs::create_dir_all(&ctx.out)?;
    let meta = rbuild_engine::archive::deb::unpack_deb(deb, &ctx.out)?;
    meta.write(&ctx.meta_out())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stanzas_are_selected_verbatim_in_index_order() {
        let text = "Package: b\nVersion: 1\nDescription: x\n y\n\nPackage: a\nVersion: 2\n\nPackage: c\nVersion: 3\n\nPackage: a-b\nVersion: 4\n";
        let wanted = ["a", "b", "a-b"].into_iter().collect();
        let mut out = String::new();
        let mut last = String::new();
        select_stanzas(text, &wanted, &mut out, &mut last);
        // The last stanza has no empty line after it: left out, as debootstrap leaves it.
        assert_eq!(
            out,
            "Package: b\nVersion: 1\nDescription: x\n y\n\nPackage: a\nVersion: 2\n\n"
        );
        assert_eq!(last, "Package: a-b\nVersion: 4\n");
    }
}
