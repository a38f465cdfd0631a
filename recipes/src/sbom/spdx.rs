//! SPDX 2.3 JSON.

use serde_json::{json, Value};

use super::Sbom;

/// An `SPDXRef-` id: `[A-Za-z0-9.-]` kept, anything else as `-` and its hex code (unique).
fn spdx_id(kind: &str, name: &str) -> String {
    let mut id = format!("SPDXRef-{kind}-");
    for c in name.chars() {
        match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '-' => id.push(c),
            _ => id.push_str(&format!("-{:02X}", c as u32)),
        }
    }
    id
}

fn package_id(name: &str, arch: &str) -> String {
    spdx_id("Package", &format!("{name}-{arch}"))
}

/// `Name <email>` as an SPDX supplier (`Organization: Name (email)`).
fn supplier(maintainer: &str) -> String {
    match maintainer.split_once('<') {
        Some((name, rest)) => format!(
            "Organization: {} ({})",
            name.trim(),
            rest.trim_end_matches('>').trim()
        ),
        None if maintainer.trim().is_empty() => "NOASSERTION".into(),
        None => format!("Organization: {}", maintainer.trim()),
    }
}

fn relationship(from: &str, kind: &str, to: &str) -> Value {
    json!({"spdxElementId": from, "relationshipType": kind, "relatedSpdxElement": to})
}

/// A package rbuild made (the image, a layer), identified by the sha256 of its blob.
fn blob_package(id: &str, name: &str, sha256: &str, purpose: &str, comment: &str) -> Value {
    json!({
        "SPDXID": id,
        "name": name,
        "versionInfo": format!("sha256:{sha256}"),
        "primaryPackagePurpose": purpose,
        "supplier": "Organization: rbuild",
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "checksums": [{"algorithm": "SHA256", "checksumValue": sha256}],
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "comment": comment,
    })
}

pub fn document(s: &Sbom) -> Value {
    let image_id = spdx_id("Image", &format!("{}-{}", s.name, s.architecture));
    let mut packages = vec![blob_package(
        &image_id,
        &s.name,
        &s.image_digest,
        "CONTAINER",
        &format!(
            "The OCI image manifest of {} for {}",
            s.name, s.architecture
        ),
    )];
    let mut relationships = vec![relationship("SPDXRef-DOCUMENT", "DESCRIBES", &image_id)];
    // Each layer is a package the image contains; what a layer installed or copied, it contains.
    let layer_ids: Vec<String> = s
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let id = spdx_id("Layer", &(i + 1).to_string());
            // A package that contains files must say its files were analysed, with their
            // verification code (SPDX 2.3 §7.9: the SHA-1 of its files' sorted SHA-1s).
            let mut sha1s: Vec<&str> = s
                .files
                .iter()
                .filter(|f| f.layer == i)
                .map(|f| f.sha1.as_str())
                .collect();
            sha1s.sort();
            let mut layer = blob_package(
                &id,
                &format!("{} layer {}", s.name, i + 1),
                &l.digest,
                "ARCHIVE",
                &l.description,
            );
            if !sha1s.is_empty() {
                use sha1::Digest;
                let code = hex::encode(sha1::Sha1::digest(sha1s.concat().as_bytes()));
                layer["filesAnalyzed"] = json!(true);
                layer["packageVerificationCode"] = json!({"packageVerificationCodeValue": code});
                layer["licenseInfoFromFiles"] = json!(["NOASSERTION"]);
            }
            packages.push(layer);
            relationships.push(relationship(&image_id, "CONTAINS", &id));
            id
        })
        .collect();
    let container_of = |layer: usize| layer_ids.get(layer).unwrap_or(&image_id).clone();
    for c in &s.components {
        let id = package_id(&c.name, &c.architecture);
        packages.push(json!({
            "SPDXID": id,
            "name": c.name,
            "versionInfo": c.version,
            "supplier": supplier(&c.maintainer),
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "checksums": [{"algorithm": "SHA256", "checksumValue": c.sha256}],
            "sourceInfo": format!("built package from: {} {}", c.source, c.source_version),
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": c.license.as_deref().unwrap_or("NOASSERTION"),
            "copyrightText": "NOASSERTION",
            "primaryPackagePurpose": "LIBRARY",
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": c.purl,
            }],
        }));
        relationships.push(relationship(&container_of(c.layer), "CONTAINS", &id));
        for d in &c.depends {
            relationships.push(relationship(
                &id,
                "DEPENDS_ON",
                &package_id(d, arch_of(s, d)),
            ));
        }
    }
    let files: Vec<Value> = s
        .files
        .iter()
        .map(|f| {
            let id = spdx_id("File", &format!("{}{}", f.layer + 1, f.path));
            relationships.push(relationship(&container_of(f.layer), "CONTAINS", &id));
            json!({
                "SPDXID": id,
                "fileName": format!(".{}", f.path),
                "checksums": [
                    {"algorithm": "SHA1", "checksumValue": f.sha1},
                    {"algorithm": "SHA256", "checksumValue": f.sha256},
                ],
                "licenseConcluded": "NOASSERTION",
                "copyrightText": "NOASSERTION",
            })
        })
        .collect();
    let extracted: Vec<Value> = s
        .license_refs
        .iter()
        .map(|(id, text)| {
            json!({
                "licenseId": id,
                "name": id.trim_start_matches("LicenseRef-"),
                "extractedText": text,
            })
        })
        .collect();
    let mut doc = json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("{}-{}", s.name, s.architecture),
        "documentNamespace": format!("urn:uuid:{}", s.uuid("spdx")),
        "creationInfo": {
            "created": s.timestamp(),
            "creators": [format!("Tool: rbuild-{}", s.tool_version)],
        },
        "packages": packages,
        "relationships": relationships,
        "hasExtractedLicensingInfos": extracted,
    });
    if !files.is_empty() {
        doc["files"] = Value::Array(files);
    }
    doc
}

/// The architecture of installed package `name`.
fn arch_of<'a>(s: &'a Sbom, name: &str) -> &'a str {
    s.components
        .iter()
        .find(|c| c.name == name)
        .map(|c| c.architecture.as_str())
        .unwrap_or("")
}
