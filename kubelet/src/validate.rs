//! Manifest checks with the API server's wording (`spec.containers[0].image: Required value`),
//! run before anything starts: decoding with unknown fields refused (strict decoding), then
//! the rules of `pkg/apis/core/validation` that matter to a node.

use std::collections::HashSet;

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use serde_json::Value;

/// One field error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub detail: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.detail)
    }
}

/// Joins errors as `kubectl create` prints them.
pub fn message(kind: &str, name: &str, errors: &[FieldError]) -> String {
    match errors {
        [one] => format!("The {kind} \"{name}\" is invalid: {one}"),
        many => format!(
            "The {kind} \"{name}\" is invalid: [{}]",
            many.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Fields of `input` that the decoded object does not have (unknown or misspelled ones).
pub fn unknown_fields(input: &Value, decoded: &Value, path: &str, out: &mut Vec<String>) {
    match (input, decoded) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match b.get(k) {
                    Some(d) => unknown_fields(v, d, &p, out),
                    // Null and empty values decode to nothing; they are not unknown.
                    None if v.is_null() || v == &Value::Array(vec![]) || v == &Value::Object(Default::default()) => {}
                    None if is_known_empty(k) => {}
                    None => out.push(p),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                unknown_fields(x, y, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Fields whose default value is not serialized back (false, 0, "").
fn is_known_empty(_k: &str) -> bool {
    false
}

fn dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(dns1123_label)
}

const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

fn env_name_ok(s: &str) -> bool {
    // Any printable ASCII but '=' (RelaxedEnvironmentVariableValidation, on by default).
    !s.is_empty() && s.bytes().all(|b| (32..127).contains(&b) && b != b'=')
}

struct V {
    errors: Vec<FieldError>,
}

impl V {
    fn err(&mut self, path: impl Into<String>, detail: impl Into<String>) {
        self.errors.push(FieldError { path: path.into(), detail: detail.into() });
    }

    fn required(&mut self, path: impl Into<String>) {
        self.err(path, "Required value");
    }

    fn invalid(&mut self, path: impl Into<String>, value: impl std::fmt::Debug, why: &str) {
        self.err(path, format!("Invalid value: {value:?}: {why}"));
    }

    fn unsupported(&mut self, path: impl Into<String>, value: &str, allowed: &[&str]) {
        let list: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
        self.err(path, format!("Unsupported value: \"{value}\": supported values: {}", list.join(", ")));
    }

    fn probe(&mut self, p: &Probe, path: &str, kind: &str) {
        let handlers = [p.exec.is_some(), p.http_get.is_some(), p.tcp_socket.is_some(), p.grpc.is_some()];
        match handlers.iter().filter(|h| **h).count() {
            0 => self.required(format!("{path}.exec")),
            1 => {}
            _ => self.err(format!("{path}.httpGet"), "Forbidden: may not specify more than 1 handler type"),
        }
        for (field, v) in [
            ("initialDelaySeconds", p.initial_delay_seconds),
            ("timeoutSeconds", p.timeout_seconds),
            ("periodSeconds", p.period_seconds),
            ("successThreshold", p.success_threshold),
            ("failureThreshold", p.failure_threshold),
        ] {
            if let Some(n) = v
                && n < 0
            {
                self.invalid(format!("{path}.{field}"), n, "must be greater than or equal to 0");
            }
        }
        if kind != "readinessProbe"
            && let Some(n) = p.success_threshold
            && n != 1
            && n != 0
        {
            self.invalid(format!("{path}.successThreshold"), n, "must be 1");
        }
        if let Some(g) = p.termination_grace_period_seconds {
            if kind == "readinessProbe" {
                self.invalid(format!("{path}.terminationGracePeriodSeconds"), g, "must not be set for readinessProbes");
            } else if g <= 0 {
                self.invalid(format!("{path}.terminationGracePeriodSeconds"), g, "must be greater than 0");
            }
        }
        if let Some(h) = &p.http_get
            && let Some(s) = h.scheme.as_deref()
            && s != "HTTP"
            && s != "HTTPS"
        {
            self.unsupported(format!("{path}.httpGet.scheme"), s, &["HTTP", "HTTPS"]);
        }
    }

    fn container(&mut self, c: &Container, path: &str, init: bool, volumes: &HashSet<String>) {
        if c.name.is_empty() {
            self.required(format!("{path}.name"));
        } else if !dns1123_label(&c.name) {
            self.invalid(format!("{path}.name"), &c.name, LABEL_MSG);
        }
        if c.image.as_deref().unwrap_or_default().trim().is_empty() {
            self.required(format!("{path}.image"));
        }
        if let Some(p) = c.image_pull_policy.as_deref()
            && !["Always", "IfNotPresent", "Never"].contains(&p)
        {
            self.unsupported(format!("{path}.imagePullPolicy"), p, &["Always", "IfNotPresent", "Never"]);
        }
        let sidecar = c.restart_policy.as_deref() == Some("Always");
        if let Some(r) = c.restart_policy.as_deref()
            && (!init || r != "Always")
        {
            if init {
                self.unsupported(format!("{path}.restartPolicy"), r, &["Always"]);
            } else {
                self.err(format!("{path}.restartPolicy"), "Forbidden: may not be set for non-init containers");
            }
        }
        let mut port_names = HashSet::new();
        for (i, p) in c.ports.iter().flatten().enumerate() {
            let pp = format!("{path}.ports[{i}]");
            if !(1..=65535).contains(&p.container_port) {
                self.invalid(format!("{pp}.containerPort"), p.container_port, "must be between 1 and 65535, inclusive");
            }
            if let Some(h) = p.host_port
                && h != 0
                && !(1..=65535).contains(&h)
            {
                self.invalid(format!("{pp}.hostPort"), h, "must be between 1 and 65535, inclusive");
            }
            if let Some(proto) = p.protocol.as_deref()
                && !["TCP", "UDP", "SCTP"].contains(&proto)
            {
                self.unsupported(format!("{pp}.protocol"), proto, &["SCTP", "TCP", "UDP"]);
            }
            if let Some(n) = p.name.as_deref()
                && !port_names.insert(n.to_string())
            {
                self.err(format!("{pp}.name"), format!("Duplicate value: \"{n}\""));
            }
        }
        for (i, e) in c.env.iter().flatten().enumerate() {
            if !env_name_ok(&e.name) {
                self.invalid(
                    format!("{path}.env[{i}].name"),
                    &e.name,
                    "a valid environment variable name must consist only of printable ASCII characters other than '='",
                );
            }
            if e.value.is_some() && e.value_from.is_some() {
                self.invalid(
                    format!("{path}.env[{i}].valueFrom"),
                    "",
                    "may not be specified when `value` is not empty",
                );
            }
        }
        let mut mount_paths = HashSet::new();
        for (i, m) in c.volume_mounts.iter().flatten().enumerate() {
            let mp = format!("{path}.volumeMounts[{i}]");
            if !volumes.contains(&m.name) {
                self.err(format!("{mp}.name"), format!("Not found: \"{}\"", m.name));
            }
            if m.mount_path.is_empty() {
                self.required(format!("{mp}.mountPath"));
            } else if !mount_paths.insert(m.mount_path.clone()) {
                self.invalid(format!("{mp}.mountPath"), &m.mount_path, "must be unique");
            }
            if let Some(s) = m.sub_path.as_deref()
                && let Err(e) = super::volumes::check_relative(s)
            {
                self.invalid(format!("{mp}.subPath"), s, &e);
            }
        }
        for (kind, p) in [
            ("livenessProbe", &c.liveness_probe),
            ("readinessProbe", &c.readiness_probe),
            ("startupProbe", &c.startup_probe),
        ] {
            let Some(p) = p else { continue };
            if init && !sidecar {
                self.err(
                    format!("{path}.{kind}"),
                    "Forbidden: may not be set for init containers without restartPolicy=Always",
                );
                continue;
            }
            if init && sidecar && kind == "readinessProbe" {
                // Sidecars may have all three.
            }
            self.probe(p, &format!("{path}.{kind}"), kind);
        }
        if let Some(l) = &c.lifecycle {
            if init && !sidecar {
                self.err(
                    format!("{path}.lifecycle"),
                    "Forbidden: may not be set for init containers without restartPolicy=Always",
                );
            }
            for (name, h) in [("postStart", &l.post_start), ("preStop", &l.pre_stop)] {
                let Some(h) = h else { continue };
                let n = [h.exec.is_some(), h.http_get.is_some(), h.tcp_socket.is_some(), h.sleep.is_some()]
                    .iter()
                    .filter(|x| **x)
                    .count();
                if n == 0 {
                    self.required(format!("{path}.lifecycle.{name}"));
                } else if n > 1 {
                    self.err(format!("{path}.lifecycle.{name}"), "Forbidden: may not specify more than 1 handler type");
                }
                if let Some(s) = &h.sleep
                    && s.seconds < 0
                {
                    self.invalid(
                        format!("{path}.lifecycle.{name}.sleep.seconds"),
                        s.seconds,
                        "must be greater than or equal to 0",
                    );
                }
            }
        }
        if let Some(p) = c.termination_message_policy.as_deref()
            && p != "File"
            && p != "FallbackToLogsOnError"
        {
            self.unsupported(format!("{path}.terminationMessagePolicy"), p, &["File", "FallbackToLogsOnError"]);
        }
    }
}

/// Validates a Pod; an empty list means it may run.
pub fn pod(p: &Pod) -> Vec<FieldError> {
    let mut v = V { errors: Vec::new() };
    match p.metadata.name.as_deref() {
        None | Some("") => v.err("metadata.name", "Required value: name or generateName is required"),
        Some(n) if !dns1123_subdomain(n) => v.invalid("metadata.name", n, SUBDOMAIN_MSG),
        _ => {}
    }
    if let Some(ns) = p.metadata.namespace.as_deref()
        && !dns1123_label(ns)
    {
        v.invalid("metadata.namespace", ns, LABEL_MSG);
    }
    let Some(spec) = &p.spec else {
        v.required("spec");
        return v.errors;
    };
    let mut volumes = HashSet::new();
    for (i, vol) in spec.volumes.iter().flatten().enumerate() {
        if !dns1123_label(&vol.name) {
            v.invalid(format!("spec.volumes[{i}].name"), &vol.name, LABEL_MSG);
        }
        if !volumes.insert(vol.name.clone()) {
            v.err(format!("spec.volumes[{i}].name"), format!("Duplicate value: \"{}\"", vol.name));
        }
        if let Some(h) = &vol.host_path
            && h.path.is_empty()
        {
            v.required(format!("spec.volumes[{i}].hostPath.path"));
        }
    }
    if spec.containers.is_empty() {
        v.required("spec.containers");
    }
    let mut names = HashSet::new();
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        let path = format!("spec.initContainers[{i}]");
        v.container(c, &path, true, &volumes);
        if !c.name.is_empty() && !names.insert(c.name.clone()) {
            v.err(format!("{path}.name"), format!("Duplicate value: \"{}\"", c.name));
        }
    }
    for (i, c) in spec.containers.iter().enumerate() {
        let path = format!("spec.containers[{i}]");
        v.container(c, &path, false, &volumes);
        if !c.name.is_empty() && !names.insert(c.name.clone()) {
            v.err(format!("{path}.name"), format!("Duplicate value: \"{}\"", c.name));
        }
    }
    // One host port (and protocol, and host IP) per pod.
    let mut host_ports = HashSet::new();
    for (kind, list) in
        [("initContainers", spec.init_containers.as_deref().unwrap_or_default()), ("containers", &spec.containers[..])]
    {
        for (i, c) in list.iter().enumerate() {
            for (j, p) in c.ports.iter().flatten().enumerate() {
                let Some(h) = p.host_port.filter(|h| *h != 0) else { continue };
                let key =
                    (h, p.protocol.clone().unwrap_or_else(|| "TCP".into()), p.host_ip.clone().unwrap_or_default());
                if !host_ports.insert(key.clone()) {
                    v.err(
                        format!("spec.{kind}[{i}].ports[{j}].hostPort"),
                        format!("Duplicate value: \"{}/{}\"", h, key.1),
                    );
                }
            }
        }
    }
    if let Some(r) = spec.restart_policy.as_deref()
        && !["Always", "OnFailure", "Never"].contains(&r)
    {
        v.unsupported("spec.restartPolicy", r, &["Always", "OnFailure", "Never"]);
    }
    if let Some(d) = spec.dns_policy.as_deref()
        && !["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"].contains(&d)
    {
        v.unsupported("spec.dnsPolicy", d, &["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"]);
    }
    if spec.dns_policy.as_deref() == Some("None") && spec.dns_config.is_none() {
        v.required("spec.dnsConfig");
    }
    if let Some(c) = &spec.dns_config {
        if c.nameservers.as_ref().is_some_and(|n| n.len() > 3) {
            v.invalid(
                "spec.dnsConfig.nameservers",
                c.nameservers.as_ref().unwrap(),
                "must not have more than 3 nameservers",
            );
        }
        if c.searches.as_ref().is_some_and(|n| n.len() > 32) {
            v.invalid(
                "spec.dnsConfig.searches",
                c.searches.as_ref().unwrap().len(),
                "must not have more than 32 search paths",
            );
        }
        if spec.dns_policy.as_deref() == Some("None") && c.nameservers.as_ref().is_none_or(|n| n.is_empty()) {
            v.required("spec.dnsConfig.nameservers");
        }
    }
    if let Some(g) = spec.termination_grace_period_seconds
        && g < 0
    {
        v.invalid("spec.terminationGracePeriodSeconds", g, "must be greater than or equal to 0");
    }
    if let Some(d) = spec.active_deadline_seconds
        && d <= 0
    {
        v.invalid("spec.activeDeadlineSeconds", d, "must be between 1 and 2147483647, inclusive");
    }
    if let Some(h) = spec.hostname.as_deref()
        && !dns1123_label(h)
    {
        v.invalid("spec.hostname", h, LABEL_MSG);
    }
    for (i, a) in spec.host_aliases.iter().flatten().enumerate() {
        if a.ip.parse::<std::net::IpAddr>().is_err() {
            v.invalid(format!("spec.hostAliases[{i}].ip"), &a.ip, "must be a valid IP address");
        }
    }
    v.errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> (Pod, Vec<String>) {
        let value: Value = serde_yaml::from_str(yaml).unwrap();
        let pod: Pod = serde_json::from_value(value.clone()).unwrap();
        let mut unknown = Vec::new();
        unknown_fields(&value, &serde_json::to_value(&pod).unwrap(), "", &mut unknown);
        (pod, unknown)
    }

    #[test]
    fn a_good_pod_passes() {
        let (p, unknown) = parse(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec:\n  containers:\n  - name: app\n    image: app:1\n    ports: [{containerPort: 8080, name: http}]\n    readinessProbe: {httpGet: {port: http}, periodSeconds: 1}\n",
        );
        assert_eq!(unknown, Vec::<String>::new());
        assert_eq!(pod(&p), vec![]);
    }

    #[test]
    fn errors_name_the_field_like_the_api_server() {
        let (p, unknown) = parse(
            "metadata: {name: Web}\nspec:\n  restartPolicy: Sometimes\n  initContainers:\n  - name: init\n    image: i\n    livenessProbe: {exec: {command: [x]}}\n  containers:\n  - name: app\n    imagee: app:1\n    volumeMounts: [{name: data, mountPath: /data}]\n    livenessProbe: {successThreshold: 2, tcpSocket: {port: 80}}\n  - name: app\n    image: b\n",
        );
        assert_eq!(unknown, ["spec.containers[0].imagee"]);
        let errors: Vec<String> = pod(&p).iter().map(ToString::to_string).collect();
        assert!(errors.iter().any(|e| e.starts_with("metadata.name: Invalid value: \"Web\"")), "{errors:?}");
        assert!(errors.contains(&"spec.containers[0].image: Required value".to_string()), "{errors:?}");
        assert!(errors.contains(&"spec.containers[0].volumeMounts[0].name: Not found: \"data\"".to_string()));
        assert!(
            errors.contains(
                &"spec.containers[0].livenessProbe.successThreshold: Invalid value: 2: must be 1".to_string()
            )
        );
        assert!(errors.contains(&"spec.containers[1].name: Duplicate value: \"app\"".to_string()));
        assert!(errors.contains(
            &"spec.restartPolicy: Unsupported value: \"Sometimes\": supported values: \"Always\", \"OnFailure\", \"Never\"".to_string()
        ));
        assert!(errors.contains(
            &"spec.initContainers[0].livenessProbe: Forbidden: may not be set for init containers without restartPolicy=Always"
                .to_string()
        ));
        let one = [FieldError { path: "spec.containers[0].image".into(), detail: "Required value".into() }];
        assert_eq!(message("Pod", "web", &one), "The Pod \"web\" is invalid: spec.containers[0].image: Required value");
    }

    #[test]
    fn duplicate_host_ports_and_bad_dns_are_refused() {
        let (p, _) = parse(
            "metadata: {name: web}\nspec:\n  dnsPolicy: None\n  containers:\n  - {name: a, image: a, ports: [{containerPort: 80, hostPort: 8080}]}\n  - {name: b, image: b, ports: [{containerPort: 81, hostPort: 8080}]}\n",
        );
        let errors: Vec<String> = pod(&p).iter().map(ToString::to_string).collect();
        assert!(
            errors.contains(&"spec.containers[1].ports[0].hostPort: Duplicate value: \"8080/TCP\"".to_string()),
            "{errors:?}"
        );
        assert!(errors.contains(&"spec.dnsConfig: Required value".to_string()));
    }
}
