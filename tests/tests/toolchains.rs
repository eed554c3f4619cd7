//! Real toolchains' output as workloads, built at test time from the package registries: a
//! Python command and a Python wasi:http app made with componentize-py (PyPI), and a
//! JavaScript wasi:http handler made with componentize-js (npm), run as pods through the real
//! server, beside a generated module of 40,000 functions.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use wasmlet_tests::*;

/// The toolchains' versions: pinned, so a new release cannot change what is tested.
const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
const COMPONENTIZE_JS: &str = "@bytecodealliance/componentize-js@0.23.0";

fn workloads() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads")
}

fn run(what: &str, c: &mut Command) -> Result<()> {
    let out = c.output().with_context(|| format!("{what}: run {c:?}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The WASI 0.2 WIT the runtime's wasmtime-wasi-http serves (wasi:cli, wasi:http and their
/// dependencies), from its crate source, found through cargo.
fn wasi_wit() -> Result<PathBuf> {
    let rustc = Command::new("rustc").arg("-vV").output()?;
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .context("rustc -vV names no host")?;
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline", "--locked", "--filter-platform", &host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()?;
    ensure!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let manifest = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "wasmtime-wasi-http")
        .and_then(|p| p["manifest_path"].as_str())
        .context("wasmtime-wasi-http is not in the dependency graph")?;
    Ok(Path::new(manifest).parent().context("manifest dir")?.join("wit"))
}

/// The same WIT with its WASI packages at `version` (a toolchain that targets an older 0.2
/// release names its interfaces so; the host serves every 0.2 release).
fn wit_at(dir: &Path, from: &str, version: &str) -> Result<PathBuf> {
    let out = dir.join(format!("wit-{version}"));
    std::fs::create_dir_all(out.join("deps"))?;
    let src = wasi_wit()?;
    for sub in ["", "deps"] {
        for e in std::fs::read_dir(src.join(sub))?.flatten() {
            if e.path().extension().is_some_and(|x| x == "wit") {
                let text = std::fs::read_to_string(e.path())?.replace(from, version);
                std::fs::write(out.join(sub).join(e.file_name()), text)?;
            }
        }
    }
    Ok(out)
}

/// The version of the WASI packages in the WIT (`wasi:http/proxy@0.2.N`).
fn wit_version() -> Result<String> {
    let world = std::fs::read_to_string(wasi_wit()?.join("world.wit"))?;
    let v = world.split("wasi:http/proxy@").nth(1).context("no proxy world")?;
    Ok(v.split(';').next().unwrap_or_default().trim().to_string())
}

/// Builds the Python command and handler with componentize-py in a fresh venv.
fn python_components(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let venv = dir.join("venv");
    run("python3 -m venv", Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run("pip install componentize-py", Command::new(venv.join("bin/pip")).args(["install", "-q", COMPONENTIZE_PY]))?;
    let wit = wasi_wit()?;
    let version = wit_version()?;
    let build = |app: &str, world: &str| -> Result<PathBuf> {
        let out = dir.join(format!("py-{app}.wasm"));
        // A copy: componentize-py leaves Python's bytecode cache beside the sources it reads.
        let src = dir.join(format!("py-{app}"));
        std::fs::create_dir_all(&src)?;
        std::fs::copy(workloads().join("python").join(app).join("app.py"), src.join("app.py"))?;
        run(
            &format!("componentize-py {app}"),
            Command::new(venv.join("bin/componentize-py"))
                .arg("-d")
                .arg(&wit)
                .args(["-w", &format!("{world}@{version}"), "componentize", "-p"])
                .arg(&src)
                .args(["app", "-o"])
                .arg(&out),
        )?;
        Ok(out)
    };
    Ok((build("cli", "wasi:cli/command")?, build("http", "wasi:http/proxy")?))
}

/// Builds the JavaScript handler with componentize-js (StarlingMonkey names its WASI imports
/// and exports at 0.2.10).
fn js_component(dir: &Path) -> Result<PathBuf> {
    let js = dir.join("js");
    std::fs::create_dir_all(&js)?;
    run(
        "npm install componentize-js",
        Command::new("npm").args(["install", "--no-audit", "--no-fund", "--silent", COMPONENTIZE_JS]).current_dir(&js),
    )?;
    let wit = wit_at(dir, &wit_version()?, "0.2.10")?;
    let out = dir.join("js-handler.wasm");
    run(
        "componentize-js",
        Command::new(js.join("node_modules/.bin/componentize-js"))
            .arg(workloads().join("js/handler.js"))
            .arg("-w")
            .arg(&wit)
            .args(["-n", "bindings", "-o"])
            .arg(&out)
            .current_dir(&js),
    )?;
    Ok(out)
}

/// A module of `n` functions, all in a table that `_start` calls through, one after the
/// other (the instance state and table of code that size).
fn many_functions(n: usize) -> Vec<u8> {
    let mut wat = String::from("(module\n  (type $t (func (param i32) (result i32)))\n");
    for i in 0..n {
        wat += &format!("  (func $f{i} (type $t) local.get 0 i32.const {} i32.add)\n", i % 7);
    }
    wat += &format!("  (table {n} funcref)\n  (elem (i32.const 0)");
    for i in 0..n {
        wat += &format!(" $f{i}");
    }
    wat += &format!(
        ")\n  (func (export \"_start\") (local $i i32) (local $acc i32)\n    (loop $l\n      (local.set $acc (call_indirect (type $t) (local.get $acc) (local.get $i)))\n      (local.set $i (i32.add (local.get $i) (i32.const 1)))\n      (br_if $l (i32.lt_u (local.get $i) (i32.const {n})))))\n  (memory (export \"memory\") 1))\n"
    );
    wat::parse_str(&wat).expect("valid WAT")
}

async fn logged(rt: &mut RuntimeClient, id: &str) -> Result<(cri::ContainerStatus, Vec<LogRecord>)> {
    let s = wait_exited(rt, id, Duration::from_secs(120)).await?;
    let log = read_log(Path::new(&s.log_path))?;
    Ok((s, log))
}

#[tokio::test]
async fn python_and_javascript_components_and_a_40000_function_module_run_as_pods() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (py_cli, py_http) = python_components(dir.path())?;
    let js_http = js_component(dir.path())?;
    let big = dir.path().join("big.wasm");
    std::fs::write(&big, many_functions(40_000))?;

    let server = Server::start().await?;
    for (file, tag) in [(&py_cli, "pycli"), (&py_http, "pyhttp"), (&js_http, "jshttp"), (&big, "big")] {
        server.import(file, tag)?;
    }
    let mut rt = server.runtime().await;

    // The Python command: its arguments, stdout and stderr, exit 0.
    let cfg = sandbox_config(&server, "py-cli");
    let sb = run_sandbox(&mut rt, &cfg).await?;
    let mut c = container_config("cli", "pycli", &["one", "two"]);
    c.command = vec!["app".into()];
    let id = start(&mut rt, &sb, &cfg, c).await;
    let (s, log) = logged(&mut rt, &id).await?;
    assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"), "{s:?}\n{}", server.server_log());
    assert_eq!(texts(&log, "stdout"), ["hello from python ['one', 'two']"], "{log:?}");
    assert_eq!(texts(&log, "stderr"), ["to stderr"], "{log:?}");

    // The 40,000-function module, in the pooling allocator's limits.
    let cfg = sandbox_config(&server, "big");
    let sb = run_sandbox(&mut rt, &cfg).await?;
    let mut c = container_config("big", "big", &[]);
    c.command.clear();
    let id = start(&mut rt, &sb, &cfg, c).await;
    let (s, _) = logged(&mut rt, &id).await?;
    assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"), "{s:?}");

    // The handlers answer requests, each with its own instance.
    for (name, image, says) in
        [("py-http", "pyhttp", "hello from python at /a?b=1\n"), ("js-http", "jshttp", "hello from js at /a\n")]
    {
        let (_, _, port) = http_pod_of(&server, &mut rt, name, image, Duration::from_secs(120)).await?;
        for _ in 0..3 {
            let answer = http_get(port, "/a?b=1")?;
            assert!(answer.starts_with("HTTP/1.0 200") && answer.ends_with(says), "{name}: {answer:?}");
        }
    }
    Ok(())
}
