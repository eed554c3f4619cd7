//! A container's environment as the kubelet builds it (`makeEnvironmentVariables`): envFrom,
//! then env with `$(VAR)` expansion and valueFrom (downward API fields, resource fields,
//! ConfigMap and Secret keys), and the expansion of command and args.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, ResourceRequirements, Secret, Service};

use super::quantity::Quantity;

/// Why a container's configuration cannot be made (`CreateContainerConfigError`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Expands `$(NAME)` from `lookup`; an unknown name stays literal, `$$` is `$`, and an
/// unterminated `$(` is left as it is (the kubelet's `expansion.Expand`).
pub fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let b = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut checkpoint = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            out.push_str(&input[checkpoint..i]);
            let rest = &input[i + 1..];
            let advance = match b[i + 1] {
                b'$' => {
                    out.push('$');
                    1
                }
                b'(' => match rest.find(')') {
                    Some(close) => {
                        let name = &rest[1..close];
                        match lookup(name) {
                            Some(v) => out.push_str(&v),
                            None => {
                                out.push_str("$(");
                                out.push_str(name);
                                out.push(')');
                            }
                        }
                        close + 1
                    }
                    None => {
                        out.push_str("$(");
                        1
                    }
                },
                _ => {
                    // A lone '$': keep it and the character after it.
                    let ch = rest.chars().next().map_or(0, char::len_utf8);
                    out.push('$');
                    out.push_str(&rest[..ch]);
                    ch
                }
            };
            i += advance + 1;
            checkpoint = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&input[checkpoint..]);
    out
}

/// What a container's environment is built from besides its spec.
pub struct EnvSources<'a> {
    pub pod: &'a Pod,
    pub pod_ips: &'a [String],
    pub host_ips: &'a [String],
    pub node_name: &'a str,
    /// Node allocatable CPU (cores) and memory (bytes): a missing limit falls back to them.
    pub allocatable_cpu: Quantity,
    pub allocatable_memory: Quantity,
    pub config_maps: &'a dyn Fn(&str) -> Option<ConfigMap>,
    pub secrets: &'a dyn Fn(&str) -> Option<Secret>,
    /// The Service variables of the pod ([`service_env`]).
    pub services: &'a [(String, String)],
}

/// The Service environment variables of a pod in namespace `ns`, as the kubelet makes them:
/// the `kubernetes` Service of the default namespace always, and with enableServiceLinks every
/// Service of the pod's namespace (a Service of the same name there wins); only Services with
/// a cluster IP. Sorted by name.
pub fn service_env(services: &[Service], ns: &str, enable_links: bool) -> Vec<(String, String)> {
    let mut chosen: BTreeMap<String, &Service> = BTreeMap::new();
    for svc in services {
        let Some(ip) = svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) else { continue };
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let (svc_ns, name) =
            (svc.metadata.namespace.as_deref().unwrap_or("default"), svc.metadata.name.clone().unwrap_or_default());
        if svc_ns == ns && enable_links {
            chosen.insert(name, svc);
        } else if svc_ns == "default" && name == "kubernetes" {
            chosen.entry(name).or_insert(svc);
        }
    }
    let mut out = BTreeMap::new();
    for (name, svc) in chosen {
        let spec = svc.spec.as_ref().expect("a cluster IP means a spec");
        let ip = spec.cluster_ip.clone().unwrap_or_default();
        let prefix = name.to_uppercase().replace('-', "_");
        let ports = spec.ports.as_deref().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        out.insert(format!("{prefix}_SERVICE_HOST"), ip.clone());
        out.insert(format!("{prefix}_SERVICE_PORT"), first.port.to_string());
        for p in ports {
            if let Some(port_name) = p.name.as_deref().filter(|n| !n.is_empty()) {
                out.insert(
                    format!("{prefix}_SERVICE_PORT_{}", port_name.to_uppercase().replace('-', "_")),
                    p.port.to_string(),
                );
            }
        }
        // The Docker link variables.
        let proto = |p: &k8s_openapi::api::core::v1::ServicePort| p.protocol.clone().unwrap_or_else(|| "TCP".into());
        out.insert(format!("{prefix}_PORT"), format!("{}://{ip}:{}", proto(first).to_lowercase(), first.port));
        for p in ports {
            let (proto, port) = (proto(p), p.port);
            let base = format!("{prefix}_PORT_{port}_{}", proto.to_uppercase());
            out.insert(base.clone(), format!("{}://{ip}:{port}", proto.to_lowercase()));
            out.insert(format!("{base}_PROTO"), proto.to_lowercase());
            out.insert(format!("{base}_PORT"), port.to_string());
            out.insert(format!("{base}_ADDR"), ip.clone());
        }
    }
    out.into_iter().collect()
}

fn namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

/// A ConfigMap's keys: `data` and `binaryData` (the API server keeps their keys apart).
pub fn config_map_data(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> =
        cm.data.iter().flatten().map(|(k, v)| (k.clone(), v.clone().into_bytes())).collect();
    for (k, v) in cm.binary_data.iter().flatten() {
        data.entry(k.clone()).or_insert_with(|| v.0.clone());
    }
    data
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A Secret's keys: `data`, with `stringData` merged over it as the API server does on write.
pub fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> = s.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())).collect();
    for (k, v) in s.string_data.iter().flatten() {
        data.insert(k.clone(), v.clone().into_bytes());
    }
    data
}

/// The value of a downward API field path (`metadata.labels['app']`, `status.podIP`, ...).
pub fn field_value(pod: &Pod, path: &str, pod_ips: &[String], host_ips: &[String], node: &str) -> Option<String> {
    let meta = &pod.metadata;
    let keyed = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.as_ref().and_then(|m| m.get(key)).cloned().unwrap_or_default())
    };
    if let Some(v) = keyed("metadata.labels['", &meta.labels) {
        return Some(v);
    }
    if let Some(v) = keyed("metadata.annotations['", &meta.annotations) {
        return Some(v);
    }
    let spec = pod.spec.as_ref();
    Some(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => namespace(pod).to_string(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_else(|| node.to_string()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()).unwrap_or_default(),
        "status.podIP" => pod_ips.first().cloned().unwrap_or_default(),
        "status.podIPs" => pod_ips.join(","),
        "status.hostIP" => host_ips.first().cloned().unwrap_or_default(),
        "status.hostIPs" => host_ips.join(","),
        _ => return None,
    })
}

/// The value of a resourceFieldRef (`limits.memory` with a divisor), rounded up; a missing limit
/// falls back to node allocatable, a missing request to zero... as the kubelet does, requests
/// fall back to limits' defaulting, which the API server already did.
pub fn resource_value(
    resources: Option<&ResourceRequirements>,
    resource: &str,
    divisor: Option<&Quantity>,
    allocatable_cpu: &Quantity,
    allocatable_memory: &Quantity,
) -> Result<String, ConfigError> {
    let (section, name) =
        resource.split_once('.').ok_or_else(|| ConfigError(format!("unsupported container resource: {resource}")))?;
    let list = match section {
        "limits" => resources.and_then(|r| r.limits.as_ref()),
        "requests" => resources.and_then(|r| r.requests.as_ref()),
        _ => return Err(ConfigError(format!("unsupported container resource: {resource}"))),
    };
    let given = list.and_then(|l| l.get(name)).map(|q| Quantity::parse(&q.0)).transpose().map_err(ConfigError)?;
    let value = match (given, section, name) {
        (Some(v), _, _) => v,
        (None, "limits", "cpu") => *allocatable_cpu,
        (None, "limits", "memory") => *allocatable_memory,
        (None, "requests", "cpu") | (None, "requests", "memory") => Quantity::ZERO,
        (None, _, n) if n == "ephemeral-storage" || n.starts_with("hugepages-") => Quantity::ZERO,
        (None, _, _) => return Err(ConfigError(format!("unsupported container resource: {resource}"))),
    };
    let default_divisor = Quantity::ONE;
    let divisor = divisor.unwrap_or(&default_divisor);
    if divisor.is_zero() {
        return Err(ConfigError(format!("resource {resource}: divisor must be positive")));
    }
    Ok(value.div_ceil(divisor).to_string())
}

/// Builds the container's environment in order: envFrom sources (prefix applied, later ones
/// winning), then env (expanded, valueFrom resolved, overriding envFrom).
pub fn build(c: &Container, s: &EnvSources<'_>) -> Result<Vec<(String, String)>, ConfigError> {
    let ns = namespace(s.pod);
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| match env.iter_mut().find(|(n, _)| *n == k) {
        Some(slot) => slot.1 = v,
        None => env.push((k, v)),
    };
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            let name = r.name.as_str();
            match (s.config_maps)(name) {
                Some(cm) => {
                    for (k, v) in config_map_data(&cm) {
                        set(&mut env, format!("{prefix}{k}"), text(v));
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(ConfigError(format!("configmap \"{name}\" not found"))),
            }
        }
        if let Some(r) = &from.secret_ref {
            let name = r.name.as_str();
            match (s.secrets)(name) {
                Some(secret) => {
                    for (k, v) in secret_data(&secret) {
                        set(&mut env, format!("{prefix}{k}"), text(v));
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(ConfigError(format!("secret \"{name}\" not found"))),
            }
        }
    }
    for var in c.env.iter().flatten() {
        if let Some(v) = value_of(var, c, s, ns, &env)? {
            set(&mut env, var.name.clone(), v);
        }
    }
    // Service variables last, where the pod did not define the name itself.
    for (k, v) in s.services {
        if !env.iter().any(|(n, _)| n == k) {
            env.push((k.clone(), v.clone()));
        }
    }
    Ok(env)
}

fn value_of(
    var: &EnvVar,
    c: &Container,
    s: &EnvSources<'_>,
    ns: &str,
    so_far: &[(String, String)],
) -> Result<Option<String>, ConfigError> {
    if let Some(v) = &var.value {
        let lookup =
            |name: &str| so_far.iter().chain(s.services.iter()).find(|(k, _)| k == name).map(|(_, v)| v.clone());
        return Ok(Some(expand(v, &lookup)));
    }
    let Some(from) = &var.value_from else { return Ok(Some(String::new())) };
    if let Some(f) = &from.field_ref {
        return field_value(s.pod, &f.field_path, s.pod_ips, s.host_ips, s.node_name)
            .map(Some)
            .ok_or_else(|| ConfigError(format!("env {}: unsupported fieldPath: {}", var.name, f.field_path)));
    }
    if let Some(r) = &from.resource_field_ref {
        let divisor = r.divisor.as_ref().map(|d| Quantity::parse(&d.0)).transpose().map_err(ConfigError)?;
        return resource_value(
            c.resources.as_ref(),
            &r.resource,
            divisor.as_ref(),
            &s.allocatable_cpu,
            &s.allocatable_memory,
        )
        .map(Some);
    }
    if let Some(r) = &from.config_map_key_ref {
        let optional = r.optional == Some(true);
        let Some(cm) = (s.config_maps)(&r.name) else {
            return if optional { Ok(None) } else { Err(ConfigError(format!("configmap \"{}\" not found", r.name))) };
        };
        return match config_map_data(&cm).remove(&r.key) {
            Some(v) => Ok(Some(text(v))),
            None if optional => Ok(None),
            None => Err(ConfigError(format!("couldn't find key {} in ConfigMap {ns}/{}", r.key, r.name))),
        };
    }
    if let Some(r) = &from.secret_key_ref {
        let optional = r.optional == Some(true);
        let Some(secret) = (s.secrets)(&r.name) else {
            return if optional { Ok(None) } else { Err(ConfigError(format!("secret \"{}\" not found", r.name))) };
        };
        return match secret_data(&secret).remove(&r.key) {
            Some(v) => Ok(Some(text(v))),
            None if optional => Ok(None),
            None => Err(ConfigError(format!("couldn't find key {} in Secret {ns}/{}", r.key, r.name))),
        };
    }
    Ok(Some(String::new()))
}

/// Expands command or args against the final environment.
pub fn expand_all(items: &[String], env: &[(String, String)]) -> Vec<String> {
    let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    items.iter().map(|i| expand(i, &lookup)).collect()
}

/// An exec probe's command, expanded with the container's literal `env[].value` entries only.
pub fn expand_probe_command(cmd: &[String], c: &Container) -> Vec<String> {
    let literal: Vec<(String, String)> =
        c.env.iter().flatten().filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v))).collect();
    expand_all(cmd, &literal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, ConfigMapKeySelector, EnvFromSource, EnvVarSource, ObjectFieldSelector, PodSpec,
        ResourceFieldSelector, SecretKeySelector,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity as KQ;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn expansion_follows_the_kubelet() {
        let l = vars(&[("A", "a"), ("EMPTY", "")]);
        assert_eq!(expand("$(A)", &l), "a");
        assert_eq!(expand("x$(A)y$(A)", &l), "xaya");
        assert_eq!(expand("$(B)", &l), "$(B)", "unknown stays literal");
        assert_eq!(expand("$$(A)", &l), "$(A)", "escaped");
        assert_eq!(expand("$$$(A)", &l), "$a");
        assert_eq!(expand("$(A", &l), "$(A", "unterminated");
        assert_eq!(expand("$", &l), "$");
        assert_eq!(expand("a$b", &l), "a$b");
        assert_eq!(expand("$(EMPTY)x", &l), "x");
        assert_eq!(expand("$()", &l), "$()");
        assert_eq!(expand("é$(A)é$é", &l), "éaé$é");
    }

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                uid: Some("u-1".into()),
                labels: Some([("app".to_string(), "web".to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec { service_account_name: Some("sa".into()), ..Default::default() }),
            ..Default::default()
        }
    }

    fn cm() -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta { name: Some("conf".into()), ..Default::default() },
            data: Some([("MODE".to_string(), "fast".to_string()), ("LEVEL".to_string(), "3".to_string())].into()),
            ..Default::default()
        }
    }

    fn secret() -> Secret {
        Secret {
            metadata: ObjectMeta { name: Some("creds".into()), ..Default::default() },
            data: Some([("user".to_string(), ByteString(b"ada".to_vec()))].into()),
            string_data: Some([("pass".to_string(), "s3cret".to_string())].into()),
            ..Default::default()
        }
    }

    fn sources<'a>(
        p: &'a Pod,
        cms: &'a dyn Fn(&str) -> Option<ConfigMap>,
        secrets: &'a dyn Fn(&str) -> Option<Secret>,
    ) -> EnvSources<'a> {
        EnvSources {
            pod: p,
            pod_ips: &[],
            host_ips: &[],
            node_name: "node-1",
            allocatable_cpu: Quantity::parse("2").unwrap(),
            allocatable_memory: Quantity::parse("24Gi").unwrap(),
            config_maps: cms,
            secrets,
            services: &[],
        }
    }

    #[test]
    fn service_variables_as_the_kubelet_makes_them() {
        let svc = |ns: &str, name: &str, ip: &str, ports: serde_json::Value| -> Service {
            serde_json::from_value(serde_json::json!({"metadata": {"name": name, "namespace": ns},
                "spec": {"clusterIP": ip, "ports": ports}}))
            .unwrap()
        };
        let all = [
            svc("default", "kubernetes", "10.96.0.1", serde_json::json!([{"name": "https", "port": 443}])),
            svc(
                "shop",
                "web-front",
                "10.96.0.20",
                serde_json::json!([{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]),
            ),
            svc("shop", "headless", "None", serde_json::json!([{"port": 1}])),
            svc("other", "db", "10.96.0.30", serde_json::json!([{"port": 5432}])),
        ];
        let env: BTreeMap<String, String> = service_env(&all, "shop", true).into_iter().collect();
        assert_eq!(env["KUBERNETES_SERVICE_HOST"], "10.96.0.1");
        assert_eq!(env["KUBERNETES_SERVICE_PORT"], "443");
        assert_eq!(env["KUBERNETES_SERVICE_PORT_HTTPS"], "443");
        assert_eq!(env["WEB_FRONT_SERVICE_HOST"], "10.96.0.20");
        assert_eq!(env["WEB_FRONT_SERVICE_PORT"], "80");
        assert_eq!(env["WEB_FRONT_SERVICE_PORT_DNS"], "53");
        assert_eq!(env["WEB_FRONT_PORT"], "tcp://10.96.0.20:80");
        assert_eq!(env["WEB_FRONT_PORT_53_UDP"], "udp://10.96.0.20:53");
        assert_eq!(env["WEB_FRONT_PORT_53_UDP_PROTO"], "udp");
        assert_eq!(env["WEB_FRONT_PORT_80_TCP_PORT"], "80");
        assert_eq!(env["WEB_FRONT_PORT_80_TCP_ADDR"], "10.96.0.20");
        assert!(!env.keys().any(|k| k.starts_with("HEADLESS") || k.starts_with("DB_")), "{env:?}");
        let off: Vec<String> = service_env(&all, "shop", false).into_iter().map(|(k, _)| k).collect();
        assert!(off.iter().all(|k| k.starts_with("KUBERNETES_")), "enableServiceLinks false: {off:?}");
        // The pod's own variables win, and may refer to Service variables.
        let p = pod();
        let c: Container = serde_json::from_value(serde_json::json!({"name": "c", "env": [
            {"name": "KUBERNETES_SERVICE_PORT", "value": "mine"},
            {"name": "URL", "value": "http://$(WEB_FRONT_SERVICE_HOST)/"}]}))
        .unwrap();
        let svc_env = service_env(&all, "shop", true);
        let (cms, secrets) = (|_: &str| None, |_: &str| None);
        let mut s = sources(&p, &cms, &secrets);
        s.services = &svc_env;
        let built: BTreeMap<String, String> = build(&c, &s).unwrap().into_iter().collect();
        assert_eq!(built["KUBERNETES_SERVICE_PORT"], "mine");
        assert_eq!(built["URL"], "http://10.96.0.20/");
        assert_eq!(built["WEB_FRONT_SERVICE_PORT"], "80");
    }

    fn from(f: EnvVarSource) -> Option<EnvVarSource> {
        Some(f)
    }

    #[test]
    fn env_from_then_env_with_value_from_and_expansion() {
        let p = pod();
        let cms = |n: &str| (n == "conf").then(cm);
        let secrets = |n: &str| (n == "creds").then(secret);
        let ips = ["10.88.0.7".to_string()];
        let mut s = sources(&p, &cms, &secrets);
        s.pod_ips = &ips;
        let c = Container {
            env_from: Some(vec![EnvFromSource {
                prefix: Some("CFG_".into()),
                config_map_ref: Some(ConfigMapEnvSource { name: "conf".into(), optional: None }),
                ..Default::default()
            }]),
            env: Some(vec![
                EnvVar { name: "CFG_MODE".into(), value: Some("slow".into()), ..Default::default() },
                EnvVar {
                    name: "GREETING".into(),
                    value: Some("mode=$(CFG_MODE) $$(CFG_MODE) $(NOPE)".into()),
                    ..Default::default()
                },
                EnvVar {
                    name: "POD".into(),
                    value_from: from(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "metadata.name".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                EnvVar {
                    name: "APP".into(),
                    value_from: from(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "metadata.labels['app']".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                EnvVar {
                    name: "IP".into(),
                    value_from: from(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "status.podIP".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                EnvVar {
                    name: "USER".into(),
                    value_from: from(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "creds".into(),
                            key: "user".into(),
                            optional: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                EnvVar {
                    name: "PASS".into(),
                    value_from: from(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "creds".into(),
                            key: "pass".into(),
                            optional: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                EnvVar {
                    name: "MAYBE".into(),
                    value_from: from(EnvVarSource {
                        config_map_key_ref: Some(ConfigMapKeySelector {
                            name: "absent".into(),
                            key: "k".into(),
                            optional: Some(true),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                EnvVar {
                    name: "MEM".into(),
                    value_from: from(EnvVarSource {
                        resource_field_ref: Some(ResourceFieldSelector {
                            resource: "limits.memory".into(),
                            divisor: Some(KQ("1Mi".into())),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            resources: Some(ResourceRequirements {
                limits: Some([("memory".to_string(), KQ("64M".into()))].into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let env = build(&c, &s).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CFG_MODE"), Some("slow"), "env overrides envFrom");
        assert_eq!(get("CFG_LEVEL"), Some("3"));
        assert_eq!(get("GREETING"), Some("mode=slow $(CFG_MODE) $(NOPE)"));
        assert_eq!(get("POD"), Some("web"));
        assert_eq!(get("APP"), Some("web"));
        assert_eq!(get("IP"), Some("10.88.0.7"));
        assert_eq!(get("USER"), Some("ada"));
        assert_eq!(get("PASS"), Some("s3cret"), "stringData is merged");
        assert_eq!(get("MAYBE"), None, "a missing optional source skips the variable");
        // 64M = 64,000,000 bytes = 61.03 MiB, rounded up.
        assert_eq!(get("MEM"), Some("62"));
        // The order is envFrom's, then env's new names.
        assert_eq!(env[0].0, "CFG_LEVEL");
        // command and args expand against the final environment.
        let args = expand_all(&["--user=$(USER)".into(), "$(MISSING)".into()], &env);
        assert_eq!(args, ["--user=ada", "$(MISSING)"]);
    }

    #[test]
    fn missing_required_sources_are_config_errors() {
        let p = pod();
        let cms = |n: &str| (n == "conf").then(cm);
        let secrets = |_: &str| None;
        let s = sources(&p, &cms, &secrets);
        let key = |name: &str, key: &str| Container {
            env: Some(vec![EnvVar {
                name: "X".into(),
                value_from: from(EnvVarSource {
                    config_map_key_ref: Some(ConfigMapKeySelector {
                        name: name.into(),
                        key: key.into(),
                        optional: None,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(build(&key("conf", "nope"), &s).unwrap_err().0, "couldn't find key nope in ConfigMap shop/conf");
        assert_eq!(build(&key("gone", "k"), &s).unwrap_err().0, "configmap \"gone\" not found");
        let sec = Container {
            env: Some(vec![EnvVar {
                name: "X".into(),
                value_from: from(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector { name: "creds".into(), key: "k".into(), optional: None }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(build(&sec, &s).unwrap_err().0, "secret \"creds\" not found");
        let optional_from = Container {
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource { name: "gone".into(), optional: Some(true) }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(build(&optional_from, &s).unwrap(), vec![]);
    }

    #[test]
    fn resource_fields_round_up_and_fall_back_to_allocatable() {
        let cpu = Quantity::parse("2").unwrap();
        let mem = Quantity::parse("1Gi").unwrap();
        let r = ResourceRequirements {
            limits: Some([("cpu".to_string(), KQ("250m".into()))].into()),
            requests: Some([("memory".to_string(), KQ("100Mi".into()))].into()),
            ..Default::default()
        };
        let m = Quantity::parse("1m").unwrap();
        let mi = Quantity::parse("1Mi").unwrap();
        assert_eq!(resource_value(Some(&r), "limits.cpu", None, &cpu, &mem).unwrap(), "1", "0.25 core rounds up");
        assert_eq!(resource_value(Some(&r), "limits.cpu", Some(&m), &cpu, &mem).unwrap(), "250");
        assert_eq!(resource_value(Some(&r), "limits.memory", Some(&mi), &cpu, &mem).unwrap(), "1024");
        assert_eq!(resource_value(Some(&r), "requests.memory", Some(&mi), &cpu, &mem).unwrap(), "100");
        assert_eq!(resource_value(None, "requests.cpu", None, &cpu, &mem).unwrap(), "0");
        assert!(resource_value(None, "limits.gpu", None, &cpu, &mem).is_err());
    }

    #[test]
    fn probe_commands_expand_with_literal_env_only() {
        let c = Container {
            env: Some(vec![
                EnvVar { name: "F".into(), value: Some("/tmp/ok".into()), ..Default::default() },
                EnvVar {
                    name: "G".into(),
                    value_from: from(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "metadata.name".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        assert_eq!(expand_probe_command(&["cat".into(), "$(F)".into(), "$(G)".into()], &c), ["cat", "/tmp/ok", "$(G)"]);
    }
}
