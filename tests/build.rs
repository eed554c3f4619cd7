//! Builds the test workloads from source: `workloads/tool.c` with clang for wasm32-wasi (a
//! preview 1 module), and the same module made a `wasi:cli/command` component with the
//! preview 1 adapter. The test command installs clang, lld and wasi-libc when missing.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed=workloads");
    let module = out.join("tool.wasm");
    compile_c(Path::new("workloads/tool.c"), &module);
    let bytes = std::fs::read(&module).expect("read tool.wasm");
    let component = wit_component::ComponentEncoder::default()
        .module(&bytes)
        .and_then(|e| {
            e.adapter(
                wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
                wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
            )
        })
        .map(|e| e.validate(true))
        .and_then(|mut e| e.encode())
        .expect("componentize tool.wasm");
    let component_path = out.join("tool.component.wasm");
    std::fs::write(&component_path, component).expect("write component");
    println!("cargo:rustc-env=WORKLOAD_TOOL={}", module.display());
    println!("cargo:rustc-env=WORKLOAD_TOOL_COMPONENT={}", component_path.display());
}

fn compile_c(src: &Path, out: &Path) {
    let clang = std::env::var("WASM_CC").unwrap_or_else(|_| "clang".to_string());
    let status = Command::new(&clang)
        .args(["--target=wasm32-wasi", "-O2", "-Wall", "-Werror"])
        .arg(src)
        .arg("-o")
        .arg(out)
        .status()
        .unwrap_or_else(|e| {
            panic!("run {clang}: {e}\nthe test workloads need clang, lld and wasi-libc: apt-get install clang lld wasi-libc")
        });
    assert!(status.success(), "{clang} failed to build {}", src.display());
}
