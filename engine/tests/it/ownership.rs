//! Who uses which stored bytes: unique and shared figures per image, layer and namespace.

use ballast_engine::catalog::{ManifestLink, Op};
use ballast_engine::ownership::Ownership;
use ballast_engine::{Digest, Options, Store};

use crate::{seeded, sha256};

/// Stores `layers` and a manifest referencing them, linked and tagged in `repo`.
fn image(store: &Store, repo: &str, tag: &str, layers: &[&Vec<u8>]) -> Digest {
    let mut ops = Vec::new();
    let mut refs = Vec::new();
    for l in layers {
        let d = sha256(l);
        store.put_blob(l, None).expect("put layer");
        ops.push(Op::LinkBlob {
            repo: repo.into(),
            digest: d.clone(),
            at: 1,
        });
        refs.push(d);
    }
    let manifest = format!("{{\"schemaVersion\":2,\"tag\":\"{tag}\",\"layers\":{refs:?}}}");
    let md = sha256(manifest.as_bytes());
    store
        .put_blob(manifest.as_bytes(), None)
        .expect("put manifest");
    ops.push(Op::PutManifest {
        repo: repo.into(),
        digest: md.clone(),
        link: ManifestLink {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: manifest.len() as u64,
            artifact_type: None,
            annotations: Default::default(),
            subject: None,
            references: refs,
            pushed_at: 1,
            origin: None,
        },
    });
    ops.push(Op::Tag {
        repo: repo.into(),
        tag: tag.into(),
        digest: md.clone(),
        at: 1,
    });
    store.commit_ops(ops).expect("commit");
    md
}

#[test]
fn unique_and_shared_bytes_per_image_layer_and_namespace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options {
        compress: false,
        ..Options::default()
    };
    let store = Store::open(dir.path(), opts).expect("open");
    let own_a = seeded(300_000, 1);
    let common = seeded(400_000, 2);
    let own_b = seeded(200_000, 3);
    let x = image(&store, "team-a/app", "v1", &[&own_a, &common]);
    let y = image(&store, "team-b/app", "v1", &[&common, &own_b]);
    // The same image in a second repository of team-b: nothing of it is unique to either.
    let y2 = image(&store, "team-b/mirror", "v1", &[&common, &own_b]);
    let o = Ownership::compute(&store).expect("compute");
    let stored = |data: &[u8]| o.blob(&store, &sha256(data)).expect("blob").stored_bytes;
    let (a, c, b) = (stored(&own_a), stored(&common), stored(&own_b));
    assert!(a > 300_000 && c > 400_000 && b > 200_000, "{a} {c} {b}");
    let manifest_bytes =
        |_repo: &str, d: &Digest| o.blob(&store, d).expect("manifest").stored_bytes;
    assert_eq!(
        o.unique_bytes("team-a/app", &x),
        Some(a + manifest_bytes("team-a/app", &x))
    );
    // y and y2 are the same manifest bytes in two repositories: one stored copy, shared.
    assert_eq!(y, y2);
    assert_eq!(o.unique_bytes("team-b/app", &y), Some(0));
    assert_eq!(o.unique_bytes("team-b/mirror", &y2), Some(0));
    let common_use = o.blob(&store, &sha256(&common)).expect("common");
    assert_eq!(common_use.shared_bytes, common_use.stored_bytes);
    assert!(common_use.chunks > 1, "{common_use:?}");
    let own = o.blob(&store, &sha256(&own_a)).expect("own");
    assert_eq!(own.shared_bytes, 0);
    let ns_a = &o.namespaces["team-a"];
    let ns_b = &o.namespaces["team-b"];
    assert_eq!(ns_a.repositories, 1);
    assert_eq!(ns_b.repositories, 2);
    assert_eq!(ns_a.stored_bytes, a + c + manifest_bytes("team-a/app", &x));
    assert_eq!(ns_a.unique_bytes, a + manifest_bytes("team-a/app", &x));
    // team-b's manifest and own layer are its own (used by two of its images): unique to
    // the namespace, though unique to neither image.
    assert_eq!(ns_b.unique_bytes, b + manifest_bytes("team-b/app", &y));
    assert_eq!(ns_b.stored_bytes, b + c + manifest_bytes("team-b/app", &y));
    assert_eq!(
        o.stored_bytes,
        a + b + c + manifest_bytes("team-a/app", &x) + manifest_bytes("team-b/app", &y)
    );
    assert_eq!(
        o.shared_bytes,
        o.stored_bytes - o.unique_bytes("team-a/app", &x).unwrap_or(0)
    );
    assert!(ns_b.logical_bytes > 2 * (400_000 + 200_000));
    assert_eq!(o.image_count, 3);
    // A manifest not in the catalog is no image.
    assert_eq!(o.unique_bytes("team-a/app", &y), None);
}
