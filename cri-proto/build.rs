//! Compiles proto/api.proto with tonic-prost-build. protoc comes from the
//! protoc-bin-vendored crate unless PROTOC already names one.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        unsafe_set_protoc(protoc);
    }
    println!("cargo:rerun-if-changed=proto/api.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/api.proto"], &["proto"])?;
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_set_protoc(path: std::path::PathBuf) {
    // SAFETY: the build script has not spawned any threads yet.
    unsafe { std::env::set_var("PROTOC", path) };
}
