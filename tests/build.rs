//! Builds the test workloads from source: `workloads/tool.c` with clang for wasm32-wasi (a
//! preview 1 module), and the same module made a `wasi:cli/command` component with the
//! preview 1 adapter; `workloads/net.c`, a command that uses wasi:sockets through C bindings
//! that wit-bindgen generates here for `workloads/wit/net.wit`, made a component the same way;
//! `workloads/http.c`, a wasi:http handler built the same way against `workloads/wit/http.wit`
//! and made a component with the proxy adapter; `workloads/box.c`, the conformance userland
//! (sh, echo, sleep, ...), a preview 1 module.
//! The test command installs clang, lld and wasi-libc when missing.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed=workloads");
    let module = out.join("tool.wasm");
    compile_c(&[Path::new("workloads/tool.c")], &[], &[], &module);
    let component_path = out.join("tool.component.wasm");
    componentize(&module, &component_path);
    println!("cargo:rustc-env=WORKLOAD_TOOL={}", module.display());
    println!("cargo:rustc-env=WORKLOAD_TOOL_COMPONENT={}", component_path.display());
    // The conformance userland: a preview 1 module, as only preview 1 exits with any code (a
    // component's wasi:cli/exit says success or failure).
    let userland = out.join("box.wasm");
    compile_c(&[Path::new("workloads/box.c")], &[], &[], &userland);
    println!("cargo:rustc-env=WORKLOAD_BOX={}", userland.display());

    // One `cargo metadata` for both: it tells where the crates shipping the WIT are.
    let metadata = cargo_metadata();
    let net_bindings = bindings(&out, &metadata, "net", "wasmtime-wasi-48.", "src/p2/wit/deps");
    let net = bound_workload(&out, "net", "net", &net_bindings, &[], COMMAND);
    println!("cargo:rustc-env=WORKLOAD_NET={}", net.display());
    let http_bindings = bindings(&out, &metadata, "http", "wasmtime-wasi-http-48.", "wit/deps");
    let http = bound_workload(
        &out,
        "http",
        "http",
        &http_bindings,
        &["-mexec-model=reactor"],
        wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_PROXY_ADAPTER,
    );
    println!("cargo:rustc-env=WORKLOAD_HTTP={}", http.display());
}

const COMMAND: &[u8] = wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER;

/// C bindings for the world `workloads/wit/<world>.wit`, whose WIT dependencies come from the
/// crate `krate`, directory `deps`. Returns their directory.
fn bindings(out: &Path, metadata: &str, world: &str, krate: &str, deps: &str) -> PathBuf {
    let dir = out.join(format!("{world}-bindings"));
    generate_c_bindings(out, world, &wit_deps(metadata, krate, deps), &dir);
    dir
}

/// `workloads/<name>.c` built against the C bindings of `world` in `dir`, with `flags`, made a
/// component with `adapter`. Returns the component's path.
fn bound_workload(out: &Path, name: &str, world: &str, dir: &Path, flags: &[&str], adapter: &[u8]) -> PathBuf {
    let module = out.join(format!("{name}.wasm"));
    let source = PathBuf::from(format!("workloads/{name}.c"));
    compile_c(
        &[&source, &dir.join(format!("{world}.c")), &dir.join(format!("{world}_component_type.o"))],
        &[dir],
        flags,
        &module,
    );
    let component = out.join(format!("{name}.component.wasm"));
    componentize_with(&module, &component, adapter);
    component
}

/// `cargo metadata` of the workspace, as text.
fn cargo_metadata() -> String {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        // Only the host's packages: others (target-specific ones) may not be downloaded.
        .args(["--filter-platform", &std::env::var("HOST").expect("HOST")])
        .current_dir(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"))
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The directory `deps` of the WIT packages shipped in the crate whose directory name starts
/// with `krate` (its source in cargo's registry, or wherever `cargo metadata` says it is).
fn wit_deps(text: &str, krate: &str, deps: &str) -> PathBuf {
    // The crate's manifest path, without a JSON parser in the build script.
    let key = "\"manifest_path\":\"";
    text.match_indices(key)
        .map(|(i, _)| &text[i + key.len()..])
        .map(|rest| &rest[..rest.find('"').expect("closing quote")])
        .find(|p| p.contains(&format!("/{krate}")) && p.ends_with("Cargo.toml"))
        .map(|p| Path::new(p).parent().expect("crate dir").join(deps))
        .unwrap_or_else(|| panic!("{krate} in cargo metadata"))
}

/// C bindings for the world `world` (workloads/wit/<world>.wit, its dependencies from
/// `deps_dir`) into `dir` (<world>.c, <world>.h, <world>_component_type.o).
fn generate_c_bindings(out: &Path, world: &str, deps_dir: &Path, dir: &Path) {
    let wit = out.join(format!("{world}-wit"));
    let _ = std::fs::remove_dir_all(&wit);
    std::fs::create_dir_all(wit.join("deps")).expect("wit dir");
    std::fs::copy(format!("workloads/wit/{world}.wit"), wit.join(format!("{world}.wit"))).expect("copy world");
    for entry in std::fs::read_dir(deps_dir).expect("wit deps") {
        let entry = entry.expect("wit entry");
        std::fs::copy(entry.path(), wit.join("deps").join(entry.file_name())).expect("copy wit");
    }
    let mut resolve = wit_parser::Resolve::default();
    let (pkg, _) = resolve.push_dir(&wit).expect("parse the world");
    let world = resolve.select_world(&[pkg], Some(world)).expect("select the world");
    let mut files = wit_bindgen_core::Files::default();
    wit_bindgen_c::Opts::default().build().generate(&mut resolve, world, &mut files).expect("generate C bindings");
    std::fs::create_dir_all(dir).expect("bindings dir");
    for (name, bytes) in files.iter() {
        std::fs::write(dir.join(name), bytes).expect("write binding");
    }
}

fn componentize(module: &Path, component_path: &Path) {
    componentize_with(module, component_path, COMMAND);
}

fn componentize_with(module: &Path, component_path: &Path, adapter: &[u8]) {
    let bytes = std::fs::read(module).expect("read module");
    let component = wit_component::ComponentEncoder::default()
        .module(&bytes)
        .and_then(|e| e.adapter(wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, adapter))
        .map(|e| e.validate(true))
        .and_then(|mut e| e.encode())
        .unwrap_or_else(|e| panic!("componentize {}: {e:#}", module.display()));
    std::fs::write(component_path, component).expect("write component");
}

fn compile_c(srcs: &[&Path], includes: &[&Path], flags: &[&str], out: &Path) {
    let clang = std::env::var("WASM_CC").unwrap_or_else(|_| "clang".to_string());
    let status = Command::new(&clang)
        .args(["--target=wasm32-wasi", "-O2", "-Wall", "-Werror", "-Wno-unused-function"])
        .args(flags)
        .args(includes.iter().map(|i| format!("-I{}", i.display())))
        .args(srcs)
        .arg("-o")
        .arg(out)
        .status()
        .unwrap_or_else(|e| {
            panic!("run {clang}: {e}\nthe test workloads need clang, lld and wasi-libc: apt-get install clang lld wasi-libc")
        });
    assert!(status.success(), "{clang} failed to build {}", out.display());
}
