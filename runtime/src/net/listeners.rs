//! Closing a stopped guest's listening sockets, as a process's listeners close when it is
//! asked to stop: its blocked accept wakes with an error, and a server that handles it can
//! finish and exit within the stop's timeout.
//!
//! A guest's sockets are wasmtime-wasi's, out of reach while the guest runs; they are found
//! the way `ss` finds them: the LISTEN entries of the pod's network namespace for the ports
//! the guest listened on (`/proc/thread-self/net/tcp{,6}`, read inside it), matched by inode
//! to this process's descriptors, which are then shut down for reading (accept then fails
//! with EINVAL). A port identifies one listener in a namespace, so another container's
//! sockets are not touched.

use std::collections::HashSet;
use std::io;
use std::sync::Arc;

use super::NetNs;

/// The inodes of the TCP sockets listening on one of `ports` in the namespace this thread is
/// in, from `/proc/thread-self/net/tcp` and `tcp6`.
fn listening_inodes(ports: &[u16]) -> io::Result<HashSet<u64>> {
    let mut inodes = HashSet::new();
    for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        inodes.extend(parse_listeners(&text, ports));
    }
    Ok(inodes)
}

/// LISTEN (state 0A) entries of a `/proc/net/tcp` table on one of `ports`: their inodes.
fn parse_listeners(table: &str, ports: &[u16]) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            let port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            (*state == "0A" && ports.contains(&port)).then(|| inode.parse().ok())?
        })
        .collect()
}

/// Shuts down, for reading, this process's sockets with one of `inodes`; how many.
fn shut_down(inodes: &HashSet<u64>) -> io::Result<usize> {
    if inodes.is_empty() {
        return Ok(0);
    }
    let me = rustix::process::pidfd_open(rustix::process::getpid(), rustix::process::PidfdFlags::empty())?;
    let mut closed = 0;
    for entry in std::fs::read_dir("/proc/self/fd")?.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        let target = target.to_string_lossy();
        let Some(inode) = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']')) else { continue };
        if !inode.parse().is_ok_and(|i| inodes.contains(&i)) {
            continue;
        }
        let Ok(n) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        // A duplicate of the descriptor: the same socket, shut down for every holder.
        let fd = rustix::process::pidfd_getfd(&me, n, rustix::process::PidfdGetfdFlags::empty())?;
        rustix::net::shutdown(&fd, rustix::net::Shutdown::Read)?;
        closed += 1;
    }
    Ok(closed)
}

/// Closes the listeners on `ports` in `ns` (None: the host's network); how many were closed.
/// Blocks (a thread enters the namespace): call it off the executor.
pub fn close(ns: Option<&Arc<NetNs>>, ports: Vec<u16>) -> io::Result<usize> {
    if ports.is_empty() {
        return Ok(0);
    }
    let inodes = match ns {
        Some(ns) => ns.run_inside(move || listening_inodes(&ports))?,
        None => listening_inodes(&ports)?,
    };
    shut_down(&inodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_are_read_from_the_proc_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1B9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n\
   1: 0100007F:1B9E 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 20 4 30 10 -1\n\
   2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0 100 0 0 10 0\n";
        assert_eq!(parse_listeners(table, &[7070]), vec![4242], "port 7070 listening; the connection is not");
        assert_eq!(parse_listeners(table, &[80, 7070]), vec![4242, 4444]);
        assert!(parse_listeners(table, &[9999]).is_empty());
    }

    #[test]
    fn a_closed_listener_fails_its_blocked_accept() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let waiting = std::thread::spawn(move || listener.accept().map(|_| ()));
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(close(None, vec![port]).unwrap(), 1);
        let err = waiting.join().unwrap().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(rustix::io::Errno::INVAL.raw_os_error()), "{err}");
        assert_eq!(close(None, vec![port]).unwrap(), 0, "no longer listening");
    }
}
