//! Linux network namespaces for pods, without a process per pod.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole life.
//! wasmtime-wasi creates a guest's sockets synchronously inside the guest's host calls, on the
//! executor thread that is polling the guest. So before every poll of a pod's guest the thread
//! is moved into the pod's namespace ([`NetNs::enter`]: one `setns`, about 2 us here, skipped
//! when the thread is already there), and every socket the guest opens is the pod's. Threads of
//! the pod executor never need to go back to the host's namespace: guests of host-network pods
//! run on an executor of their own whose threads never move.
//!
//! A namespace is created on a short-lived thread (`unshare(CLONE_NEWNET)` moves only the
//! calling thread), its loopback brought up through rtnetlink, and kept as an open
//! `/proc/thread-self/ns/net` descriptor. Creating one costs about 1 ms here, more than a whole
//! pod start, so a small pool is kept ready by a background thread.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};

use rustix::fs::{Mode, OFlags};
use rustix::thread::LinkNameSpaceType;

use super::netlink;

/// An open network namespace.
pub struct NetNs {
    fd: OwnedFd,
    /// The namespace's inode number: unique among live namespaces.
    id: u64,
    /// An rtnetlink socket opened inside it (sockets stay in the namespace they were made in),
    /// so the pod's address can be added later from any thread; closed once used, as a pod
    /// holds no descriptor it does not need (10,000 pods run within 20,000 open files).
    netlink: std::sync::Mutex<Option<netlink::Netlink>>,
}

impl std::fmt::Debug for NetNs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NetNs({})", self.id)
    }
}

thread_local! {
    /// The namespace this thread was last moved into (0: never moved).
    static CURRENT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

impl NetNs {
    /// The calling thread's namespace.
    pub fn current() -> io::Result<NetNs> {
        let fd = rustix::fs::open("/proc/thread-self/ns/net", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
        let id = rustix::fs::fstat(&fd)?.st_ino;
        Ok(NetNs { fd, id, netlink: Default::default() })
    }

    /// A new namespace with its loopback up, and `addresses` (IPv4, prefix length) on it.
    pub fn create(addresses: &[(std::net::Ipv4Addr, u8)]) -> io::Result<NetNs> {
        let addresses = addresses.to_vec();
        std::thread::Builder::new()
            .name("netns-create".into())
            .spawn(move || {
                // SAFETY: CLONE_NEWNET changes only this thread's network namespace; unlike
                // CLONE_FILES it cannot make descriptors of other threads invalid here. The
                // thread ends right after, so no code of ours runs in the moved thread later.
                #[allow(unsafe_code)]
                unsafe {
                    rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET)?
                };
                let mut ns = NetNs::current()?;
                let lo = netlink::Netlink::open()?;
                lo.link_up(1)?;
                for (addr, prefix) in &addresses {
                    lo.add_address(1, *addr, *prefix)?;
                }
                ns.netlink = std::sync::Mutex::new(Some(lo));
                Ok(ns)
            })?
            .join()
            .map_err(|_| io::Error::other("netns-create thread panicked"))?
    }

    /// Moves the calling thread into this namespace (nothing to do if it is there already).
    pub fn enter(&self) -> io::Result<()> {
        if CURRENT.get() == self.id {
            return Ok(());
        }
        rustix::thread::move_into_link_name_space(self.fd.as_fd(), Some(LinkNameSpaceType::Network))?;
        CURRENT.set(self.id);
        Ok(())
    }

    /// Keeps the namespace alive past this process with a bind mount at `path` (root only), so
    /// a restarted wasmlet finds its pods' networks as they were.
    pub fn pin(&self, path: &std::path::Path) -> io::Result<()> {
        std::fs::File::create(path)?;
        rustix::mount::mount_bind(self.proc_path(), path).inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })?;
        Ok(())
    }

    /// The namespace pinned at `path` by an earlier process, if one is.
    pub fn open_pinned(path: &std::path::Path) -> io::Result<Option<NetNs>> {
        const NSFS_MAGIC: i64 = 0x6e73_6673;
        let fd = match rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if rustix::fs::fstatfs(&fd)?.f_type as i64 != NSFS_MAGIC {
            return Ok(None);
        }
        let id = rustix::fs::fstat(&fd)?.st_ino;
        Ok(Some(NetNs { fd, id, netlink: Default::default() }))
    }

    /// Removes a pin (the namespace ends when nothing else holds it).
    pub fn unpin(path: &std::path::Path) {
        let _ = rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH);
        let _ = std::fs::remove_file(path);
    }

    /// Adds `addr/prefix` to the loopback: through the namespace's own rtnetlink socket when it
    /// still has one (no thread needed; the socket is closed after), else from a short-lived
    /// thread inside it.
    pub fn add_loopback_address(self: &Arc<Self>, addr: std::net::Ipv4Addr, prefix: u8) -> io::Result<()> {
        let kept = self.netlink.lock().unwrap_or_else(|e| e.into_inner()).take();
        match &kept {
            Some(nl) => nl.add_address(1, addr, prefix),
            None => self.run_inside(move || netlink::Netlink::open()?.add_address(1, addr, prefix)),
        }
    }

    /// Runs `f` on a short-lived thread inside this namespace (to configure it).
    pub fn run_inside<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let ns = self.clone();
        std::thread::Builder::new()
            .name("netns-config".into())
            .spawn(move || {
                ns.enter()?;
                f()
            })?
            .join()
            .map_err(|_| io::Error::other("netns-config thread panicked"))?
    }

    /// The namespace's inode number.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// `/proc/<pid>/fd/<n>` of the descriptor, for tools that want a path (CNI plugins).
    pub fn proc_path(&self) -> String {
        use std::os::fd::AsRawFd;
        format!("/proc/{}/fd/{}", std::process::id(), self.fd.as_raw_fd())
    }
}

/// Namespaces created ahead of need, so a pod start does not wait for one.
pub struct Pool {
    inner: Arc<(Mutex<PoolState>, Condvar)>,
}

struct PoolState {
    ready: Vec<NetNs>,
    want: usize,
    closed: bool,
}

impl Pool {
    /// A pool that keeps `want` namespaces ready (plain namespaces: loopback only).
    pub fn new(want: usize) -> Pool {
        let inner = Arc::new((Mutex::new(PoolState { ready: Vec::new(), want, closed: false }), Condvar::new()));
        let weak = Arc::downgrade(&inner);
        let _ = std::thread::Builder::new().name("netns-pool".into()).spawn(move || {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                {
                    let (lock, cv) = &*inner;
                    let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
                    while !st.closed && st.ready.len() >= st.want {
                        st = cv.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    if st.closed {
                        return;
                    }
                }
                match NetNs::create(&[]) {
                    Ok(ns) => inner.0.lock().unwrap_or_else(|e| e.into_inner()).ready.push(ns),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot create network namespaces ahead; creating on demand");
                        return;
                    }
                }
            }
        });
        Pool { inner }
    }

    /// A ready namespace, or a new one if none is ready.
    pub fn take(&self) -> io::Result<NetNs> {
        let (lock, cv) = &*self.inner;
        let ns = lock.lock().unwrap_or_else(|e| e.into_inner()).ready.pop();
        cv.notify_one();
        match ns {
            Some(ns) => Ok(ns),
            None => NetNs::create(&[]),
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let (lock, cv) = &*self.inner;
        lock.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        cv.notify_all();
    }
}

/// Enters this process into a new user namespace in which it is root (its own uid and gid
/// mapped to 0), so that it may create and enter network namespaces without privilege. Must
/// run before the process has a second thread (the kernel refuses otherwise).
pub fn enter_user_namespace() -> io::Result<()> {
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    // SAFETY: CLONE_NEWUSER changes only credentials; the process has one thread (checked by
    // the kernel, which fails with EINVAL otherwise).
    #[allow(unsafe_code)]
    unsafe {
        rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWUSER)?
    };
    std::fs::write("/proc/self/setgroups", "deny")?;
    std::fs::write("/proc/self/uid_map", format!("0 {uid} 1"))?;
    std::fs::write("/proc/self/gid_map", format!("0 {gid} 1"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn can_create() -> bool {
        // Not root and no user namespace: these tests cannot run here.
        NetNs::create(&[]).is_ok()
    }

    #[test]
    fn sockets_follow_the_namespace_of_their_thread() {
        if !can_create() {
            eprintln!("skipped: cannot create network namespaces here");
            return;
        }
        let a = Arc::new(NetNs::create(&[("10.200.0.1".parse().unwrap(), 32)]).unwrap());
        let b = Arc::new(NetNs::create(&[]).unwrap());
        assert_ne!(a.id(), b.id());
        // The same port in two namespaces at once, from one thread moving between them.
        let t = std::thread::spawn(move || {
            a.enter().unwrap();
            let la = std::net::TcpListener::bind("127.0.0.1:8080").unwrap();
            // The pod's own address is on its loopback.
            let own = std::net::TcpListener::bind("10.200.0.1:0");
            b.enter().unwrap();
            let lb = std::net::TcpListener::bind("127.0.0.1:8080").unwrap();
            assert!(std::net::TcpListener::bind("10.200.0.1:0").is_err(), "b does not have a's address");
            // A connection from b reaches b's listener, not a's.
            let c = std::net::TcpStream::connect("127.0.0.1:8080").unwrap();
            lb.set_nonblocking(false).unwrap();
            let (_, peer) = lb.accept().unwrap();
            assert_eq!(peer, c.local_addr().unwrap());
            la.set_nonblocking(true).unwrap();
            assert!(la.accept().is_err(), "nothing reached a");
            own.is_ok()
        });
        assert!(t.join().unwrap(), "the address given at creation is usable");
        // This thread never moved: the host's port 8080 is not taken by either.
        let host = NetNs::current().unwrap();
        assert_ne!(host.id(), 0);
    }
}
