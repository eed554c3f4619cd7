//! The two rtnetlink requests a pod namespace needs (set a link up, add an IPv4 address), as
//! bytes on a NETLINK_ROUTE socket: no C library, no `ip` command, no unsafe code.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, netlink};

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFF_UP: u32 = 0x1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const AF_INET: u8 = 2;

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
        // struct ifinfomsg: family, pad, type, index, flags, change.
        let mut body = vec![0u8, 0];
        body.extend_from_slice(&0u16.to_ne_bytes());
        body.extend_from_slice(&index.to_ne_bytes());
        body.extend_from_slice(&IFF_UP.to_ne_bytes());
        body.extend_from_slice(&IFF_UP.to_ne_bytes());
        self.request(RTM_NEWLINK, 0, &body)
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

    /// Sends one request and waits for its acknowledgement.
    fn request(&self, kind: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        let len = 16 + body.len() as u32;
        let mut msg = Vec::with_capacity(len as usize);
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        msg.extend_from_slice(body);
        let kernel = netlink::SocketAddrNetlink::new(0, 0);
        rustix::net::sendto(&self.fd, &msg, SendFlags::empty(), &kernel)?;
        let mut buf = [0u8; 1024];
        let (n, _) = rustix::net::recv(&self.fd, &mut buf, RecvFlags::empty())?;
        let reply = &buf[..n];
        if reply.len() < 20 || u16::from_ne_bytes([reply[4], reply[5]]) != NLMSG_ERROR {
            return Err(io::Error::other("rtnetlink: unexpected reply"));
        }
        match i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]) {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(-e)),
        }
    }
}
