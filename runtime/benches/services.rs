//! Criterion benchmark of the Service table's lookup at connect time: a table of 1,000 Service
//! ports with 3 endpoints each, routing a connection to one of them (round robin), to one with
//! ClientIP affinity, and to an address that is no Service (the direct path pays only this).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use wasmlet_runtime::net::services::{Protocol, ServicePortSpec, ServiceTable};

fn table() -> std::sync::Arc<ServiceTable> {
    let t = ServiceTable::new();
    let specs = (0..1000u32)
        .map(|i| ServicePortSpec {
            name: format!("ns/svc-{i}:http"),
            cluster_ip: IpAddr::from([10, 96, (i >> 8) as u8, i as u8]),
            port: 80,
            protocol: Protocol::Tcp,
            endpoints: (1..=3).map(|e| SocketAddr::from(([10, 88, (i >> 8) as u8, e], 8080))).collect(),
            affinity: (i % 2 == 1).then_some(Duration::from_secs(10_800)),
        })
        .collect();
    t.replace(specs);
    t
}

fn lookup(c: &mut Criterion) {
    let t = table();
    let client = IpAddr::from([10, 88, 0, 2]);
    let mut g = c.benchmark_group("Service table, 1,000 ports");
    let round_robin: SocketAddr = "10.96.1.244:80".parse().unwrap();
    let sticky: SocketAddr = "10.96.1.245:80".parse().unwrap();
    let direct: SocketAddr = "10.88.0.9:8080".parse().unwrap();
    g.bench_function("round robin", |b| b.iter(|| t.route(client, round_robin, Protocol::Tcp)));
    g.bench_function("ClientIP affinity", |b| b.iter(|| t.route(client, sticky, Protocol::Tcp)));
    g.bench_function("not a Service", |b| b.iter(|| t.route(client, direct, Protocol::Tcp)));
    g.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
