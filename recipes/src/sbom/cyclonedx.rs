//! CycloneDX 1.6 JSON.

use serde_json::{json, Value};

use super::Sbom;

pub fn document(s: &Sbom) -> Value {
    let image_ref = format!("image:{}-{}", s.name, s.architecture);
    let components: Vec<Value> = s
        .components
        .iter()
        .map(|c| {
            let mut v = json!({
                "type": "library",
                "bom-ref": c.purl,
                "name": c.name,
                "version": c.version,
                "supplier": {"name": c.maintainer},
                "purl": c.purl,
                "hashes": [{"alg": "SHA-256", "content": c.sha256}],
                "properties": [
                    {"name": "debian:source", "value": c.source},
                    {"name": "debian:source_version", "value": c.source_version},
                    {"name": "debian:architecture", "value": c.architecture},
                    {"name": "rbuild:layer", "value": (c.layer + 1).to_string()},
                ],
            });
            if let Some(l) = &c.license {
                v["licenses"] = json!([{"expression": l}]);
            }
            v
        })
        .collect();
    let components: Vec<Value> = components
        .into_iter()
        .chain(s.files.iter().map(|f| {
            json!({
                "type": "file",
                "bom-ref": format!("file:{}:{}", f.layer + 1, f.path),
                "name": f.path,
                "hashes": [
                    {"alg": "SHA-1", "content": f.sha1},
                    {"alg": "SHA-256", "content": f.sha256},
                ],
                "properties": [{"name": "rbuild:layer", "value": (f.layer + 1).to_string()}],
            })
        }))
        .collect();
    let layers: Vec<Value> = s
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            json!({"name": format!("rbuild:layer:{}", i + 1), "value": format!("sha256:{} {}", l.digest, l.description)})
        })
        .collect();
    let purl_of = |name: &str| {
        s.components
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.purl.clone())
    };
    let mut dependencies = vec![json!({
        "ref": image_ref,
        "dependsOn": s.components.iter().map(|c| c.purl.clone()).collect::<Vec<_>>(),
    })];
    for c in &s.components {
        dependencies.push(json!({
            "ref": c.purl,
            "dependsOn": c.depends.iter().filter_map(|d| purl_of(d)).collect::<Vec<_>>(),
        }));
    }
    json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": format!("urn:uuid:{}", s.uuid("cyclonedx")),
        "version": 1,
        "metadata": {
            "timestamp": s.timestamp(),
            "tools": {"components": [{
                "type": "application",
                "name": "rbuild",
                "version": s.tool_version,
            }]},
            "component": {
                "type": "container",
                "bom-ref": image_ref,
                "name": s.name,
                "version": format!("sha256:{}", s.image_digest),
                "hashes": [{"alg": "SHA-256", "content": s.image_digest}],
                "properties": layers,
            },
        },
        "components": components,
        "dependencies": dependencies,
    })
}
