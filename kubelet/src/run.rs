//! `wasmlet run FILE.yaml...`: pods from manifests with no cluster. The runtime serves CRI on
//! a socket of its own in this process; pod workers drive it through that socket exactly as
//! they would a remote runtime. Status lines follow `kubectl get pods -w`, events follow
//! `kubectl get events`, and Ctrl-C deletes the pods gracefully (preStop included).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use serde_json::Value;

use crate::events::{Event, Kind, Recorder};
use crate::validate;
use crate::worker::{self, Node, StaticObjects, Update};

/// What the manifests hold.
#[derive(Default)]
pub struct Manifests {
    pub pods: Vec<Pod>,
    pub config_maps: Vec<ConfigMap>,
    pub secrets: Vec<Secret>,
}

/// Reads and checks every document of the files; nothing runs unless all are valid.
pub fn load(files: &[PathBuf]) -> Result<Manifests> {
    let mut m = Manifests::default();
    let mut problems = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
        for (n, value) in documents(&text) {
            let where_ = format!("{} (document {n})", file.display());
            let value = match value {
                Ok(v) => v,
                Err(e) => {
                    problems.push(format!("{where_}: {e}"));
                    continue;
                }
            };
            let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
            let api = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_string();
            if api != "v1" {
                problems.push(format!("{where_}: apiVersion {api:?}: only v1 Pods, ConfigMaps and Secrets can be run"));
                continue;
            }
            match kind.as_str() {
                "Pod" => match pod_from(&value) {
                    Ok(p) => m.pods.push(p),
                    Err(e) => problems.push(format!("{where_}: {e}")),
                },
                "ConfigMap" => match decode::<ConfigMap>(&value, "ConfigMap") {
                    Ok(c) => m.config_maps.push(c),
                    Err(e) => problems.push(format!("{where_}: {e}")),
                },
                "Secret" => match decode::<Secret>(&value, "Secret") {
                    Ok(s) => m.secrets.push(s),
                    Err(e) => problems.push(format!("{where_}: {e}")),
                },
                other => problems.push(format!(
                    "{where_}: kind {other:?} cannot be run by wasmlet run (Pod, ConfigMap and Secret can)"
                )),
            }
        }
    }
    let mut names = std::collections::HashSet::new();
    for p in &m.pods {
        let key = (p.metadata.namespace.clone().unwrap_or_else(|| "default".into()), p.metadata.name.clone());
        if !names.insert(key.clone()) {
            problems.push(format!("pods \"{}\" already exists in namespace {}", key.1.unwrap_or_default(), key.0));
        }
    }
    if !problems.is_empty() {
        bail!("{}\nnothing was run", problems.join("\n"));
    }
    if m.pods.is_empty() {
        bail!("no Pod in {}", files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "));
    }
    Ok(m)
}

/// The documents of a YAML text, empty ones skipped: their numbers (from 1) and their values,
/// or why one is not YAML.
pub fn documents(text: &str) -> Vec<(usize, std::result::Result<Value, String>)> {
    serde_yaml::Deserializer::from_str(text)
        .enumerate()
        .map(|(n, doc)| (n + 1, serde::Deserialize::deserialize(doc).map_err(|e| format!("invalid YAML: {e}"))))
        .filter(|(_, v)| !matches!(v, Ok(Value::Null)))
        .collect()
}

/// A Pod document decoded strictly and validated; the error is worded as the API server's.
pub fn pod_from(value: &Value) -> std::result::Result<Pod, String> {
    let pod: Pod = decode(value, "Pod").map_err(|e| format!("{e:#}"))?;
    let errors = validate::pod(&pod);
    if errors.is_empty() {
        Ok(pod)
    } else {
        Err(validate::message("Pod", pod.metadata.name.as_deref().unwrap_or_default(), &errors))
    }
}

/// Decodes strictly, as the API server does: unknown fields are an error.
pub fn decode<T: serde::de::DeserializeOwned + serde::Serialize>(value: &Value, kind: &str) -> Result<T> {
    let name = value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    let obj: T = serde_json::from_value(value.clone())
        .map_err(|e| anyhow::anyhow!("{kind} \"{name}\" in version \"v1\" cannot be handled as a {kind}: {e}"))?;
    let mut unknown = Vec::new();
    validate::unknown_fields(value, &serde_json::to_value(&obj)?, "", &mut unknown);
    unknown.retain(|f| f != "kind" && f != "apiVersion");
    if !unknown.is_empty() {
        let list: Vec<String> = unknown.iter().map(|f| format!("unknown field \"{f}\"")).collect();
        bail!(
            "{kind} \"{name}\" in version \"v1\" cannot be handled as a {kind}: strict decoding error: {}",
            list.join(", ")
        );
    }
    Ok(obj)
}

/// A random UID in the API server's format.
pub fn new_uid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Prints events as they happen.
struct Printer;

impl Recorder for Printer {
    fn record(&self, e: Event) {
        let object = if e.field_path.is_empty() {
            format!("pod/{}", e.pod)
        } else {
            let c = e.field_path.split('{').nth(1).unwrap_or_default().trim_end_matches('}');
            format!("pod/{}/{c}", e.pod)
        };
        let kind = match e.kind {
            Kind::Normal => "Normal",
            Kind::Warning => "Warning",
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "  {kind:<8}{:<21} {object:<23} {}", e.reason, e.message);
    }
}

/// kubectl's READY, STATUS and RESTARTS columns (`printPod`).
pub fn columns(pod: &Pod) -> (String, String, i32) {
    let spec = crate::model::spec(pod);
    let sidecars: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| crate::model::is_sidecar(c))
        .map(|c| c.name.as_str())
        .collect();
    let total = spec.containers.len() + sidecars.len();
    let Some(s) = &pod.status else { return (format!("0/{total}"), "Pending".into(), 0) };
    let mut reason = s.reason.clone().or_else(|| s.phase.clone()).unwrap_or_default();
    let mut ready = 0;
    let mut restarts = 0;
    let mut initializing = false;
    let inits = s.init_container_statuses.as_deref().unwrap_or_default();
    for (i, c) in inits.iter().enumerate() {
        restarts += c.restart_count;
        let st = c.state.clone().unwrap_or_default();
        if sidecars.contains(&c.name.as_str()) {
            if c.ready {
                ready += 1;
            }
            if c.started == Some(true) {
                continue;
            }
        }
        if let Some(t) = &st.terminated
            && t.exit_code == 0
        {
            continue;
        }
        initializing = true;
        reason = if let Some(t) = &st.terminated {
            match &t.reason {
                Some(r) if !r.is_empty() => format!("Init:{r}"),
                _ => format!("Init:ExitCode:{}", t.exit_code),
            }
        } else if let Some(r) = st.waiting.as_ref().and_then(|w| w.reason.clone()).filter(|r| r != "PodInitializing") {
            format!("Init:{r}")
        } else {
            format!("Init:{}/{}", i, spec.init_containers.as_ref().map_or(0, Vec::len))
        };
        break;
    }
    if !initializing {
        let mut has_running = false;
        for c in s.container_statuses.iter().flatten().rev() {
            restarts += c.restart_count;
            let st = c.state.clone().unwrap_or_default();
            if let Some(r) = st.waiting.as_ref().and_then(|w| w.reason.clone()).filter(|r| !r.is_empty()) {
                reason = r;
            } else if let Some(t) = &st.terminated {
                reason =
                    t.reason.clone().filter(|r| !r.is_empty()).unwrap_or_else(|| format!("ExitCode:{}", t.exit_code));
            } else if st.running.is_some() {
                has_running = true;
                if c.ready {
                    ready += 1;
                }
            }
        }
        if reason == "Completed" && has_running {
            let pod_ready = s.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
            reason = if pod_ready { "Running".into() } else { "NotReady".into() };
        }
    }
    if pod.metadata.deletion_timestamp.is_some()
        && s.phase.as_deref() != Some("Succeeded")
        && s.phase.as_deref() != Some("Failed")
    {
        reason = "Terminating".into();
    }
    (format!("{ready}/{total}"), reason, restarts)
}

/// One `kubectl get pods -w` line.
fn status_line(name: &str, (ready, status, restarts): &(String, String, i32), started: SystemTime) {
    println!("{name:<23} {ready:<7} {status:<26} {restarts:<9} {}", age(started));
}

fn age(since: SystemTime) -> String {
    let s = since.elapsed().unwrap_or_default().as_secs();
    match s {
        0..120 => format!("{s}s"),
        120..3600 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// Options of `wasmlet run`.
pub struct RunOptions {
    /// The node's root (the kubelet's log directories are under it).
    pub root: PathBuf,
    /// Print what the containers log, each line after its pod and container.
    pub logs: bool,
    /// Delete the pods gracefully after this long, as Ctrl-C does.
    pub stop_after: Option<Duration>,
}

/// The recorder of `wasmlet run`: prints events as `kubectl get events` does.
pub fn printer() -> Arc<dyn Recorder> {
    Arc::new(Printer)
}

/// The ConfigMaps and Secrets of the manifests, as pods read them.
pub fn objects(m: &Manifests) -> Arc<dyn worker::Objects> {
    Arc::new(StaticObjects { config_maps: m.config_maps.clone(), secrets: m.secrets.clone() })
}

/// Runs the pods on `node` until they all finish, Ctrl-C or `stop_after`; returns the exit
/// code (0 when every pod succeeded or was stopped, 1 when one failed).
pub async fn run(node: Arc<Node>, manifests: Manifests, o: RunOptions) -> Result<i32> {
    let node_name = node.node_name.clone();
    let events = node.watch_runtime_events();
    println!("{:<23} {:<7} {:<26} {:<9} AGE", "NAME", "READY", "STATUS", "RESTARTS");
    let started = SystemTime::now();
    let mut pods = BTreeMap::new();
    let mut uids = Vec::new();
    for mut p in manifests.pods {
        p.metadata.namespace.get_or_insert_with(|| "default".into());
        p.metadata.uid = Some(new_uid());
        uids.extend(p.metadata.uid.clone());
        p.spec.as_mut().map(|s| s.node_name.get_or_insert_with(|| node_name.clone()));
        let name = p.metadata.name.clone().unwrap_or_default();
        pods.insert(name, worker::spawn(node.clone(), p));
    }
    let mut last: BTreeMap<String, (String, String, i32)> = BTreeMap::new();
    let mut interrupted = None;
    let mut ctrl_c = Box::pin(tokio::signal::ctrl_c());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut deadline = Box::pin(async {
        match o.stop_after {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    });
    let mut follower = o.logs.then(|| LogFollower::new(&o.root, uids));
    let mut log_tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        if let Some(f) = follower.as_mut() {
            f.print_new();
        }
        // Print a line for each pod whose columns changed.
        let mut all_done = true;
        for (name, h) in &pods {
            let pod = h.status.borrow().clone();
            let cols = columns(&pod);
            if last.get(name) != Some(&cols) {
                status_line(name, &cols, started);
                last.insert(name.clone(), cols);
            }
            all_done &= crate::model::finished(&pod);
        }
        let _ = std::io::stdout().flush();
        if all_done {
            break;
        }
        let changed = futures_util::future::select_all(pods.values_mut().map(|h| Box::pin(h.status.changed())));
        tokio::select! {
            _ = changed => {}
            _ = log_tick.tick(), if follower.is_some() => {}
            _ = &mut ctrl_c => { interrupted = Some("Ctrl-C"); break; }
            _ = term.recv() => { interrupted = Some("SIGTERM"); break; }
            _ = &mut deadline => { interrupted = Some("--stop-after"); break; }
        }
    }
    if let Some(why) = interrupted {
        println!("deleting {} pod(s) gracefully ({why})", pods.len());
    }
    let failed = pods
        .values()
        .any(|h| h.status.borrow().status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Failed"));
    for h in pods.values() {
        let _ = h.updates.send(Update::Delete { grace: None });
    }
    for (name, mut h) in pods {
        // Keep printing status changes (and logs) while pods terminate, as `kubectl delete`
        // does until the pod is gone.
        loop {
            if let Some(f) = follower.as_mut() {
                f.print_new();
            }
            tokio::select! {
                _ = &mut h.task => break,
                _ = log_tick.tick(), if follower.is_some() => {}
                r = h.status.changed() => {
                    if r.is_err() { break; }
                    let cols = columns(&h.status.borrow());
                    if last.get(&name) != Some(&cols) {
                        status_line(&name, &cols, started);
                        last.insert(name.clone(), cols);
                    }
                }
            }
        }
        if let Some(f) = follower.as_mut() {
            f.print_new();
        }
        println!("pod \"{name}\" deleted");
    }
    events.abort();
    Ok(if failed && interrupted.is_none() { 1 } else { 0 })
}

/// `wasmlet logs`: what `o` selects (kubectl's --tail, --since, --since-time, --timestamps,
/// --limit-bytes, -p) of the log of a container of a pod that ran under `root`; with follow,
/// goes on as the log grows and into the next instance's log after a restart.
pub async fn logs(root: &Path, pod: &str, container: Option<&str>, o: &crate::logs::LogOptions) -> Result<()> {
    let base = root.join("kubelet").join("logs");
    let mut dirs: Vec<(SystemTime, PathBuf)> = std::fs::read_dir(&base)
        .with_context(|| format!("no pods have run under {}", root.display()))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().split('_').nth(1) == Some(pod))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    dirs.sort();
    let Some((_, dir)) = dirs.pop() else { bail!("pods \"{pod}\" not found") };
    let names: Vec<String> = std::fs::read_dir(&dir)?
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let container = match (container, names.as_slice()) {
        (Some(c), _) => c.to_string(),
        (None, [one]) => one.clone(),
        (None, _) => {
            let mut sorted = names.clone();
            sorted.sort();
            bail!("a container name must be specified for pod {pod}, choose one of: [{}]", sorted.join(" "))
        }
    };
    let cdir = dir.join(&container);
    let newest = |skip: usize| container_logs(&cdir).into_iter().rev().nth(skip);
    let Some(mut file) = newest(usize::from(o.previous)) else {
        bail!("container \"{container}\" in pod \"{pod}\" has no {}log", if o.previous { "previous " } else { "" })
    };
    let follow = o.follow && !o.previous;
    let mut offset = 0u64;
    let mut selector = crate::logs::Selector::new(o);
    loop {
        use std::io::{Read, Seek};
        // What was written since the last read (a missing file reads as empty).
        let chunk = (|| {
            let mut f = std::fs::File::open(&file)?;
            f.seek(std::io::SeekFrom::Start(offset))?;
            let mut chunk = Vec::new();
            f.read_to_end(&mut chunk).map(|_| chunk)
        })()
        .unwrap_or_default();
        offset += chunk.len() as u64;
        let out = selector.feed(&chunk);
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(&out);
        let _ = stdout.flush();
        drop(stdout);
        if !follow || selector.full() {
            return Ok(());
        }
        // A restart writes the next N.log: follow it.
        if let Some(next) = newest(0)
            && next != file
        {
            file = next;
            offset = 0;
            selector.drop_partial();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A container's log files (`<restart count>.log`), oldest first.
fn container_logs(dir: &Path) -> Vec<PathBuf> {
    let mut logs: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_string_lossy().strip_suffix(".log")?.parse().ok()?, e.path())))
        .collect();
    logs.sort();
    logs.into_iter().map(|(_, p)| p).collect()
}

/// Reads a CRI log file as it grows: how far it has been read, and a line begun with partial
/// ("P") entries and not yet ended.
#[derive(Default)]
struct LogTail {
    offset: usize,
    partial: String,
}

impl LogTail {
    /// The lines completed since the last read (a missing file reads as empty).
    fn read(&mut self, file: &Path) -> Vec<String> {
        use std::io::{Read, Seek};
        let mut lines = Vec::new();
        // What was written since the last read.
        let mut bytes = Vec::new();
        let Ok(mut f) = std::fs::File::open(file) else { return lines };
        if f.seek(std::io::SeekFrom::Start(self.offset as u64)).is_err() || f.read_to_end(&mut bytes).is_err() {
            return lines;
        }
        // Only whole entries: a writer may be half-way through the last one.
        let Some(end) = bytes.iter().rposition(|b| *b == b'\n') else { return lines };
        let text = String::from_utf8_lossy(&bytes[..=end]).into_owned();
        self.offset += end + 1;
        for entry in text.lines() {
            // <time> <stream> <P|F> <content>
            let mut f = entry.splitn(4, ' ');
            let (_, _, tag, content) = (f.next(), f.next(), f.next(), f.next().unwrap_or(""));
            self.partial.push_str(content);
            if tag != Some("P") {
                lines.push(std::mem::take(&mut self.partial));
            }
        }
        lines
    }
}

/// Prints, for `wasmlet run --logs`, every line the containers of the given pods log, as
/// "[POD/CONTAINER] line", by following their CRI log files under the kubelet's log directory.
struct LogFollower {
    base: PathBuf,
    /// The pods' log directory names end with "_<uid>".
    uids: Vec<String>,
    tails: BTreeMap<PathBuf, LogTail>,
}

impl LogFollower {
    fn new(root: &Path, uids: Vec<String>) -> LogFollower {
        LogFollower { base: root.join("kubelet").join("logs"), uids, tails: BTreeMap::new() }
    }

    /// Prints what was logged since the last call.
    fn print_new(&mut self) {
        let mut out = std::io::stdout().lock();
        for pod_dir in std::fs::read_dir(&self.base).into_iter().flatten().flatten() {
            let dir_name = pod_dir.file_name().to_string_lossy().into_owned();
            if !self.uids.iter().any(|u| dir_name.ends_with(&format!("_{u}"))) {
                continue;
            }
            // <namespace>_<name>_<uid>
            let pod = dir_name.split('_').nth(1).unwrap_or_default().to_string();
            for container in std::fs::read_dir(pod_dir.path()).into_iter().flatten().flatten() {
                let name = container.file_name().to_string_lossy().into_owned();
                for file in container_logs(&container.path()) {
                    for line in self.tails.entry(file.clone()).or_default().read(&file) {
                        let _ = writeln!(out, "  [{pod}/{name}] {line}");
                    }
                }
            }
        }
        let _ = out.flush();
    }
}

/// A duration as `wasmlet run --stop-after` takes it: a number of seconds, or a number with
/// the unit s, m or h ("90", "45s", "2m").
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration (e.g. 45s, 2m)"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("{text:?}: the unit must be s, m or h")),
    };
    Ok(Duration::from_secs(n * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let f = dir.join("m.yaml");
        std::fs::write(&f, text).unwrap();
        f
    }

    #[test]
    fn manifests_load_every_kind_and_refuse_bad_documents() {
        let tmp = tempfile::tempdir().unwrap();
        let f = write(
            tmp.path(),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: conf}\ndata: {a: b}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {p: q}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec:\n  containers: [{name: app, image: app:1}]\n",
        );
        let m = load(&[f]).unwrap();
        assert_eq!((m.pods.len(), m.config_maps.len(), m.secrets.len()), (1, 1, 1));
        let f = write(
            tmp.path(),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec:\n  containers: [{name: app}]\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: ok}\nspec:\n  containers: [{name: app, image: a, imagePullPolicy: Never, command: [x], comand: [y]}]\n",
        );
        let err = format!("{:#}", load(&[f]).err().unwrap());
        assert!(
            err.contains("(document 1): The Pod \"web\" is invalid: spec.containers[0].image: Required value"),
            "{err}"
        );
        assert!(err.contains("(document 2): apiVersion \"apps/v1\""), "{err}");
        assert!(err.contains("strict decoding error: unknown field \"spec.containers[0].comand\""), "{err}");
        assert!(err.ends_with("nothing was run"), "{err}");
    }

    #[test]
    fn stop_after_durations() {
        assert_eq!(parse_duration("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5d").unwrap_err().contains("the unit must be s, m or h"));
        assert!(parse_duration("s").unwrap_err().contains("is not a duration"));
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn log_tail_joins_partial_entries_and_waits_for_whole_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("0.log");
        let mut tail = LogTail::default();
        assert!(tail.read(&file).is_empty(), "a missing file reads as empty");
        std::fs::write(&file, "t1 stdout P hel\nt2 stdout F lo\nt3 stderr F wor").unwrap();
        assert_eq!(tail.read(&file), vec!["hello".to_string()]);
        // The unfinished entry is read once the writer ends it.
        std::fs::write(&file, "t1 stdout P hel\nt2 stdout F lo\nt3 stderr F world\n").unwrap();
        assert_eq!(tail.read(&file), vec!["world".to_string()]);
        assert!(tail.read(&file).is_empty());
    }

    #[test]
    fn kubectl_columns() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web"},
            "spec": {"initContainers": [{"name": "init", "image": "i"}], "containers": [{"name": "app", "image": "a"}]},
            "status": {"phase": "Pending",
                "initContainerStatuses": [{"name": "init", "image": "i", "imageID": "", "ready": false, "restartCount": 2,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}}}],
                "containerStatuses": [{"name": "app", "image": "a", "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"waiting": {"reason": "PodInitializing"}}}]}
        }))
        .unwrap();
        assert_eq!(columns(&p), ("0/1".into(), "Init:CrashLoopBackOff".into(), 2));
    }
}
