//! wasi:sockets for components with Service addresses sent to an endpoint (see
//! [`services`](super::services)), as kube-proxy's rules would rewrite the packets:
//! - TCP: `start-connect` connects to an endpoint instead of the ClusterIP.
//! - UDP: a socket streamed to a ClusterIP (connected) is connected to an endpoint, and a
//!   datagram sent to one goes to an endpoint; a flow (one stream and one Service address)
//!   keeps its endpoint while the endpoint serves, as a conntrack entry does. Answers from the
//!   endpoint reach the guest from the Service's address, and `remote-address` says the
//!   Service's address, so the rewrite is invisible to the guest, as NAT is.
//!
//! The rest of wasi:sockets is wasmtime-wasi's own.

use std::collections::HashMap;
use std::net::SocketAddr;

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode, IpSocketAddress};
use wasmtime_wasi::p2::bindings::sockets::tcp::HostTcpSocket;
use wasmtime_wasi::p2::bindings::sockets::udp::{
    HostIncomingDatagramStream, HostOutgoingDatagramStream, HostUdpSocket, IncomingDatagram, IncomingDatagramStream,
    OutgoingDatagram, OutgoingDatagramStream,
};
use wasmtime_wasi::p2::{Network, SocketError, TcpSocket, UdpSocket};
use wasmtime_wasi::sockets::WasiSocketsCtxView;

use super::services::Protocol;
#[cfg(doc)]
use super::services::ServiceTable;

/// The interfaces as wasmtime-wasi 48 defines them (older 0.2 imports match them by semver).
const TCP: &str = "wasi:sockets/tcp@0.2.12";
const UDP: &str = "wasi:sockets/udp@0.2.12";

/// What a store must give the shadowed functions.
pub trait HasServices: Send + 'static {
    fn sockets(&mut self) -> WasiSocketsCtxView<'_>;
    /// Where a connection or datagram to `dst` goes (see [`ServiceTable::destination`]).
    fn destination(&self, dst: SocketAddr, protocol: Protocol) -> Result<SocketAddr, String>;
    /// Whether `endpoint` still serves the Service address `dst` (see [`ServiceTable::serves`]).
    fn serves(&self, dst: SocketAddr, protocol: Protocol, endpoint: SocketAddr) -> bool;
    /// The store's UDP flows to Services.
    fn udp_flows(&mut self) -> &mut UdpFlows;
}

/// The UDP flows of one store that go to Services, by resource handle (a handle number that
/// is reused belongs to a new socket or stream, which `stream` records afresh).
#[derive(Debug, Default)]
pub struct UdpFlows {
    /// Socket -> the Service address it is connected to, and the endpoint it really is.
    connected: HashMap<u32, (SocketAddr, SocketAddr)>,
    /// Outgoing stream -> the socket and the incoming stream made with it.
    outgoing: HashMap<u32, (u32, u32)>,
    /// Outgoing stream -> Service address -> the endpoint its datagrams go to.
    sent: HashMap<u32, HashMap<SocketAddr, SocketAddr>>,
    /// Incoming stream -> endpoint -> the Service address its answers come from.
    answers: HashMap<u32, HashMap<SocketAddr, SocketAddr>>,
}

impl UdpFlows {
    /// `socket` got new streams, connected to `service` (as the guest asked, and the endpoint)
    /// or not.
    fn streamed(&mut self, socket: u32, incoming: u32, outgoing: u32, service: Option<(SocketAddr, SocketAddr)>) {
        self.outgoing.insert(outgoing, (socket, incoming));
        self.sent.remove(&outgoing);
        self.answers.remove(&incoming);
        match service {
            Some((asked, endpoint)) => {
                self.connected.insert(socket, (asked, endpoint));
                self.answers.entry(incoming).or_default().insert(endpoint, asked);
            }
            None => {
                self.connected.remove(&socket);
            }
        }
        // Handles of streams that are gone are reused by new ones; the maps stay as large as
        // the most streams the guest held at once, give or take.
    }

    /// The Service address `socket` shows as its remote address, for its real `remote`.
    fn remote_of(&self, socket: u32, remote: SocketAddr) -> SocketAddr {
        match self.connected.get(&socket) {
            Some((asked, endpoint)) if *endpoint == remote => *asked,
            _ => remote,
        }
    }

    /// The endpoint a flow of `outgoing` to `service` uses now, if it has one.
    fn endpoint(&self, outgoing: u32, service: SocketAddr) -> Option<SocketAddr> {
        if let Some((socket, _)) = self.outgoing.get(&outgoing)
            && let Some((asked, endpoint)) = self.connected.get(socket)
            && *asked == service
        {
            return Some(*endpoint);
        }
        self.sent.get(&outgoing)?.get(&service).copied()
    }

    /// The flow of `outgoing` to `service` goes to `endpoint` from now on.
    fn record(&mut self, outgoing: u32, service: SocketAddr, endpoint: SocketAddr) {
        self.sent.entry(outgoing).or_default().insert(service, endpoint);
        if let Some((_, incoming)) = self.outgoing.get(&outgoing) {
            self.answers.entry(*incoming).or_default().insert(endpoint, service);
        }
    }

    /// The address an answer from `from` on `incoming` shows the guest.
    fn answer_from(&self, incoming: u32, from: SocketAddr) -> SocketAddr {
        self.answers.get(&incoming).and_then(|m| m.get(&from)).copied().unwrap_or(from)
    }
}

/// The endpoint a datagram of the flow `outgoing` to `dst` goes to: the flow's own while it
/// serves, else a new one (recorded); Err when the Service has none.
fn flow_destination<T: HasServices>(data: &mut T, outgoing: u32, dst: SocketAddr) -> Result<SocketAddr, String> {
    if let Some(endpoint) = data.udp_flows().endpoint(outgoing, dst)
        && data.serves(dst, Protocol::Udp, endpoint)
    {
        return Ok(endpoint);
    }
    let endpoint = data.destination(dst, Protocol::Udp)?;
    if endpoint != dst {
        tracing::debug!(service = %dst, %endpoint, "udp flow");
        data.udp_flows().record(outgoing, dst, endpoint);
    }
    Ok(endpoint)
}

/// A wasi:sockets result as the guest gets it: an error code, or a trap.
fn code<R>(e: SocketError) -> wasmtime::Result<(Result<R, ErrorCode>,)> {
    e.downcast().map(|code| (Err(code),))
}

/// Replaces `start-connect` (TCP) and `stream`, `remote-address`, `send` and `receive` (UDP) in
/// `linker` with the Service-aware ones.
pub fn add_to_linker<T: HasServices>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut tcp = linker.instance(TCP)?;
    tcp.func_wrap(
        "[method]tcp-socket.start-connect",
        |mut store: StoreContextMut<'_, T>,
         (this, network, remote): (Resource<TcpSocket>, Resource<Network>, IpSocketAddress)|
         -> wasmtime::Result<(Result<(), ErrorCode>,)> {
            let data = store.data_mut();
            let asked = SocketAddr::from(remote);
            let remote = match data.destination(asked, Protocol::Tcp) {
                Ok(dst) if dst == asked => remote,
                Ok(endpoint) => {
                    tracing::debug!(service = %asked, %endpoint, "connect");
                    IpSocketAddress::from(endpoint)
                }
                Err(service) => {
                    tracing::debug!(%service, "connect: the Service has no ready endpoint");
                    return Ok((Err(ErrorCode::ConnectionRefused),));
                }
            };
            match HostTcpSocket::start_connect(&mut data.sockets(), this, network, remote) {
                Ok(()) => Ok((Ok(()),)),
                Err(e) => code(e),
            }
        },
    )?;
    let mut udp = linker.instance(UDP)?;
    type Streams = (Resource<IncomingDatagramStream>, Resource<OutgoingDatagramStream>);
    udp.func_wrap_async(
        "[method]udp-socket.stream",
        |mut store: StoreContextMut<'_, T>, (this, remote): (Resource<UdpSocket>, Option<IpSocketAddress>)| {
            Box::new(async move {
                let data = store.data_mut();
                let socket = this.rep();
                let service = match remote.map(SocketAddr::from) {
                    None => None,
                    Some(asked) => match data.destination(asked, Protocol::Udp) {
                        Ok(endpoint) if endpoint == asked => None,
                        Ok(endpoint) => Some((asked, endpoint)),
                        Err(service) => {
                            tracing::debug!(%service, "udp connect: the Service has no ready endpoint");
                            return Ok((Err(ErrorCode::ConnectionRefused),));
                        }
                    },
                };
                let remote = match service {
                    Some((_, endpoint)) => Some(IpSocketAddress::from(endpoint)),
                    None => remote,
                };
                match HostUdpSocket::stream(&mut data.sockets(), this, remote).await {
                    Ok((incoming, outgoing)) => {
                        data.udp_flows().streamed(socket, incoming.rep(), outgoing.rep(), service);
                        Ok((Ok::<Streams, ErrorCode>((incoming, outgoing)),))
                    }
                    Err(e) => code(e),
                }
            })
        },
    )?;
    udp.func_wrap(
        "[method]udp-socket.remote-address",
        |mut store: StoreContextMut<'_, T>, (this,): (Resource<UdpSocket>,)| {
            let data = store.data_mut();
            let socket = this.rep();
            match HostUdpSocket::remote_address(&mut data.sockets(), this) {
                Ok(remote) => {
                    let shown = data.udp_flows().remote_of(socket, SocketAddr::from(remote));
                    Ok((Ok(IpSocketAddress::from(shown)),))
                }
                Err(e) => code(e),
            }
        },
    )?;
    udp.func_wrap(
        "[method]outgoing-datagram-stream.send",
        |mut store: StoreContextMut<'_, T>,
         (this, mut datagrams): (Resource<OutgoingDatagramStream>, Vec<OutgoingDatagram>)| {
            let data = store.data_mut();
            let outgoing = this.rep();
            for (i, d) in datagrams.iter_mut().enumerate() {
                let Some(asked) = d.remote_address.map(SocketAddr::from) else { continue };
                match flow_destination(data, outgoing, asked) {
                    Ok(endpoint) if endpoint == asked => {}
                    Ok(endpoint) => d.remote_address = Some(IpSocketAddress::from(endpoint)),
                    // Those before it are sent; the guest meets the refusal when this one is
                    // the first of its list.
                    Err(service) => {
                        tracing::debug!(%service, "udp send: the Service has no ready endpoint");
                        if i == 0 {
                            return Ok((Err(ErrorCode::ConnectionRefused),));
                        }
                        datagrams.truncate(i);
                        break;
                    }
                }
            }
            match HostOutgoingDatagramStream::send(&mut data.sockets(), this, datagrams) {
                Ok(n) => Ok((Ok(n),)),
                Err(e) => code(e),
            }
        },
    )?;
    udp.func_wrap(
        "[method]incoming-datagram-stream.receive",
        |mut store: StoreContextMut<'_, T>, (this, max): (Resource<IncomingDatagramStream>, u64)| {
            let data = store.data_mut();
            let incoming = this.rep();
            match HostIncomingDatagramStream::receive(&mut data.sockets(), this, max) {
                Ok(mut got) => {
                    let flows = data.udp_flows();
                    for d in &mut got {
                        let from = flows.answer_from(incoming, SocketAddr::from(d.remote_address));
                        d.remote_address = IpSocketAddress::from(from);
                    }
                    Ok((Ok::<Vec<IncomingDatagram>, ErrorCode>(got),))
                }
                Err(e) => code(e),
            }
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_connected_socket_shows_the_service_and_its_answers_come_from_it() {
        let mut f = UdpFlows::default();
        let (svc, ep) = (a("10.96.0.10:53"), a("10.88.0.7:5353"));
        f.streamed(1, 2, 3, Some((svc, ep)));
        assert_eq!(f.remote_of(1, ep), svc);
        assert_eq!(f.answer_from(2, ep), svc);
        assert_eq!(f.endpoint(3, svc), Some(ep), "a datagram naming the connected Service goes to its endpoint");
        // Streamed again unconnected: nothing is rewritten any more.
        f.streamed(1, 2, 3, None);
        assert_eq!(f.remote_of(1, ep), ep);
        assert_eq!(f.answer_from(2, ep), ep);
        assert_eq!(f.endpoint(3, svc), None);
    }

    #[test]
    fn unconnected_flows_keep_their_endpoint_per_stream() {
        let mut f = UdpFlows::default();
        let (svc, ep, other) = (a("10.96.0.10:53"), a("10.88.0.7:5353"), a("10.88.0.9:53"));
        f.streamed(1, 2, 3, None);
        f.streamed(4, 5, 6, None);
        assert_eq!(f.endpoint(3, svc), None);
        f.record(3, svc, ep);
        assert_eq!(f.endpoint(3, svc), Some(ep));
        assert_eq!(f.endpoint(6, svc), None, "another socket's flow is its own");
        assert_eq!(f.answer_from(2, ep), svc);
        assert_eq!(f.answer_from(5, ep), ep);
        assert_eq!(f.answer_from(2, other), other, "an address that is no endpoint of a flow is shown as it is");
        // A reused handle: a new socket's streams start with no flow.
        f.streamed(7, 2, 3, None);
        assert_eq!(f.endpoint(3, svc), None);
        assert_eq!(f.answer_from(2, ep), ep);
    }
}
