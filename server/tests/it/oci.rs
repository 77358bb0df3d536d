//! Builds OCI image layouts on disk for the client tests.

use std::path::Path;

use serde_json::json;

use crate::{seeded, sha256};

/// A blob written into a layout.
pub struct Desc {
    pub media_type: String,
    pub digest: String,
    pub size: usize,
}

fn write_blob(layout: &Path, media_type: &str, bytes: &[u8]) -> Desc {
    let digest = sha256(bytes);
    let hex = digest.trim_start_matches("sha256:");
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).expect("blobs dir");
    std::fs::write(dir.join(hex), bytes).expect("write blob");
    Desc {
        media_type: media_type.into(),
        digest,
        size: bytes.len(),
    }
}

fn desc_json(d: &Desc) -> serde_json::Value {
    json!({ "mediaType": d.media_type, "digest": d.digest, "size": d.size })
}

/// A tar archive of `files` (mtime 2024-ish, as an image build would leave it).
pub fn tar(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    ballast_engine::testdata::tar(files, 0o14500000000)
}

/// Writes an image manifest (with `layers` uncompressed tar layers of about `layer_len`
/// bytes) into the layout; returns the manifest descriptor.
pub fn image(layout: &Path, seed: u64, layers: usize, layer_len: usize, arch: &str) -> Desc {
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for i in 0..layers {
        let files = vec![
            (
                format!("layer{i}/data.bin"),
                seeded(layer_len, seed * 100 + i as u64),
            ),
            (
                format!("layer{i}/small.txt"),
                format!("seed {seed} layer {i}\n").into_bytes(),
            ),
        ];
        let t = tar(&files);
        diff_ids.push(sha256(&t));
        layer_descs.push(write_blob(
            layout,
            "application/vnd.oci.image.layer.v1.tar",
            &t,
        ));
    }
    let config = json!({
        "architecture": arch, "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "config": { "Cmd": ["/bin/true"] },
    });
    let config = write_blob(
        layout,
        "application/vnd.oci.image.config.v1+json",
        config.to_string().as_bytes(),
    );
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc_json(&config),
        "layers": layer_descs.iter().map(desc_json).collect::<Vec<_>>(),
    });
    write_blob(
        layout,
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().as_bytes(),
    )
}

/// Writes `index.json` naming `manifest` under `tag`, and the `oci-layout` marker.
pub fn finish_layout(layout: &Path, manifest: &Desc, tag: &str) {
    let mut d = desc_json(manifest);
    d["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
    let index = json!({ "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [d] });
    std::fs::write(layout.join("index.json"), index.to_string()).expect("index.json");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
}

/// Writes a multi-arch image index over two images; returns its descriptor.
pub fn multi_arch(layout: &Path, seed: u64) -> Desc {
    let amd = image(layout, seed, 2, 50_000, "amd64");
    let arm = image(layout, seed + 1, 2, 50_000, "arm64");
    let mut a = desc_json(&amd);
    a["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let mut b = desc_json(&arm);
    b["platform"] = json!({"architecture": "arm64", "os": "linux"});
    let index = json!({ "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [a, b] });
    write_blob(
        layout,
        "application/vnd.oci.image.index.v1+json",
        index.to_string().as_bytes(),
    )
}
