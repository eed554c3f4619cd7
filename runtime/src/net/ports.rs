//! Host ports forwarded into pods. The listener is bound in the host's namespace when the
//! sandbox is created (so a port already taken fails RunPodSandbox); each connection it accepts
//! is joined to a new connection made from inside the pod's namespace to the pod IP.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use crate::model::PortMapping;
use crate::net::{InNetns, NetNs};
use crate::{Error, Result};

/// The CRI's protocol numbers.
pub const TCP: i32 = 0;

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

/// Binds the host listeners of `mappings` (TCP; the other protocols are refused). Call from a
/// thread in the host's namespace.
pub fn bind(pod: &str, mappings: &[PortMapping]) -> Result<Vec<(PortMapping, std::net::TcpListener)>> {
    let mut bound = Vec::new();
    for m in mappings {
        if m.protocol != TCP {
            return Err(Error::Unimplemented(format!(
                "pod sandbox {pod}: host port {} is not TCP; only TCP host ports are forwarded so far",
                m.host_port
            )));
        }
        let ip: IpAddr =
            if m.host_ip.is_empty() { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { m.host_ip.parse().expect("checked") };
        let addr = SocketAddr::new(ip, m.host_port as u16);
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            Error::FailedPrecondition(format!("pod sandbox {pod}: cannot listen on host port {addr}: {e}"))
        })?;
        listener.set_nonblocking(true).map_err(|e| Error::Internal(format!("host port {addr}: {e}")))?;
        bound.push((m.clone(), listener));
    }
    Ok(bound)
}

/// Forwards connections to `listener` to `target` from inside `ns`, until the returned task is
/// aborted. Spawn it on the pod executor.
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
