//! Regenerates `src/gen` from the `.proto` files and fails when the checked-in code differs,
//! so a changed contract cannot ship with stale generated code.

use std::path::PathBuf;

#[test]
fn generated_code_is_fresh() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("src/gen");
    let before = snapshot(&out);
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
    let mut prost_config = prost_build::Config::new();
    prost_config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .out_dir(&out)
        .compile_with_config(
            prost_config,
            &[root.join("tether/shard/v1/shard.proto"), root.join("tether/worker/v1/worker.proto")],
            std::slice::from_ref(&root),
        )
        .expect("protoc compiles the contracts");
    let after = snapshot(&out);
    assert!(before == after, "proto/src/gen was stale and has been regenerated; commit the new files");
}

fn snapshot(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("src/gen exists")
        .map(|entry| {
            let path = entry.expect("dir entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).expect("read generated file"))
        })
        .collect();
    files.sort();
    files
}
