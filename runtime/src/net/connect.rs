//! `wasi:sockets/tcp`'s `start-connect` for components, with Service addresses sent to an
//! endpoint (see [`services`](super::services)) before wasmtime-wasi connects the socket. The
//! rest of wasi:sockets is wasmtime-wasi's own.

use std::net::SocketAddr;

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode, IpSocketAddress};
use wasmtime_wasi::p2::bindings::sockets::tcp::HostTcpSocket;
use wasmtime_wasi::p2::{Network, TcpSocket};
use wasmtime_wasi::sockets::WasiSocketsCtxView;

#[cfg(doc)]
use super::services::ServiceTable;

/// The interface as wasmtime-wasi 48 defines it (older 0.2 imports match it by semver).
const INTERFACE: &str = "wasi:sockets/tcp@0.2.12";

/// What a store must give the connect function.
pub trait HasServices: Send + 'static {
    fn sockets(&mut self) -> WasiSocketsCtxView<'_>;
    /// Where a TCP connection to `dst` is made (see [`ServiceTable::destination`]).
    fn destination_tcp(&self, dst: SocketAddr) -> Result<SocketAddr, String>;
}

/// Replaces `start-connect` in `linker` with the Service-aware one.
pub fn add_to_linker<T: HasServices>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut inst = linker.instance(INTERFACE)?;
    inst.func_wrap(
        "[method]tcp-socket.start-connect",
        |mut store: StoreContextMut<'_, T>,
         (this, network, remote): (Resource<TcpSocket>, Resource<Network>, IpSocketAddress)|
         -> wasmtime::Result<(Result<(), ErrorCode>,)> {
            let data = store.data_mut();
            let asked = SocketAddr::from(remote);
            let remote = match data.destination_tcp(asked) {
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
                Err(e) => e.downcast().map(|code| (Err(code),)),
            }
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}
