//! The bridge network: what a container runtime's default network is, made by wasmlet itself
//! (root, no CNI). One Linux bridge holds the first address of the pod range (the pods'
//! gateway, and the host's way to them); every pod gets a veth pair, `eth0` in its namespace
//! with its address, the other end on the bridge. So the pod IP that the CRI reports is
//! reachable from the host's own namespace, and the host never routes traffic for it anywhere
//! else.
//!
//! A pod reaches the other pods (on the bridge) and the host, on each address the host has when
//! the pod starts (a route through the gateway: the host delivers those itself). Everything
//! else is unreachable from the pod: without NAT, a packet to another machine would leave with
//! the pod's address wherever the host forwards, and its answer could not come back. Outgoing
//! wasi:http and the pod's DNS queries leave from the host's namespace instead.
//!
//! With `masquerade`, pods get a default route through the gateway instead, the host forwards,
//! and a table of wasmlet's own in nftables (`ip wasmlet_<bridge>`) masquerades what leaves the
//! pod range for elsewhere behind the host's address, and accepts the bridge's forwarded
//! traffic (another table's drop still drops it: nftables asks every base chain).

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
    masquerade: bool,
    /// An rtnetlink socket in the host's namespace (made where the bridge is).
    host: Mutex<Netlink>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bridge({} {}/{})", self.name, self.gateway, self.cidr.prefix)
    }
}

impl Bridge {
    /// Makes (or finds) the bridge `name`, up, with the first address of `cidr` on it, and with
    /// `masquerade` the NAT out. Call from a thread in the host's network namespace.
    pub fn setup(name: &str, cidr: Cidr, masquerade: bool) -> io::Result<Bridge> {
        let host = Netlink::open()?;
        let index = host.ensure_bridge(name)?;
        let gateway = cidr.gateway();
        match host.add_address(index, gateway, cidr.prefix) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("give bridge {name} the address {gateway}: {e}"))),
        }
        if masquerade {
            masquerade_out(name, cidr)?;
        }
        Ok(Bridge { name: name.to_string(), index, gateway, cidr, masquerade, host: Mutex::new(host) })
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
        let masquerade = self.masquerade;
        let host = if masquerade { Vec::new() } else { self.host_addresses()? };
        let configured = ns.configure(move |nl| {
            nl.link_up(POD_LINK)?;
            nl.add_address(POD_LINK, ip, prefix)?;
            if masquerade {
                return nl.add_default_route(POD_LINK, gateway);
            }
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

/// The nftables table of the bridge `bridge` (nft names: letters, digits and underscores).
fn nat_table(bridge: &str) -> String {
    let name: String = bridge.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("wasmlet_{name}")
}

/// The nft script that (re)makes the bridge's table: masquerade from the pod range to
/// anywhere else, and accept what the bridge forwards out and the answers coming back.
fn nat_script(bridge: &str, cidr: Cidr) -> String {
    let (t, range) = (nat_table(bridge), format!("{}/{}", cidr.base, cidr.prefix));
    format!(
        "add table ip {t}
flush table ip {t}
         add chain ip {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
         add chain ip {t} forward {{ type filter hook forward priority filter; policy accept; }}
         add rule ip {t} postrouting ip saddr {range} ip daddr != {range} masquerade
         add rule ip {t} forward iifname \"{bridge}\" accept
         add rule ip {t} forward oifname \"{bridge}\" ct state established,related accept
"
    )
}

/// Turns the host's IPv4 forwarding on and installs the bridge's NAT table with `nft`.
fn masquerade_out(bridge: &str, cidr: Cidr) -> io::Result<()> {
    use std::io::Write;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .map_err(|e| io::Error::new(e.kind(), format!("turn IPv4 forwarding on for masquerade: {e}")))?;
    let mut nft = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("run nft for masquerade (Debian's nftables): {e}")))?;
    nft.stdin.take().expect("piped").write_all(nat_script(bridge, cidr).as_bytes())?;
    let out = nft.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "nft refused the masquerade table {}: {}",
            nat_table(bridge),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nat_table_is_the_bridges_own() {
        let script = nat_script("wl-b.1", Cidr::parse("10.232.5.0/24").unwrap());
        assert!(script.starts_with("add table ip wasmlet_wl_b_1\nflush table ip wasmlet_wl_b_1\n"), "{script}");
        assert!(script.contains("ip saddr 10.232.5.0/24 ip daddr != 10.232.5.0/24 masquerade"), "{script}");
        assert!(script.contains("iifname \"wl-b.1\" accept"), "{script}");
    }

    #[test]
    fn veth_names_fit_the_kernel() {
        let id = "3f2a9c0d1e5b47a8b6c2d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4";
        assert_eq!(Bridge::veth_name(id), "wl3f2a9c0d1e5b4");
        assert_eq!(Bridge::veth_name(id).len(), netlink::MAX_IFNAME);
        assert_eq!(Bridge::veth_name("ab/c"), "wlabc");
    }
}
