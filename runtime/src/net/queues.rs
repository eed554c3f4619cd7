//! What a guest's sockets hold in the kernel: the bytes queued in their receive and send
//! queues, which a cgroup would charge to the process (memory.stat's `sock`).
//!
//! A guest's sockets are wasmtime-wasi's, out of reach while the guest runs; as in
//! [`listeners`](super::listeners), they are found the way `ss` finds them, in the tables of
//! the pod's namespace (`/proc/thread-self/net/{tcp,tcp6,udp,udp6}`, read inside it). A
//! socket is the container's when its local port is one the container bound or listened on
//! (its listeners and the connections they accepted) or its remote address is one the
//! container connected to. The first container that claims a socket gets it.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The most remote addresses a container's claim keeps: past that, new ones are not noted
/// (a guest dialling thousands of peers has its first ones counted).
const MAX_PEERS: usize = 1024;
/// The most local ports a claim keeps.
const MAX_PORTS: usize = 256;

/// Which sockets of its namespace a container owns (see the module's text).
#[derive(Debug, Default, Clone)]
pub struct SocketClaim {
    ports: HashSet<u16>,
    peers: HashSet<SocketAddr>,
}

impl SocketClaim {
    /// The container bound or listened on `port` (0, a port the kernel picks, is not noted).
    pub fn bound(&mut self, port: u16) {
        if port != 0 && self.ports.len() < MAX_PORTS {
            self.ports.insert(port);
        }
    }

    /// The container connected (TCP) or sent a datagram (UDP) to `peer`.
    pub fn connected(&mut self, peer: SocketAddr) {
        if self.peers.len() < MAX_PEERS {
            self.peers.insert(peer);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty() && self.peers.is_empty()
    }

    fn owns(&self, e: &Entry) -> bool {
        self.ports.contains(&e.local_port) || self.peers.contains(&e.remote)
    }
}

/// One socket of a `/proc/net` table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    local_port: u16,
    remote: SocketAddr,
    /// Bytes in its send and receive queues.
    queued: u64,
}

/// The queued bytes of each claim's sockets in the namespace this thread is in, in order.
/// Blocking: call it off the executor, inside the pod's namespace.
pub fn queued_bytes(claims: &[SocketClaim]) -> io::Result<Vec<u64>> {
    let mut totals = vec![0u64; claims.len()];
    for (table, tcp) in [("tcp", true), ("tcp6", true), ("udp", false), ("udp6", false)] {
        let text = match std::fs::read_to_string(format!("/proc/thread-self/net/{table}")) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        assign(&parse(&text, tcp), claims, &mut totals);
    }
    Ok(totals)
}

/// Adds each socket's queued bytes to the first claim that owns it.
fn assign(entries: &[Entry], claims: &[SocketClaim], totals: &mut [u64]) {
    for e in entries {
        if let Some(i) = claims.iter().position(|c| c.owns(e)) {
            totals[i] += e.queued;
        }
    }
}

/// The sockets of a `/proc/net/{tcp,udp}{,6}` table. A TCP listener's "receive queue" is its
/// accept backlog (a count, not bytes): its waiting connections have entries of their own.
fn parse(table: &str, tcp: bool) -> Vec<Entry> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state, queues) = (f.get(1)?, f.get(2)?, f.get(3)?, f.get(4)?);
            let (_, local_port) = address(local)?;
            let remote = address(remote)?;
            let (tx, rx) = queues.split_once(':')?;
            let (tx, rx) = (u64::from_str_radix(tx, 16).ok()?, u64::from_str_radix(rx, 16).ok()?);
            let queued = if tcp && *state == "0A" { 0 } else { tx + rx };
            Some(Entry { local_port, remote: SocketAddr::new(remote.0, remote.1), queued })
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6) and a port: the kernel prints each 32-bit
/// word of the address as the host's integer.
fn address(field: &str) -> Option<(IpAddr, u16)> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(|w| w.to_ne_bytes());
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(&ip[i * 8..i * 8 + 8])?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F90 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n\
   1: 0100007F:1F90 0100007F:9C40 01 00000000:00010000 00:00000000 00000000     0        0 4343 1 0 20 4 30 10 -1\n\
   2: 0100007F:9C41 0201A8C0:0050 01 00000200:00000000 00:00000000 00000000     0        0 4444 1 0 20 4 30 10 -1\n\
   3: 0100007F:9C42 0301A8C0:0050 01 00000100:00000100 00:00000000 00000000     0        0 4545 1 0 20 4 30 10 -1\n";

    #[test]
    fn the_tables_are_read_as_the_kernel_prints_them() {
        let e = parse(TCP, true);
        assert_eq!(e.len(), 4);
        assert_eq!(e[0].queued, 0, "a listener's backlog is not bytes");
        assert_eq!(e[1], Entry { local_port: 8080, remote: "127.0.0.1:40000".parse().unwrap(), queued: 65536 });
        assert_eq!(e[2].remote, "192.168.1.2:80".parse::<SocketAddr>().unwrap());
        assert_eq!(e[2].queued, 512);
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue\n\
   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:A000 01 00000000:00000010 00\n";
        let e = parse(v6, true);
        assert_eq!(e[0].remote, "[::1]:40960".parse::<SocketAddr>().unwrap());
        assert_eq!(e[0].queued, 16);
        assert!(parse("header\n garbage line\n", true).is_empty());
    }

    #[test]
    fn a_socket_belongs_to_the_first_claim_that_names_it() {
        let mut server = SocketClaim::default();
        server.bound(8080);
        let mut client = SocketClaim::default();
        client.connected("192.168.1.2:80".parse().unwrap());
        client.bound(8080);
        let entries = parse(TCP, true);
        let mut totals = [0, 0];
        assign(&entries, &[server.clone(), client.clone()], &mut totals);
        assert_eq!(totals, [65536, 512], "the listener and the connection it accepted are the server's");
        let mut totals = [0, 0];
        assign(&entries, &[client, server], &mut totals);
        assert_eq!(totals, [65536 + 512, 0]);
        assert!(SocketClaim::default().is_empty());
        let mut zero = SocketClaim::default();
        zero.bound(0);
        assert!(zero.is_empty(), "port 0 is the kernel's pick, not a port of the guest's");
    }

    #[test]
    fn this_threads_tables_are_readable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut sender = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_held, _) = listener.accept().unwrap();
        std::io::Write::write_all(&mut sender, &[7u8; 4096]).unwrap();
        let mut claim = SocketClaim::default();
        claim.bound(port);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let got = queued_bytes(std::slice::from_ref(&claim)).unwrap()[0];
            if got == 4096 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "queued {got}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
