//! Property tests of what a cache client must hold whatever a cache sends: signed entries
//! survive a JSON round trip (so a server that re-encodes nothing it does not understand cannot
//! break a signature), and no entry, however crafted, makes `fetch` write outside its output.

use std::fs;
use std::path::Path;

use proptest::prelude::*;
use proptest::strategy::ValueTree;

use super::*;

fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => Just("a".to_owned()),
        6 => Just("b".to_owned()),
        1 => Just("..".to_owned()),
        1 => Just(".".to_owned()),
        1 => Just(String::new()),
    ]
}

/// Mostly short relative paths over a two-letter alphabet (so nodes collide), sometimes an
/// absolute one into the directory the test watches.
fn rel_path(outside: String) -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(component(), 1..4),
        proptest::bool::weighted(0.1),
    )
        .prop_map(move |(parts, absolute)| {
            let p = parts.join("/");
            if absolute {
                format!("{outside}/{p}")
            } else {
                p
            }
        })
}

/// A node whose file contents are one of a few blobs the test cache holds.
fn node(blobs: Vec<BlobRef>, outside: String) -> impl Strategy<Value = CacheNode> {
    let p = || rel_path(outside.clone());
    let target = prop_oneof![
        p(),
        Just(outside.clone()),
        Just("../outside".to_owned()),
        Just("../../outside".to_owned()),
    ];
    prop_oneof![
        p().prop_map(|path| CacheNode::Dir { path, mode: 0o755 }),
        (p(), 0..blobs.len()).prop_map(move |(path, i)| CacheNode::File {
            path,
            mode: 0o644,
            sha256: blobs[i].sha256.clone(),
            size: blobs[i].size,
            blake3: blobs[i].blake3.clone(),
        }),
        (p(), target).prop_map(|(path, target)| CacheNode::Symlink { path, target }),
        (p(), p()).prop_map(|(path, target)| CacheNode::Hardlink { path, target }),
    ]
}

/// Every path below `dir` (not `dir` itself), recursively.
pub(super) fn listing(dir: &Path) -> Vec<String> {
    let mut v = vec![];
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            v.push(e.path().display().to_string());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                v.extend(listing(&e.path()));
            }
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn signatures_survive_a_json_round_trip(
        name in "[ -~]{0,20}",
        paths in proptest::collection::vec("[^\u{0}]{0,12}", 0..6),
        mode in 0u32..0o7777,
    ) {
        let key = SecretKey::generate("k").unwrap();
        let body = EntryBody {
            drv_hash: "d".into(),
            name,
            content_hash: "c".into(),
            nodes: paths
                .into_iter()
                .map(|path| CacheNode::Dir { path, mode })
                .collect(),
            meta: None,
        };
        let entry = CacheEntry { signatures: vec![key.sign(&body)], body };
        let bytes = serde_json::to_vec_pretty(&entry).unwrap();
        let back: CacheEntry = serde_json::from_slice(&bytes).unwrap();
        prop_assert!(back.verify(&[key.public()]).is_ok());
        prop_assert_eq!(back, entry);
    }

    #[test]
    fn fetch_never_writes_outside_its_output(seed in any::<u64>()) {
        // Everything a path of up to three `..` can reach from `dest` is below `watched`.
        let t = tempfile::tempdir().unwrap();
        let watched = t.path().join("w");
        let outside = watched.join("outside");
        let dest = watched.join("x/y/dest");
        fs::create_dir_all(&outside).unwrap();
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        let cache_dir = t.path().join("cache");
        let cache = open(&format!("file://{}", cache_dir.display())).unwrap();
        let mut blobs = vec![];
        for content in [&b""[..], b"a", b"bb"] {
            let src = t.path().join("src");
            fs::write(&src, content).unwrap();
            let b = BlobRef::of_file(&src).unwrap();
            cache.put_blob(&b, &src).unwrap();
            blobs.push(b);
        }
        let outside_s = outside.display().to_string();
        let mut runner = proptest::test_runner::TestRunner::new_with_rng(
            ProptestConfig::default(),
            proptest::test_runner::TestRng::from_seed(
                proptest::test_runner::RngAlgorithm::ChaCha,
                &{
                    let mut s = [0u8; 32];
                    s[..8].copy_from_slice(&seed.to_le_bytes());
                    s
                },
            ),
        );
        let nodes = proptest::collection::vec(node(blobs, outside_s), 1..10)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let mut all = vec![CacheNode::Dir { path: String::new(), mode: 0o755 }];
        all.extend(nodes);
        let key = SecretKey::generate("k").unwrap();
        let body = EntryBody {
            drv_hash: "d".into(),
            name: "x".into(),
            content_hash: "c".into(),
            nodes: all,
            meta: None,
        };
        let entry = CacheEntry { signatures: vec![key.sign(&body)], body };
        let _ = fetch(cache.as_ref(), &entry, &dest);
        let allowed = [outside.clone(), watched.join("x"), watched.join("x/y")];
        for p in listing(&watched) {
            prop_assert!(
                Path::new(&p).starts_with(&dest) || allowed.iter().any(|a| Path::new(&p) == a),
                "fetch of {:?} wrote {}", entry.body.nodes, p
            );
        }
    }
}
