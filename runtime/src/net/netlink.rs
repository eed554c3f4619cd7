//! The rtnetlink requests pod networks need, as bytes on a NETLINK_ROUTE socket: set a link
//! up, add an IPv4 address, and for the bridge network make a bridge, a veth pair with one end
//! in a pod's namespace, a default route, and delete a link. No C library, no `ip` command, no
//! unsafe code.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, netlink};

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const NLMSG_DONE: u16 = 3;
const NLM_F_DUMP: u16 = 0x300;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFF_UP: u32 = 0x1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const AF_INET: u8 = 2;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RTN_UNICAST: u8 = 1;
const RTN_UNREACHABLE: u8 = 7;
const RTA_DST: u16 = 1;
const RT_SCOPE_LINK: u8 = 253;
/// The longest interface name the kernel takes (IFNAMSIZ less its NUL).
pub const MAX_IFNAME: usize = 15;

/// A `struct ifinfomsg` for the link `index`, with `up` setting IFF_UP.
fn ifinfo(index: i32, up: bool) -> Vec<u8> {
    let mut body = vec![0u8, 0];
    body.extend_from_slice(&0u16.to_ne_bytes());
    body.extend_from_slice(&index.to_ne_bytes());
    let flag = if up { IFF_UP } else { 0 };
    body.extend_from_slice(&flag.to_ne_bytes());
    body.extend_from_slice(&flag.to_ne_bytes());
    body
}

/// Appends the attribute `kind` holding `value` (padded to 4 bytes).
fn attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// A link name as the kernel takes it: NUL-terminated, at most [`MAX_IFNAME`] bytes.
fn ifname(name: &str) -> io::Result<Vec<u8>> {
    if name.is_empty() || name.len() > MAX_IFNAME || name.contains(['/', '\0']) || name.contains(char::is_whitespace) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("interface name {name:?}")));
    }
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    Ok(v)
}

/// A NETLINK_ROUTE socket in the calling thread's network namespace.
pub struct Netlink {
    fd: OwnedFd,
}

impl Netlink {
    /// Opens one.
    pub fn open() -> io::Result<Netlink> {
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            None, // NETLINK_ROUTE is protocol 0
        )?;
        Ok(Netlink { fd })
    }

    /// Sets the link with index `index` up (the loopback is 1 in a new namespace).
    pub fn link_up(&self, index: i32) -> io::Result<()> {
        self.request(RTM_NEWLINK, 0, &ifinfo(index, true))
    }

    /// The index of the link called `name`; None if there is none.
    pub fn link_index(&self, name: &str) -> io::Result<Option<i32>> {
        let mut body = ifinfo(0, false);
        attr(&mut body, IFLA_IFNAME, &ifname(name)?);
        let reply = self.exchange(RTM_GETLINK, 0, &body)?;
        match u16::from_ne_bytes([reply[4], reply[5]]) {
            RTM_NEWLINK if reply.len() >= 24 => {
                Ok(Some(i32::from_ne_bytes([reply[20], reply[21], reply[22], reply[23]])))
            }
            _ => match ack(&reply) {
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NODEV.raw_os_error()) => Ok(None),
                Err(e) => Err(e),
                Ok(()) => Err(io::Error::other("rtnetlink: unexpected reply")),
            },
        }
    }

    /// Makes a bridge called `name`, up, unless a link of that name exists; its index.
    pub fn ensure_bridge(&self, name: &str) -> io::Result<i32> {
        if let Some(index) = self.link_index(name)? {
            self.link_up(index)?;
            return Ok(index);
        }
        let mut body = ifinfo(0, true);
        attr(&mut body, IFLA_IFNAME, &ifname(name)?);
        let mut info = Vec::new();
        attr(&mut info, IFLA_INFO_KIND, b"bridge");
        attr(&mut body, IFLA_LINKINFO | NLA_F_NESTED, &info);
        match self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &body) {
            Ok(()) => {}
            // Made by another process meanwhile.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        self.link_index(name)?.ok_or_else(|| io::Error::other(format!("bridge {name} vanished after it was made")))
    }

    /// Makes a veth pair: `host` here, up and enslaved to the bridge `master`, and its peer
    /// `peer` in the namespace `netns` with index `peer_index` (down: the pod's side sets it
    /// up).
    pub fn add_veth(
        &self,
        host: &str,
        master: i32,
        peer: &str,
        peer_index: i32,
        netns: std::os::fd::BorrowedFd<'_>,
    ) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut peer_msg = ifinfo(peer_index, false);
        attr(&mut peer_msg, IFLA_IFNAME, &ifname(peer)?);
        attr(&mut peer_msg, IFLA_NET_NS_FD, &(netns.as_raw_fd() as u32).to_ne_bytes());
        let mut data = Vec::new();
        attr(&mut data, VETH_INFO_PEER | NLA_F_NESTED, &peer_msg);
        let mut info = Vec::new();
        attr(&mut info, IFLA_INFO_KIND, b"veth");
        attr(&mut info, IFLA_INFO_DATA | NLA_F_NESTED, &data);
        let mut body = ifinfo(0, true);
        attr(&mut body, IFLA_IFNAME, &ifname(host)?);
        attr(&mut body, IFLA_MASTER, &(master as u32).to_ne_bytes());
        attr(&mut body, IFLA_LINKINFO | NLA_F_NESTED, &info);
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &body)
    }

    /// Deletes the link called `name` (a veth takes its peer along); Ok if there is none.
    pub fn delete_link(&self, name: &str) -> io::Result<()> {
        let mut body = ifinfo(0, false);
        attr(&mut body, IFLA_IFNAME, &ifname(name)?);
        match self.request(RTM_DELLINK, 0, &body) {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NODEV.raw_os_error()) => Ok(()),
            r => r,
        }
    }

    /// Adds the default route through `gateway` on the link `index`.
    pub fn add_default_route(&self, index: i32, gateway: Ipv4Addr) -> io::Result<()> {
        self.add_gateway_route(index, Ipv4Addr::UNSPECIFIED, 0, gateway)
    }

    /// Adds a route to `dst/prefix` through `gateway` on the link `index`.
    pub fn add_gateway_route(&self, index: i32, dst: Ipv4Addr, prefix: u8, gateway: Ipv4Addr) -> io::Result<()> {
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        let mut body = vec![AF_INET, prefix, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, 0, RTN_UNICAST];
        body.extend_from_slice(&0u32.to_ne_bytes());
        if prefix > 0 {
            attr(&mut body, RTA_DST, &dst.octets());
        }
        attr(&mut body, RTA_GATEWAY, &gateway.octets());
        attr(&mut body, RTA_OIF, &(index as u32).to_ne_bytes());
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &body)
    }

    /// Adds a route to `dst/prefix` straight on the link `index` (scope link: no gateway).
    pub fn add_link_route(&self, index: i32, dst: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut body = vec![AF_INET, prefix, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_LINK, RTN_UNICAST];
        body.extend_from_slice(&0u32.to_ne_bytes());
        attr(&mut body, RTA_DST, &dst.octets());
        attr(&mut body, RTA_OIF, &(index as u32).to_ne_bytes());
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &body)
    }

    /// Makes `dst/prefix` unreachable (a connect fails at once, nothing is sent).
    pub fn add_unreachable_route(&self, dst: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut body = vec![AF_INET, prefix, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, 0, RTN_UNREACHABLE];
        body.extend_from_slice(&0u32.to_ne_bytes());
        attr(&mut body, RTA_DST, &dst.octets());
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &body)
    }

    /// Adds `addr/prefix` to the link with index `index`.
    pub fn add_address(&self, index: i32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        // struct ifaddrmsg: family, prefixlen, flags, scope, index; then IFA_LOCAL, IFA_ADDRESS.
        let mut body = vec![AF_INET, prefix, 0, 0];
        body.extend_from_slice(&(index as u32).to_ne_bytes());
        for kind in [IFA_LOCAL, IFA_ADDRESS] {
            body.extend_from_slice(&8u16.to_ne_bytes());
            body.extend_from_slice(&kind.to_ne_bytes());
            body.extend_from_slice(&addr.octets());
        }
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &body)
    }

    /// The IPv4 addresses of every link in this namespace.
    pub fn ipv4_addresses(&self) -> io::Result<Vec<Ipv4Addr>> {
        // struct ifaddrmsg: family, prefixlen, flags, scope, index (0: every link).
        let body = [AF_INET, 0, 0, 0, 0, 0, 0, 0];
        self.send(RTM_GETADDR, NLM_F_DUMP, &body)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let (n, _) = rustix::net::recv(&self.fd, &mut buf, RecvFlags::empty())?;
            let mut rest = &buf[..n];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                if len < 16 || len > rest.len() {
                    return Err(io::Error::other("rtnetlink: malformed address dump"));
                }
                let msg = &rest[..len];
                match u16::from_ne_bytes([msg[4], msg[5]]) {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        ack(msg)?;
                    }
                    RTM_NEWADDR if len >= 24 && msg[16] == AF_INET => out.extend(address_of(&msg[24..])),
                    _ => {}
                }
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
            }
        }
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&self, kind: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        ack(&self.exchange(kind, flags | NLM_F_ACK, body)?)
    }

    /// Sends one request and returns the first message of the reply.
    fn exchange(&self, kind: u16, flags: u16, body: &[u8]) -> io::Result<Vec<u8>> {
        self.send(kind, flags, body)?;
        // Only the headers are read: a longer reply (a link's whole description) is cut here,
        // and the kernel drops the rest of that datagram.
        let mut buf = [0u8; 1024];
        let (n, _) = rustix::net::recv(&self.fd, &mut buf, RecvFlags::empty())?;
        if n < 20 {
            return Err(io::Error::other("rtnetlink: short reply"));
        }
        Ok(buf[..n].to_vec())
    }

    /// Sends one message to the kernel.
    fn send(&self, kind: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        let len = 16 + body.len() as u32;
        let mut msg = Vec::with_capacity(len as usize);
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        msg.extend_from_slice(body);
        let kernel = netlink::SocketAddrNetlink::new(0, 0);
        rustix::net::sendto(&self.fd, &msg, SendFlags::empty(), &kernel)?;
        Ok(())
    }
}

/// The address in the attributes of an RTM_NEWADDR message: IFA_LOCAL (the link's own
/// address), or IFA_ADDRESS where there is no IFA_LOCAL.
fn address_of(mut attrs: &[u8]) -> Option<Ipv4Addr> {
    let (mut local, mut address) = (None, None);
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        if len < 4 || len > attrs.len() {
            break;
        }
        let value = &attrs[4..len];
        let ip = <[u8; 4]>::try_from(value).ok().map(Ipv4Addr::from);
        match u16::from_ne_bytes([attrs[2], attrs[3]]) {
            IFA_LOCAL => local = ip,
            IFA_ADDRESS => address = ip,
            _ => {}
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    local.or(address)
}

/// The outcome an NLMSG_ERROR reply carries (0: done).
fn ack(reply: &[u8]) -> io::Result<()> {
    if reply.len() < 20 || u16::from_ne_bytes([reply[4], reply[5]]) != NLMSG_ERROR {
        return Err(io::Error::other("rtnetlink: unexpected reply"));
    }
    match i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_names_checked() {
        let mut v = Vec::new();
        attr(&mut v, IFLA_INFO_KIND, b"veth");
        attr(&mut v, IFLA_IFNAME, &ifname("eth0").unwrap());
        assert_eq!(v.len(), 8 + 12);
        assert_eq!(&v[..4], &[8u16.to_ne_bytes(), IFLA_INFO_KIND.to_ne_bytes()].concat()[..]);
        assert_eq!(&v[8..10], &9u16.to_ne_bytes(), "length counts the name's NUL, not the padding");
        assert!(ifname("a-name-that-is-too-long").is_err());
        assert!(ifname("").is_err() && ifname("a/b").is_err() && ifname("a b").is_err());
        assert!(ifname(&"x".repeat(MAX_IFNAME)).is_ok());
    }

    #[test]
    fn addresses_are_read_from_a_dump() {
        let mut attrs = Vec::new();
        attr(&mut attrs, IFA_ADDRESS, &[10, 0, 0, 255]);
        attr(&mut attrs, 3, b"eth0\0"); // IFA_LABEL
        assert_eq!(address_of(&attrs), Some(Ipv4Addr::new(10, 0, 0, 255)));
        attr(&mut attrs, IFA_LOCAL, &[10, 0, 0, 7]);
        assert_eq!(address_of(&attrs), Some(Ipv4Addr::new(10, 0, 0, 7)), "the link's own address first");
        assert_eq!(address_of(&[8, 0, 2, 0, 1]), None, "a cut attribute is no address");
        // This namespace's loopback, whoever runs the test.
        let all = Netlink::open().unwrap().ipv4_addresses().unwrap();
        assert!(all.contains(&Ipv4Addr::LOCALHOST), "{all:?}");
    }
}
