//! A way out for rootless pods: pasta (Debian's `passt`), a user-space network stack that
//! needs no privilege. One pasta process per pod owns a tap link in the pod's namespace and
//! makes, from the host's namespace, the connections and datagrams the pod sends out of it.
//! wasmlet configures the link itself:
//! - the pod IP on it (the pod keeps it on its loopback too) and a route to the gateway (the
//!   first address of `pod_cidr`, which pasta maps to the host's loopback);
//! - the default route through the gateway;
//! - the rest of `pod_cidr` unreachable: other rootless pods' addresses exist only in their own
//!   namespaces, and pasta would otherwise send such a connection out of the host's default
//!   route, off the machine.
//!
//! pasta is a child of wasmlet, killed when the pod's network is released. Host ports stay
//! wasmlet's own forwarders.

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Cidr, NetNs, netlink};

/// The tap link's name in the pod.
pub const LINK: &str = "eth0";
/// How long pasta may take to make its link.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// Finds the pasta command: a path as given, or a name searched along PATH.
pub fn find(command: &str) -> Option<PathBuf> {
    if command.is_empty() {
        return None;
    }
    if command.contains('/') {
        return Path::new(command).is_file().then(|| PathBuf::from(command));
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(command)).find(|p| p.is_file())
}

/// A pod's pasta process.
#[derive(Debug)]
pub struct Pasta {
    child: Child,
}

impl Pasta {
    /// Starts pasta on `ns` and configures its link for the pod address `ip` in `cidr`.
    pub fn start(bin: &Path, ns: &Arc<NetNs>, ip: Ipv4Addr, cidr: Cidr) -> io::Result<Pasta> {
        let gateway = cidr.gateway();
        // setpriv (util-linux) sets the parent-death signal, so pasta dies with wasmlet even when
        // wasmlet is killed; without it pasta is started as it is.
        static SETPRIV: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
        let mut command = match SETPRIV.get_or_init(|| find("setpriv")) {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "KILL", "--"]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        command
            .args(["--foreground", "--quiet", "--runas", "0", "--netns-only", "--ipv4-only"])
            .args(["--ns-ifname", LINK, "--address", &ip.to_string(), "--gateway", &gateway.to_string()])
            // No port forwarding either way: host ports are wasmlet's.
            .args(["--tcp-ports", "none", "--udp-ports", "none", "--tcp-ns", "none", "--udp-ns", "none"])
            .arg("--no-dhcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // The namespace goes to pasta as a descriptor it inherits (a copy without close-on-exec,
        // closed again once pasta has it), named /proc/self/fd/N: pasta cannot open wasmlet's
        // own /proc/<pid>/fd once it has isolated itself. Spawned without a pre_exec hook, so
        // without a fork of this large process (posix_spawn).
        let inherited = ns.with_fd(|fd| rustix::io::dup(fd))??;
        let spawned = {
            use std::os::fd::AsRawFd;
            command.arg("--netns").arg(format!("/proc/self/fd/{}", inherited.as_raw_fd()));
            spawn(command)
        };
        drop(inherited);
        let mut pasta =
            Pasta { child: spawned.map_err(|e| io::Error::new(e.kind(), format!("start {}: {e}", bin.display())))? };
        let configured = ns.run_inside(move || {
            let nl = netlink::Netlink::open()?;
            let deadline = Instant::now() + START_TIMEOUT;
            let index = loop {
                if let Some(i) = nl.link_index(LINK)? {
                    break i;
                }
                if Instant::now() > deadline {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, format!("pasta made no {LINK} link")));
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            nl.link_up(index)?;
            nl.add_address(index, ip, 32)?;
            nl.add_link_route(index, gateway, 32)?;
            nl.add_default_route(index, gateway)?;
            nl.add_unreachable_route(cidr.base, cidr.prefix)
        });
        let stderr = pasta.child.stderr.take();
        match configured {
            Ok(()) => {
                // What it says later goes to wasmlet's log.
                if let Some(stderr) = stderr {
                    let pid = pasta.child.id();
                    let _ = std::thread::Builder::new().name("pasta-log".into()).spawn(move || {
                        use std::io::BufRead;
                        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                            tracing::warn!(pasta = pid, "{line}");
                        }
                    });
                }
                Ok(pasta)
            }
            Err(e) => {
                let status = pasta.child.try_wait().ok().flatten();
                pasta.stop();
                let said = stderr
                    .map(|mut s| {
                        let mut text = String::new();
                        let _ = std::io::Read::read_to_string(&mut s, &mut text);
                        text.lines().filter(|l| !l.contains("syslog")).collect::<Vec<_>>().join("; ")
                    })
                    .unwrap_or_default();
                Err(match status {
                    Some(s) => io::Error::other(format!("pasta exited ({s}) before its link was up: {e}: {said}")),
                    None => e,
                })
            }
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `command` from one thread that lives as long as the process: the parent-death signal
/// fires when the thread that forked ends, not the process.
fn spawn(command: Command) -> io::Result<Child> {
    type Request = (Command, std::sync::mpsc::Sender<io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Request>>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        let started = std::thread::Builder::new().name("pasta-spawner".into()).spawn(move || {
            for (mut command, reply) in rx {
                let _ = reply.send(command.spawn());
            }
        });
        if let Err(e) = started {
            tracing::error!(error = %e, "start the pasta spawner thread");
        }
        std::sync::Mutex::new(tx)
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let gone = || io::Error::other("the pasta spawner thread is gone");
    spawner.lock().unwrap_or_else(|e| e.into_inner()).send((command, tx)).map_err(|_| gone())?;
    rx.recv().map_err(|_| gone())?
}

impl Drop for Pasta {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_is_found_along_path_or_as_given() {
        assert_eq!(find(""), None);
        assert_eq!(find("/no/such/pasta"), None);
        assert_eq!(find("sh").map(|p| p.is_absolute()), Some(true));
        assert_eq!(find("/bin/sh"), Some(PathBuf::from("/bin/sh")));
        assert_eq!(find("no-such-command-wasmlet"), None);
    }
}
