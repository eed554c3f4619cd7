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
//!
//! Once pinned (a bind mount, root only) a namespace lives without its descriptor: that is
//! closed, reopened from the pin when a thread next enters it, and counts against the
//! namespaces' budget (`descriptors::NAMESPACES`), so idle pods hold none.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use rustix::fs::{Mode, OFlags};
use rustix::thread::LinkNameSpaceType;

use super::netlink;
use crate::descriptors;

/// An open network namespace.
pub struct NetNs {
    /// None while closed to save the descriptor (pinned namespaces only).
    fd: Mutex<Option<OwnedFd>>,
    /// Where the namespace is pinned, once it is.
    pin: OnceLock<PathBuf>,
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
        Ok(NetNs { fd: Mutex::new(Some(fd)), pin: OnceLock::new(), id, netlink: Default::default() })
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
    pub fn enter(self: &Arc<Self>) -> io::Result<()> {
        if CURRENT.get() == self.id {
            return Ok(());
        }
        let reopened = {
            let mut fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
            let reopened = fd.is_none();
            if reopened {
                *fd = Some(self.reopen()?);
            }
            setns(fd.as_ref().expect("opened above"))?;
            reopened
        };
        CURRENT.set(self.id);
        if reopened {
            descriptors::NAMESPACES.opened(Arc::downgrade(self) as std::sync::Weak<dyn descriptors::Reopens>);
        }
        Ok(())
    }

    /// Like [`NetNs::enter`] for a thread that visits many namespaces once (stats): a closed
    /// descriptor is opened for the visit only, so the visit does not push out the descriptors
    /// of namespaces in use.
    fn visit(&self) -> io::Result<()> {
        let fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        match &*fd {
            Some(fd) => setns(fd)?,
            None => setns(&self.reopen()?)?,
        }
        CURRENT.set(self.id);
        Ok(())
    }

    /// The namespace's descriptor again, from its pin.
    fn reopen(&self) -> io::Result<OwnedFd> {
        let pin = self.pin.get().ok_or_else(|| io::Error::other("network namespace closed but not pinned"))?;
        let fd = rustix::fs::open(pin, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
        if rustix::fs::fstat(&fd)?.st_ino != self.id {
            return Err(io::Error::other(format!("{} is no longer this pod's network namespace", pin.display())));
        }
        Ok(fd)
    }

    /// Keeps the namespace alive past this process with a bind mount at `path` (root only), so
    /// a restarted wasmlet finds its pods' networks as they were. The descriptor is closed:
    /// the pin holds the namespace now.
    pub fn pin(&self, path: &Path) -> io::Result<()> {
        std::fs::File::create(path)?;
        rustix::mount::mount_bind(self.path(), path).inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })?;
        if self.pin.set(path.to_path_buf()).is_ok() {
            self.fd.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        Ok(())
    }

    /// The namespace pinned at `path` by an earlier process, if one is.
    pub fn open_pinned(path: &Path) -> io::Result<Option<NetNs>> {
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
        // Held by the pin: opened again when first entered.
        Ok(Some(NetNs {
            fd: Mutex::new(None),
            pin: OnceLock::from(path.to_path_buf()),
            id,
            netlink: Default::default(),
        }))
    }

    /// Removes a pin (the namespace ends when nothing else holds it).
    pub fn unpin(path: &Path) {
        let _ = rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH);
        let _ = std::fs::remove_file(path);
    }

    /// Adds `addr/prefix` to the loopback (see [`NetNs::configure`]).
    pub fn add_loopback_address(self: &Arc<Self>, addr: std::net::Ipv4Addr, prefix: u8) -> io::Result<()> {
        self.configure(move |nl| nl.add_address(1, addr, prefix))
    }

    /// Runs `f` with an rtnetlink socket inside the namespace: its own kept one when it still
    /// has it (no thread needed; the socket is closed after), else one opened on a
    /// short-lived thread inside it.
    pub fn configure(
        self: &Arc<Self>,
        f: impl FnOnce(&netlink::Netlink) -> io::Result<()> + Send + 'static,
    ) -> io::Result<()> {
        let kept = self.netlink.lock().unwrap_or_else(|e| e.into_inner()).take();
        match &kept {
            Some(nl) => f(nl),
            None => self.run_inside(move || f(&netlink::Netlink::open()?)),
        }
    }

    /// Runs `f` with the namespace's descriptor (opened from its pin for the call if closed).
    pub fn with_fd<T>(&self, f: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> T) -> io::Result<T> {
        let fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        match &*fd {
            Some(fd) => Ok(f(fd.as_fd())),
            None => Ok(f(self.reopen()?.as_fd())),
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

    /// A path to the namespace for tools that want one (CNI plugins, `setns` by path): its pin,
    /// or `/proc/<pid>/fd/<n>` of the descriptor of one not pinned.
    pub fn path(&self) -> String {
        use std::os::fd::AsRawFd;
        if let Some(pin) = self.pin.get() {
            return pin.display().to_string();
        }
        match &*self.fd.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(fd) => format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd()),
            None => unreachable!("only a pinned namespace closes its descriptor"),
        }
    }
}

fn setns(fd: &OwnedFd) -> io::Result<()> {
    Ok(rustix::thread::move_into_link_name_space(fd.as_fd(), Some(LinkNameSpaceType::Network))?)
}

/// One network interface's counters (a line of `/proc/net/dev`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// The interfaces of `/proc/net/dev` (two heading lines, then `name: 8 receive and 8
/// transmit counters`); lines that do not parse are left out.
pub fn parse_net_dev(text: &str) -> Vec<Interface> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let v: Vec<u64> = counters.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
            (v.len() >= 16).then(|| Interface {
                name: name.trim().to_string(),
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_errors: v[2],
                rx_dropped: v[3],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_errors: v[10],
                tx_dropped: v[11],
            })
        })
        .collect()
}

/// The interfaces of each namespace (`/proc/thread-self/net/dev` is the reading thread's
/// namespace's).
pub fn interfaces_of(namespaces: Vec<Arc<NetNs>>) -> io::Result<Vec<io::Result<Vec<Interface>>>> {
    read_in_each(namespaces, |_| Ok(parse_net_dev(&std::fs::read_to_string("/proc/thread-self/net/dev")?)))
}

/// `read(i)` inside each of `namespaces` (the i-th), on one short-lived thread that enters them
/// in turn.
pub fn read_in_each<T: Send + 'static>(
    namespaces: Vec<Arc<NetNs>>,
    read: impl Fn(usize) -> io::Result<T> + Send + 'static,
) -> io::Result<Vec<io::Result<T>>> {
    std::thread::Builder::new()
        .name("netns-stats".into())
        .spawn(move || {
            namespaces
                .iter()
                .enumerate()
                .map(|(i, ns)| {
                    ns.visit()?;
                    read(i)
                })
                .collect()
        })?
        .join()
        .map_err(|_| io::Error::other("netns-stats thread panicked"))
}

impl descriptors::Reopens for NetNs {
    fn close_idle(&self) {
        if self.pin.get().is_some() {
            self.fd.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
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

    #[test]
    fn a_pinned_namespace_holds_no_descriptor_and_is_entered_from_its_pin() {
        use descriptors::Reopens;
        if !can_create() {
            eprintln!("skipped: cannot create network namespaces here");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("ns");
        let ns = Arc::new(NetNs::create(&[("10.200.0.2".parse().unwrap(), 32)]).unwrap());
        if let Err(e) = ns.pin(&pin) {
            eprintln!("skipped: cannot pin here ({e})");
            return;
        }
        assert!(ns.fd.lock().unwrap().is_none(), "the pin holds the namespace");
        assert_eq!(ns.path(), pin.display().to_string());
        let inside = |ns: Arc<NetNs>| {
            std::thread::spawn(move || {
                ns.enter().unwrap();
                std::net::TcpListener::bind("10.200.0.2:0").is_ok()
            })
            .join()
            .unwrap()
        };
        assert!(inside(ns.clone()), "entered by reopening the pin");
        ns.close_idle();
        assert!(inside(ns.clone()), "and again after the budget closed it");
        // Found again as a restarted process would.
        let again = Arc::new(NetNs::open_pinned(&pin).unwrap().unwrap());
        assert_eq!(again.id(), ns.id());
        assert!(inside(again));
        NetNs::unpin(&pin);
        ns.close_idle();
        let t = std::thread::spawn(move || ns.enter().map_err(|e| e.to_string()));
        assert!(t.join().unwrap().is_err(), "without its pin a closed namespace cannot be entered");
    }

    #[test]
    fn net_dev_parses_and_counts_follow_the_namespace() {
        let text = "Inter-|   Receive                            |  Transmit\n face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs drop fifo colls carrier compressed\n    lo: 100 2 0 0 0 0 0 0 100 2 0 0 0 0 0 0\n  eth0: 5 1 2 3 0 0 0 0 7 1 4 6 0 0 0 0\n  bad: x\n";
        let ifs = parse_net_dev(text);
        assert_eq!(ifs.len(), 2);
        assert_eq!(
            ifs[1],
            Interface {
                name: "eth0".into(),
                rx_bytes: 5,
                rx_packets: 1,
                rx_errors: 2,
                rx_dropped: 3,
                tx_bytes: 7,
                tx_packets: 1,
                tx_errors: 4,
                tx_dropped: 6
            }
        );
        if !can_create() {
            eprintln!("skipped: cannot create network namespaces here");
            return;
        }
        let (a, b) = (Arc::new(NetNs::create(&[]).unwrap()), Arc::new(NetNs::create(&[]).unwrap()));
        // 1,000 bytes over a's loopback, nothing over b's.
        let inside = a.clone();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            inside.enter().unwrap();
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (mut s, _) = l.accept().unwrap();
            c.write_all(&[7; 1000]).unwrap();
            let mut got = [0; 1000];
            s.read_exact(&mut got).unwrap();
        })
        .join()
        .unwrap();
        let got = interfaces_of(vec![a, b]).unwrap();
        let lo = |r: &io::Result<Vec<Interface>>| r.as_ref().unwrap().iter().find(|i| i.name == "lo").unwrap().clone();
        let (la, lb) = (lo(&got[0]), lo(&got[1]));
        assert!(la.rx_bytes >= 1000 && la.tx_bytes >= 1000, "{la:?}");
        assert_eq!((lb.rx_bytes, lb.tx_bytes), (0, 0), "{lb:?}");
    }
}
