//! `wasi:sockets/ip-name-lookup` for components, answered by [`PodDns`] instead of the host's
//! resolver. wasmtime-wasi's own definitions are shadowed in the component linker.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource, ResourceTable, ResourceType};
use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode, IpAddress};
use wasmtime_wasi::p2::{DynPollable, Network, Pollable, subscribe};

use super::dns::{LookupError, PodDns};

/// The interface as wasmtime-wasi 48 defines it (older 0.2 imports match it by semver).
const INTERFACE: &str = "wasi:sockets/ip-name-lookup@0.2.12";

type LookupFuture = Pin<Box<dyn Future<Output = Result<Vec<IpAddr>, LookupError>> + Send>>;

/// A lookup in progress, then its addresses.
pub struct Lookup {
    pending: Option<LookupFuture>,
    result: Option<Result<std::vec::IntoIter<IpAddr>, ErrorCode>>,
}

impl Lookup {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.result.is_some() {
            return Poll::Ready(());
        }
        let Some(fut) = self.pending.as_mut() else { return Poll::Ready(()) };
        match fut.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                self.pending = None;
                self.result = Some(r.map(Vec::into_iter).map_err(|e| match e {
                    LookupError::InvalidName => ErrorCode::InvalidArgument,
                    LookupError::NotFound => ErrorCode::NameUnresolvable,
                    LookupError::NoAnswer => ErrorCode::TemporaryResolverFailure,
                }));
                Poll::Ready(())
            }
        }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Lookup {
    async fn ready(&mut self) {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await
    }
}

/// What a store must give the lookup functions.
pub trait HasPodDns: Send + 'static {
    fn table(&mut self) -> &mut ResourceTable;
    fn pod_dns(&self) -> Option<Arc<PodDns>>;
}

/// Replaces `wasi:sockets/ip-name-lookup` in `linker` with the pod-aware one.
pub fn add_to_linker<T: HasPodDns>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut inst = linker.instance(INTERFACE)?;
    inst.resource("resolve-address-stream", ResourceType::host::<Lookup>(), |mut store, rep| {
        store.data_mut().table().delete(Resource::<Lookup>::new_own(rep))?;
        Ok(())
    })?;
    inst.func_wrap(
        "resolve-addresses",
        |mut store: StoreContextMut<'_, T>,
         (network, name): (Resource<Network>, String)|
         -> wasmtime::Result<(Result<Resource<Lookup>, ErrorCode>,)> {
            let data = store.data_mut();
            // The network handle is the capability to look names up.
            data.table().get(&network)?;
            let Some(dns) = data.pod_dns() else { return Ok((Err(ErrorCode::PermanentResolverFailure),)) };
            let lookup = Lookup { pending: Some(Box::pin(dns.resolve(name))), result: None };
            Ok((Ok(data.table().push(lookup)?),))
        },
    )?;
    inst.func_wrap(
        "[method]resolve-address-stream.resolve-next-address",
        |mut store: StoreContextMut<'_, T>,
         (this,): (Resource<Lookup>,)|
         -> wasmtime::Result<(Result<Option<IpAddress>, ErrorCode>,)> {
            let lookup = store.data_mut().table().get_mut(&this)?;
            if lookup.poll_ready(&mut Context::from_waker(std::task::Waker::noop())).is_pending() {
                return Ok((Err(ErrorCode::WouldBlock),));
            }
            Ok((match lookup.result.as_mut().expect("ready") {
                Ok(addrs) => Ok(addrs.next().map(IpAddress::from)),
                Err(e) => Err(*e),
            },))
        },
    )?;
    inst.func_wrap(
        "[method]resolve-address-stream.subscribe",
        |mut store: StoreContextMut<'_, T>,
         (this,): (Resource<Lookup>,)|
         -> wasmtime::Result<(Resource<DynPollable>,)> { Ok((subscribe(store.data_mut().table(), this)?,)) },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}
