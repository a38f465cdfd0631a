//! SPDX 2.3 JSON.

use serde_json::{json, Value};

use super::Sbom;

/// An `SPDXRef-` id: `[A-Za-z0-9.-]` kept, anything else as `-` and its hex code (unique).
fn spdx_id(kind: &str, name: &str, arch: &str) -> String {
    let mut id = format!("SPDXRef-{kind}-");
    for c in format!("{name}-{arch}").chars() {
        match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '-' => id.push(c),
            _ => id.push_str(&format!("-{:02X}", c as u32)),
        }
    }
    id
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

pub fn document(s: &Sbom) -> Value {
    let image_id = spdx_id("Image", &s.name, &s.architecture);
    let mut packages = vec![json!({
        "SPDXID": image_id,
        "name": s.name,
        "versionInfo": format!("sha256:{}", s.image_digest),
        "primaryPackagePurpose": "CONTAINER",
        "supplier": "Organization: rbuild",
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "checksums": [{"algorithm": "SHA256", "checksumValue": s.image_digest}],
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "comment": format!("The OCI image manifest of {} for {}", s.name, s.architecture),
    })];
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": image_id,
    })];
    for c in &s.components {
        let id = spdx_id("Package", &c.name, &c.architecture);
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
        relationships.push(json!({
            "spdxElementId": image_id,
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
        for d in &c.depends {
            relationships.push(json!({
                "spdxElementId": id,
                "relationshipType": "DEPENDS_ON",
                "relatedSpdxElement": spdx_id("Package", d, arch_of(s, d)),
            }));
        }
    }
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
    json!({
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
    })
}

/// The architecture of installed package `name`.
fn arch_of<'a>(s: &'a Sbom, name: &str) -> &'a str {
    s.components
        .iter()
        .find(|c| c.name == name)
        .map(|c| c.architecture.as_str())
        .unwrap_or("")
}
