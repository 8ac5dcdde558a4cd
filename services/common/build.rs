//! With the `etcd` feature, checks that the vendored protoc is present: etcd-client's build script
//! runs it through `scripts/protoc` (PROTOC in `.cargo/config.toml`), and this crate's build
//! dependency on `protoc-bin-vendored` is what makes cargo download it first.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "etcd")]
    if let Err(error) = protoc_bin_vendored::protoc_bin_path() {
        println!(
            "cargo:warning=no vendored protoc for this platform ({error}); etcd-client needs PROTOC or a protoc on PATH"
        );
    }
}
