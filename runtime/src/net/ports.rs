//! Host ports forwarded into pods. The host socket is bound in the host's namespace when the
//! sandbox is created (so a port already taken fails RunPodSandbox). TCP: each connection it
//! accepts is joined to a new connection made from inside the pod's namespace to the pod IP.
//! UDP: each client address gets a socket of its own inside the pod's namespace, so replies
//! find their way back; a flow idle for a minute is dropped.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use crate::model::PortMapping;
use crate::net::{InNetns, NetNs};
use crate::{Error, Result};

/// The CRI's protocol numbers.
pub const TCP: i32 = 0;
pub const UDP: i32 = 1;

/// How long a UDP flow lives without traffic.
const UDP_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// A bound host port.
pub enum Bound {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

/// Checks the sandbox's port mappings: one protocol per container port, one owner per host
/// port. Returns those that need a host listener.
pub fn check(pod: &str, mappings: &[PortMapping]) -> Result<Vec<PortMapping>> {
    let proto = |p: i32| match p {
        0 => "TCP",
        1 => "UDP",
        2 => "SCTP",
        _ => "?",
    };
    for (i, m) in mappings.iter().enumerate() {
        if !(0..=2).contains(&m.protocol) {
            return Err(Error::InvalidArgument(format!("pod sandbox {pod}: unknown port protocol {}", m.protocol)));
        }
        if !(1..=65535).contains(&m.container_port) || !(0..=65535).contains(&m.host_port) {
            return Err(Error::InvalidArgument(format!(
                "pod sandbox {pod}: port mapping {}:{} is out of range",
                m.host_port, m.container_port
            )));
        }
        if !m.host_ip.is_empty() && m.host_ip.parse::<IpAddr>().is_err() {
            return Err(Error::InvalidArgument(format!(
                "pod sandbox {pod}: host IP {:?} is not an address",
                m.host_ip
            )));
        }
        for earlier in &mappings[..i] {
            if earlier.container_port == m.container_port && earlier.protocol == m.protocol {
                return Err(Error::InvalidArgument(format!(
                    "pod sandbox {pod}: container port {}/{} is declared twice",
                    m.container_port,
                    proto(m.protocol)
                )));
            }
            if m.host_port != 0
                && earlier.host_port == m.host_port
                && earlier.protocol == m.protocol
                && (earlier.host_ip == m.host_ip || earlier.host_ip.is_empty() || m.host_ip.is_empty())
            {
                return Err(Error::InvalidArgument(format!(
                    "pod sandbox {pod}: host port {}/{} is mapped twice",
                    m.host_port,
                    proto(m.protocol)
                )));
            }
        }
    }
    Ok(mappings.iter().filter(|m| m.host_port != 0).cloned().collect())
}

/// Binds the host sockets of `mappings` (TCP and UDP; SCTP is refused). Call from a thread in
/// the host's namespace.
pub fn bind(pod: &str, mappings: &[PortMapping]) -> Result<Vec<(PortMapping, Bound)>> {
    let mut bound = Vec::new();
    for m in mappings {
        let ip: IpAddr =
            if m.host_ip.is_empty() { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { m.host_ip.parse().expect("checked") };
        let addr = SocketAddr::new(ip, m.host_port as u16);
        let taken = |e: std::io::Error| {
            Error::FailedPrecondition(format!("pod sandbox {pod}: cannot listen on host port {addr}: {e}"))
        };
        let nonblocking = |e: std::io::Error| Error::Internal(format!("host port {addr}: {e}"));
        let socket = match m.protocol {
            TCP => {
                let l = std::net::TcpListener::bind(addr).map_err(taken)?;
                l.set_nonblocking(true).map_err(nonblocking)?;
                Bound::Tcp(l)
            }
            UDP => {
                let u = std::net::UdpSocket::bind(addr).map_err(taken)?;
                u.set_nonblocking(true).map_err(nonblocking)?;
                Bound::Udp(u)
            }
            _ => {
                return Err(Error::Unimplemented(format!(
                    "pod sandbox {pod}: host port {}/SCTP: SCTP host ports are not forwarded",
                    m.host_port
                )));
            }
        };
        bound.push((m.clone(), socket));
    }
    Ok(bound)
}

/// Forwards datagrams to `host` to `target` from inside `ns`, and the answers back, until the
/// returned task is aborted. Spawn it on the forwarders' executor.
pub async fn forward_udp(ns: Arc<NetNs>, host: std::net::UdpSocket, target: SocketAddr) {
    let host = match tokio::net::UdpSocket::from_std(host) {
        Ok(h) => Arc::new(h),
        Err(e) => {
            tracing::error!(error = %e, "host port socket");
            return;
        }
    };
    type Flow = (Arc<tokio::net::UdpSocket>, tokio::task::AbortHandle);
    let mut flows: std::collections::HashMap<SocketAddr, Flow> = std::collections::HashMap::new();
    // Flows end with the forwarder: the set aborts them when dropped.
    let mut tasks = tokio::task::JoinSet::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, client) = tokio::select! {
            r = host.recv_from(&mut buf) => match r { Ok(x) => x, Err(_) => continue },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let live = flows.get(&client).filter(|(_, task)| !task.is_finished()).map(|(s, _)| s.clone());
        let inside = match live {
            Some(s) => s,
            None => {
                // Made on this thread, inside the pod's namespace.
                let made = ns.enter().and_then(|()| {
                    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
                    s.connect(target)?;
                    s.set_nonblocking(true)?;
                    tokio::net::UdpSocket::from_std(s)
                });
                let Ok(inside) = made.map(Arc::new) else { continue };
                let (back, host) = (inside.clone(), host.clone());
                let task = tasks.spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(Ok(n)) = tokio::time::timeout(UDP_IDLE, back.recv(&mut buf)).await {
                        let _ = host.send_to(&buf[..n], client).await;
                    }
                });
                flows.retain(|_, (_, t)| !t.is_finished());
                flows.insert(client, (inside.clone(), task));
                inside
            }
        };
        let _ = inside.send(&buf[..n]).await;
    }
}

/// Forwards connections to `listener` to `target` from inside `ns`, until the returned task is
/// aborted. Spawn it on the forwarders' executor (`WasmEngine::spawn_forwarder`).
pub async fn forward(ns: Arc<NetNs>, listener: std::net::TcpListener, target: SocketAddr) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "host port listener");
            return;
        }
    };
    loop {
        let Ok((mut outside, peer)) = listener.accept().await else { continue };
        // Request/response traffic: no waiting for more bytes to fill a segment.
        let _ = outside.set_nodelay(true);
        let ns = ns.clone();
        tokio::spawn(async move {
            let joined = InNetns::new(ns, async move {
                // Created on this thread, inside the pod's namespace.
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.set_nodelay(true)?;
                let mut inside = socket.connect(target).await?;
                tokio::io::copy_bidirectional(&mut outside, &mut inside).await.map(|_| ())
            })
            .await;
            if let Err(e) | Ok(Err(e)) = joined {
                tracing::debug!(%peer, %target, error = %e, "forwarded connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(container_port: i32, host_port: i32, protocol: i32) -> PortMapping {
        PortMapping { protocol, container_port, host_port, host_ip: String::new() }
    }

    #[test]
    fn mappings_are_checked() {
        assert_eq!(check("p", &[m(80, 0, TCP), m(81, 8081, TCP), m(80, 0, 1)]).unwrap(), vec![m(81, 8081, TCP)]);
        let err = |ms: &[PortMapping]| check("p", ms).unwrap_err().to_string();
        assert!(err(&[m(80, 0, TCP), m(80, 8080, TCP)]).contains("container port 80/TCP is declared twice"));
        assert!(err(&[m(80, 8080, TCP), m(81, 8080, TCP)]).contains("host port 8080/TCP is mapped twice"));
        assert!(err(&[m(0, 1, TCP)]).contains("out of range"));
        assert!(err(&[m(1, 1, 7)]).contains("unknown port protocol"));
        let mut bad_ip = m(80, 8080, TCP);
        bad_ip.host_ip = "localhost".into();
        assert!(err(&[bad_ip]).contains("is not an address"));
    }
}
