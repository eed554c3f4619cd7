//! Name lookups for guests (`wasi:sockets/ip-name-lookup`), answered as the pod's own
//! `/etc/hosts` and `/etc/resolv.conf` say, not as the host's resolver would: hosts entries
//! first (hostAliases included), then the pod's nameservers with its search list, `ndots`,
//! `timeout` and `attempts`, so that ClusterFirst DNS reaches the cluster's DNS server. Queries
//! are plain DNS over UDP, retried over TCP when the answer is truncated, as glibc's resolver
//! does; A and AAAA records. They are sent by wasmlet on the pod's behalf from the namespace
//! whose executor runs them (the host's in rootless mode, where pods have no route out).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// How long one query waits for its answer, and how many times each server is asked, when
/// resolv.conf does not say (glibc's defaults), and the most it may say (glibc's caps).
const TIMEOUT: Duration = Duration::from_secs(5);
const ATTEMPTS: usize = 2;
const MAX_TIMEOUT_SECS: u64 = 30;
const MAX_ATTEMPTS: usize = 5;

/// Why a lookup failed (mapped to the WASI error codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupError {
    /// Not a name at all.
    InvalidName,
    /// No such name.
    NotFound,
    /// No nameserver answered.
    NoAnswer,
}

/// A pod's resolver configuration.
#[derive(Debug, Clone)]
pub struct PodDns {
    pub hosts: Vec<(String, IpAddr)>,
    pub servers: Vec<IpAddr>,
    pub search: Vec<String>,
    pub ndots: usize,
    /// `options timeout:` and `attempts:`.
    pub timeout: Duration,
    pub attempts: usize,
    /// The nameservers' port (53; tests use others).
    pub port: u16,
    /// Where the queries run (their sockets are created there).
    pub spawner: tokio::runtime::Handle,
    /// The namespace to send them from (a pod with routes out); None: the spawner's threads'.
    pub netns: Option<Arc<super::NetNs>>,
    /// The Service table and the pod's address: a nameserver that is a Service's ClusterIP
    /// (the cluster's DNS) is asked at one of its endpoints.
    pub services: Option<(Arc<super::services::ServiceTable>, IpAddr)>,
}

impl PodDns {
    /// Reads `resolv.conf` and `hosts` contents.
    pub fn parse(resolv_conf: &str, hosts: &str, spawner: tokio::runtime::Handle) -> PodDns {
        let mut dns = PodDns {
            hosts: Vec::new(),
            servers: Vec::new(),
            search: Vec::new(),
            ndots: 1,
            timeout: TIMEOUT,
            attempts: ATTEMPTS,
            port: 53,
            spawner,
            netns: None,
            services: None,
        };
        for line in resolv_conf.lines().map(|l| l.split(['#', ';']).next().unwrap_or("")) {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => dns.servers.extend(words.next().and_then(|w| w.parse::<IpAddr>().ok())),
                Some("search") | Some("domain") => dns.search = words.map(str::to_string).collect(),
                Some("options") => {
                    for o in words {
                        let value = |key: &str| o.strip_prefix(key).and_then(|n| n.parse::<u64>().ok());
                        if let Some(n) = value("ndots:") {
                            dns.ndots = n.min(15) as usize;
                        } else if let Some(n) = value("timeout:") {
                            dns.timeout = Duration::from_secs(n.clamp(1, MAX_TIMEOUT_SECS));
                        } else if let Some(n) = value("attempts:") {
                            dns.attempts = (n as usize).clamp(1, MAX_ATTEMPTS);
                        }
                    }
                }
                _ => {}
            }
        }
        for line in hosts.lines().map(|l| l.split('#').next().unwrap_or("")) {
            let mut words = line.split_whitespace();
            let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) else { continue };
            dns.hosts.extend(words.map(|name| (name.to_ascii_lowercase(), ip)));
        }
        dns
    }

    /// The names to ask for, in order, as resolv.conf's search and ndots rules say.
    pub fn candidates(&self, name: &str) -> Vec<String> {
        if let Some(absolute) = name.strip_suffix('.') {
            return vec![absolute.to_string()];
        }
        let searched: Vec<String> = self.search.iter().map(|s| format!("{name}.{s}")).collect();
        if name.matches('.').count() >= self.ndots {
            std::iter::once(name.to_string()).chain(searched).collect()
        } else {
            searched.into_iter().chain(std::iter::once(name.to_string())).collect()
        }
    }

    /// Resolves `name`: an address as it is, a hosts entry, else DNS.
    pub async fn resolve(self: Arc<Self>, name: String) -> Result<Vec<IpAddr>, LookupError> {
        let name = name.trim().to_ascii_lowercase();
        if let Ok(ip) = name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.trim_end_matches('.').split('.').all(|l| {
                !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            return Err(LookupError::InvalidName);
        }
        let bare = name.trim_end_matches('.');
        let from_hosts: Vec<IpAddr> = self.hosts.iter().filter(|(n, _)| n == bare).map(|(_, ip)| *ip).collect();
        if !from_hosts.is_empty() {
            return Ok(from_hosts);
        }
        let dns = self.clone();
        let lookup = async move {
            let mut last = LookupError::NotFound;
            for candidate in dns.candidates(&name) {
                match dns.query_all(&candidate).await {
                    Ok(addrs) if !addrs.is_empty() => return Ok(addrs),
                    Ok(_) => last = LookupError::NotFound,
                    Err(e) => last = e,
                }
            }
            Err(last)
        };
        let done = match &self.netns {
            Some(ns) => self
                .spawner
                .spawn(super::InNetns::new(ns.clone(), lookup))
                .await
                .map(|r| r.unwrap_or(Err(LookupError::NoAnswer))),
            None => self.spawner.spawn(lookup).await,
        };
        done.unwrap_or(Err(LookupError::NoAnswer))
    }

    /// A and AAAA records of `name` from the first nameserver that answers.
    async fn query_all(&self, name: &str) -> Result<Vec<IpAddr>, LookupError> {
        if self.servers.is_empty() {
            return Err(LookupError::NotFound);
        }
        for server in &self.servers {
            let mut out = Vec::new();
            let mut answered = false;
            for qtype in [TYPE_A, TYPE_AAAA] {
                match self.query(*server, name, qtype).await {
                    Some(Answer::Addresses(a)) => {
                        answered = true;
                        out.extend(a);
                    }
                    Some(Answer::NoSuchName) => return Ok(Vec::new()),
                    Some(Answer::Truncated) | None => {}
                }
            }
            if answered {
                return Ok(out);
            }
        }
        Err(LookupError::NoAnswer)
    }
}

impl PodDns {
    /// One question to `server`: over UDP, with the retries; over TCP when the answer says it
    /// is truncated. None if it never answered usefully.
    async fn query(&self, server: IpAddr, name: &str, qtype: u16) -> Option<Answer> {
        use super::services::Protocol;
        let udp = self.server_address(SocketAddr::new(server, self.port), Protocol::Udp)?;
        match query_udp(udp, name, qtype, self.timeout, self.attempts).await? {
            Answer::Truncated => {
                let tcp = self.server_address(SocketAddr::new(server, self.port), Protocol::Tcp)?;
                match query_tcp(tcp, name, qtype, self.timeout).await? {
                    Answer::Truncated => None,
                    answer => Some(answer),
                }
            }
            answer => Some(answer),
        }
    }

    /// Where a query to `server` goes: a Service's ClusterIP to one of its endpoints (None
    /// when it has none), any other address as it is.
    fn server_address(&self, server: SocketAddr, protocol: super::services::Protocol) -> Option<SocketAddr> {
        match &self.services {
            Some((table, client)) => table.destination(*client, server, protocol).ok(),
            None => Some(server),
        }
    }
}

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;

/// What a nameserver said.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    Addresses(Vec<IpAddr>),
    NoSuchName,
    /// The answer did not fit (the TC bit): ask again over TCP.
    Truncated,
}

/// One question over UDP, sent `attempts` times; None if it never answered usefully.
async fn query_udp(server: SocketAddr, name: &str, qtype: u16, timeout: Duration, attempts: usize) -> Option<Answer> {
    let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("address");
    let socket = tokio::net::UdpSocket::bind(bind).await.ok()?;
    socket.connect(server).await.ok()?;
    for _ in 0..attempts {
        let id: u16 = rand::random();
        socket.send(&encode_query(id, name, qtype)).await.ok()?;
        let mut buf = [0u8; 1500];
        let deadline = tokio::time::Instant::now() + timeout;
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            if let Some(answer) = parse_answer(id, &buf[..n]) {
                return Some(answer);
            }
        }
    }
    None
}

/// One question over TCP (two length bytes before each message), within `timeout`.
async fn query_tcp(server: SocketAddr, name: &str, qtype: u16, timeout: Duration) -> Option<Answer> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(server).await.ok()?;
        let id: u16 = rand::random();
        let q = encode_query(id, name, qtype);
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        stream.write_all(&framed).await.ok()?;
        let len = stream.read_u16().await.ok()? as usize;
        let mut answer = vec![0u8; len];
        stream.read_exact(&mut answer).await.ok()?;
        parse_answer(id, &answer)
    };
    tokio::time::timeout(timeout, exchange).await.ok().flatten()
}

/// A recursive query for `name`.
pub fn encode_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes()); // IN
    q
}

/// The addresses in an answer to query `id`; None for another id, a server failure or bytes
/// that do not parse.
pub fn parse_answer(id: u16, b: &[u8]) -> Option<Answer> {
    let u16_at = |i: usize| b.get(i..i + 2).map(|s| u16::from_be_bytes([s[0], s[1]]));
    if u16_at(0)? != id || b.get(2)? & 0x80 == 0 {
        return None;
    }
    if b.get(2)? & 0x02 != 0 {
        return Some(Answer::Truncated);
    }
    match b.get(3)? & 0x0f {
        0 => {}
        3 => return Some(Answer::NoSuchName),
        _ => return None,
    }
    let (qd, an) = (u16_at(4)?, u16_at(6)?);
    let mut i = 12;
    let skip_name = |mut i: usize| -> Option<usize> {
        loop {
            let len = *b.get(i)? as usize;
            if len & 0xc0 == 0xc0 {
                return Some(i + 2);
            }
            if len == 0 {
                return Some(i + 1);
            }
            i += 1 + len;
        }
    };
    for _ in 0..qd {
        i = skip_name(i)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        i = skip_name(i)?;
        let (rtype, rdlen) = (u16_at(i)?, u16_at(i + 8)? as usize);
        let data = b.get(i + 10..i + 10 + rdlen)?;
        match (rtype, rdlen) {
            (TYPE_A, 4) => out.push(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
            (TYPE_AAAA, 16) => out.push(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
            _ => {}
        }
        i += 10 + rdlen;
    }
    Some(Answer::Addresses(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns(resolv: &str, hosts: &str) -> PodDns {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        PodDns::parse(resolv, hosts, rt.handle().clone())
    }

    #[test]
    fn search_list_and_ndots_as_resolv_conf_says() {
        let d = dns("search ns.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n", "");
        assert_eq!(d.servers, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(d.candidates("web"), ["web.ns.svc.cluster.local", "web.svc.cluster.local", "web"].map(String::from));
        assert_eq!(d.candidates("example.com."), ["example.com"]);
        let d = dns("search a.example\noptions ndots:1\n", "");
        assert_eq!(d.candidates("x.y"), ["x.y", "x.y.a.example"]);
    }

    #[test]
    fn queries_and_answers_on_the_wire() {
        let q = encode_query(0x1234, "web.svc", TYPE_A);
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&q[12..], b"\x03web\x03svc\x00\x00\x01\x00\x01");
        // An answer: the question echoed, then one A record whose name is a pointer to it.
        let mut a = q.clone();
        a[2] = 0x81;
        a[3] = 0x80;
        a[7] = 1;
        a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 0, 7]);
        assert_eq!(parse_answer(0x1234, &a), Some(Answer::Addresses(vec!["10.0.0.7".parse().unwrap()])));
        assert_eq!(parse_answer(0x9999, &a), None, "another query's answer");
        let mut nx = q.clone();
        nx[2] = 0x81;
        nx[3] = 0x83;
        assert_eq!(parse_answer(0x1234, &nx), Some(Answer::NoSuchName));
        assert_eq!(parse_answer(0x1234, &a[..20]), None, "cut short: malformed");
        let mut tc = a.clone();
        tc[2] |= 0x02;
        assert_eq!(parse_answer(0x1234, &tc), Some(Answer::Truncated));
        // A record whose length runs past the end: malformed.
        let mut long = a.clone();
        let rdlen = long.len() - 5;
        long[rdlen] = 200;
        assert_eq!(parse_answer(0x1234, &long), None);
    }

    #[test]
    fn timeout_and_attempts_from_options_within_glibcs_bounds() {
        let d = dns("options ndots:2 timeout:1 attempts:3\n", "");
        assert_eq!((d.ndots, d.timeout, d.attempts), (2, Duration::from_secs(1), 3));
        let d = dns("options timeout:0 attempts:99\n", "");
        assert_eq!((d.timeout, d.attempts), (Duration::from_secs(1), MAX_ATTEMPTS));
        let d = dns("", "");
        assert_eq!((d.ndots, d.timeout, d.attempts), (1, TIMEOUT, ATTEMPTS));
    }

    #[tokio::test]
    async fn a_truncated_answer_is_asked_again_over_tcp() {
        // One server on UDP and TCP, same port: UDP answers with TC set, TCP with the address.
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
        let answer = |q: &[u8], tc: bool| {
            let mut a = q.to_vec();
            a[2] = 0x81 | if tc { 0x02 } else { 0 };
            a[3] = 0x80;
            if !tc {
                a[7] = 1;
                a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 0, 9]);
            }
            a
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
            udp.send_to(&answer(&buf[..n], true), peer).await.unwrap();
        });
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut c, _) = tcp.accept().await.unwrap();
            let len = c.read_u16().await.unwrap() as usize;
            let mut q = vec![0u8; len];
            c.read_exact(&mut q).await.unwrap();
            let a = answer(&q, false);
            c.write_all(&(a.len() as u16).to_be_bytes()).await.unwrap();
            c.write_all(&a).await.unwrap();
        });
        let mut d = PodDns::parse("options attempts:1\n", "", tokio::runtime::Handle::current());
        d.port = addr.port();
        let got = d.query(addr.ip(), "big.example", TYPE_A).await;
        assert_eq!(got, Some(Answer::Addresses(vec!["10.0.0.9".parse().unwrap()])));
    }

    #[tokio::test]
    async fn hosts_entries_and_literals_need_no_server() {
        let d = Arc::new(PodDns::parse(
            "",
            "127.0.0.1 localhost\n10.88.0.5\tweb-0 # the pod\n",
            tokio::runtime::Handle::current(),
        ));
        assert_eq!(d.clone().resolve("WEB-0".into()).await, Ok(vec!["10.88.0.5".parse().unwrap()]));
        assert_eq!(d.clone().resolve("10.1.2.3".into()).await, Ok(vec!["10.1.2.3".parse().unwrap()]));
        assert_eq!(d.clone().resolve("bad name".into()).await, Err(LookupError::InvalidName));
        assert_eq!(d.resolve("elsewhere".into()).await, Err(LookupError::NotFound));
    }
}
