//! Hot paths: hashing a derivation, hashing a tree for registration, writing a deterministic tar.

use std::collections::BTreeMap;
use std::fs;

use criterion::{criterion_group, criterion_main, Criterion};
use rbuild_engine::{Derivation, FixedOutput, Stage};
use rbuild_store::meta::{EntryMeta, TreeMeta};

fn root_owned(mode: u32) -> EntryMeta {
    EntryMeta::root(mode, 0)
}

fn tree() -> (tempfile::TempDir, TreeMeta) {
    let t = tempfile::tempdir().unwrap();
    let mut meta = TreeMeta::default();
    meta.entries.insert(String::new(), root_owned(0o755));
    for d in 0..20 {
        let dir = format!("d{d}");
        fs::create_dir(t.path().join(&dir)).unwrap();
        meta.entries.insert(dir.clone(), root_owned(0o755));
        for f in 0..50 {
            let rel = format!("{dir}/f{f}");
            fs::write(t.path().join(&rel), vec![f as u8; 4096 + f * 100]).unwrap();
            meta.entries.insert(rel, root_owned(0o644));
        }
    }
    (t, meta)
}

fn benches(c: &mut Criterion) {
    let drv = Derivation {
        name: "bash_5.1-2+deb11u1_amd64.deb".into(),
        stage: Stage::Fetch,
        builder: "builtin:fetch".into(),
        args: vec!["pool/main/b/bash/bash_5.1-2+deb11u1_amd64.deb".into()],
        env: BTreeMap::new(),
        inputs: vec![],
        system: None,
        fixed_output: Some(FixedOutput {
            sha256: "ab".repeat(32),
            size: 1_500_000,
        }),
    };
    c.bench_function("derivation_hash", |b| b.iter(|| drv.hash()));
    let (t, meta) = tree();
    c.bench_function("content_hash_1000_files", |b| {
        b.iter(|| rbuild_store::hash::content_hash(t.path(), Some(&meta)).unwrap())
    });
    c.bench_function("write_tar_1000_files", |b| {
        b.iter(|| {
            rbuild_engine::archive::tar_out::write_tar(
                t.path(),
                &meta,
                1_700_000_000,
                std::io::sink(),
            )
            .unwrap()
        })
    });
}

criterion_group!(hot_paths, benches);
criterion_main!(hot_paths);
