//! The bridge network: what a container runtime's default network is, made by wasmlet itself
//! (root, no CNI). One Linux bridge holds the first address of the pod range (the pods'
//! gateway, and the host's way to them); every pod gets a veth pair, `eth0` in its namespace
//! with its address, the other end on the bridge. So the pod IP that the CRI reports is
//! reachable from the host's own namespace, and the host never routes traffic for it anywhere
//! else.
//!
//! A pod reaches the other pods (on the bridge) and the host, on each address the host has when
//! the pod starts (a route through the gateway: the host delivers those itself). Everything
//! else is unreachable from the pod: there is no NAT out, so a packet to another machine would
//! leave with the pod's address wherever the host forwards, and its answer could not come back.
//! Outgoing wasi:http and the pod's DNS queries leave from the host's namespace instead.

use std::io;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use super::netlink::{self, Netlink};
use super::{Cidr, NetNs};

/// The index the pod's end of its veth gets in the pod's namespace (the loopback is 1).
const POD_LINK: i32 = 2;
/// The name of the pod's end.
pub const POD_INTERFACE: &str = "eth0";

/// The node's bridge, set up.
pub struct Bridge {
    name: String,
    index: i32,
    gateway: Ipv4Addr,
    cidr: Cidr,
    /// An rtnetlink socket in the host's namespace (made where the bridge is).
    host: Mutex<Netlink>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bridge({} {}/{})", self.name, self.gateway, self.cidr.prefix)
    }
}

impl Bridge {
    /// Makes (or finds) the bridge `name`, up, with the first address of `cidr` on it. Call
    /// from a thread in the host's network namespace.
    pub fn setup(name: &str, cidr: Cidr) -> io::Result<Bridge> {
        let host = Netlink::open()?;
        let index = host.ensure_bridge(name)?;
        let gateway = cidr.gateway();
        match host.add_address(index, gateway, cidr.prefix) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("give bridge {name} the address {gateway}: {e}"))),
        }
        Ok(Bridge { name: name.to_string(), index, gateway, cidr, host: Mutex::new(host) })
    }

    /// The pods' gateway (the bridge's address).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The host's end of a sandbox's veth: `wl` and the start of its id, unique among the
    /// node's pods and within the kernel's 15 bytes.
    pub fn veth_name(sandbox_id: &str) -> String {
        let id: String = sandbox_id.chars().filter(char::is_ascii_alphanumeric).take(netlink::MAX_IFNAME - 2).collect();
        format!("wl{id}")
    }

    /// Puts the pod whose namespace is `ns` on the bridge with the address `ip`.
    pub fn attach(&self, sandbox_id: &str, ns: &Arc<NetNs>, ip: Ipv4Addr) -> io::Result<()> {
        let veth = Bridge::veth_name(sandbox_id);
        {
            let host = self.host.lock().unwrap_or_else(|e| e.into_inner());
            // A leftover of an earlier life of this sandbox id (a crash between the two).
            host.delete_link(&veth)?;
            ns.with_fd(|fd| host.add_veth(&veth, self.index, POD_INTERFACE, POD_LINK, fd))?
                .map_err(|e| io::Error::new(e.kind(), format!("veth {veth} on bridge {}: {e}", self.name)))?;
        }
        let (prefix, gateway) = (self.cidr.prefix, self.gateway);
        let host = self.host_addresses()?;
        let configured = ns.configure(move |nl| {
            nl.link_up(POD_LINK)?;
            nl.add_address(POD_LINK, ip, prefix)?;
            for addr in &host {
                nl.add_gateway_route(POD_LINK, *addr, 32, gateway)?;
            }
            nl.add_unreachable_route(Ipv4Addr::UNSPECIFIED, 0)
        });
        configured
            .map_err(|e| io::Error::new(e.kind(), format!("{POD_INTERFACE} of the pod ({ip}/{prefix}): {e}")))
            .inspect_err(|_| {
                let _ = self.detach(sandbox_id);
            })
    }

    /// The host's addresses a pod reaches through the gateway: all but the loopback's and
    /// those on the bridge's own subnet (the pod reaches those on its link).
    fn host_addresses(&self) -> io::Result<Vec<Ipv4Addr>> {
        let all = self.host.lock().unwrap_or_else(|e| e.into_inner()).ipv4_addresses()?;
        Ok(all.into_iter().filter(|a| !a.is_loopback() && !self.cidr.contains(*a)).collect())
    }

    /// Takes a sandbox's veth away (its peer in the pod goes with it).
    pub fn detach(&self, sandbox_id: &str) -> io::Result<()> {
        self.host.lock().unwrap_or_else(|e| e.into_inner()).delete_link(&Bridge::veth_name(sandbox_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_fit_the_kernel() {
        let id = "3f2a9c0d1e5b47a8b6c2d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4";
        assert_eq!(Bridge::veth_name(id), "wl3f2a9c0d1e5b4");
        assert_eq!(Bridge::veth_name(id).len(), netlink::MAX_IFNAME);
        assert_eq!(Bridge::veth_name("ab/c"), "wlabc");
    }
}
