//! Who a client really is, when it comes through a proxy, and which
//! addresses the per-address limits leave alone.
//!
//! - [`Networks`]: a list of CIDR blocks (`10.0.0.0/8`, `::1/128`, or a bare
//!   address), for `trusted_proxies` and `exempt_networks`.
//! - [`forwarded_client`]: the client's address from `Forwarded` or
//!   `X-Forwarded-For`, believed only when the TCP peer is a trusted proxy.
//! - [`read_proxy_header`]: the PROXY protocol (v1 text, v2 binary) that
//!   HAProxy and nginx put in front of a TCP stream, for the line listener.
//!
//! A header from a peer that is not a trusted proxy is never read: anyone
//! can write one.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use axum::http::HeaderMap;
use tokio::io::{AsyncRead, AsyncReadExt};

/// One CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `ADDR/PREFIX`, or a bare address (the whole address).
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let bad = || format!("{text:?} is not an address or a CIDR block (10.0.0.0/8, ::1/128)");
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(bad)?,
            None => max,
        };
        let canonical = addr.to_canonical();
        let prefix = if addr.is_ipv6() && canonical.is_ipv4() {
            // An IPv4-mapped block, ::ffff:10.0.0.0/104, is an IPv4 block.
            prefix.checked_sub(96).ok_or_else(bad)?
        } else {
            prefix
        };
        Ok(Cidr {
            addr: canonical,
            prefix,
        })
    }

    /// Whether `ip` is in the block; an IPv4-mapped IPv6 address
    /// (`::ffff:1.2.3.4`, what a dual-stack listener reports) counts as the
    /// IPv4 address it carries.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                same_prefix(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                same_prefix(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn same_prefix(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let (bytes, bits) = ((prefix / 8) as usize, prefix % 8);
    if a[..bytes] != b[..bytes] {
        return false;
    }
    bits == 0 || (a[bytes] ^ b[bytes]) >> (8 - bits) == 0
}

/// A list of CIDR blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Networks(Vec<Cidr>);

impl Networks {
    /// Parse every block; the error names the first bad one.
    pub fn parse<S: AsRef<str>>(blocks: &[S]) -> Result<Networks, String> {
        blocks
            .iter()
            .map(|b| Cidr::parse(b.as_ref()))
            .collect::<Result<_, _>>()
            .map(Networks)
    }

    /// 127.0.0.0/8 and ::1/128.
    pub fn loopback() -> Networks {
        Networks::parse(&["127.0.0.0/8", "::1/128"]).expect("valid blocks")
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    pub fn blocks(&self) -> impl Iterator<Item = String> + '_ {
        self.0.iter().map(Cidr::to_string)
    }
}

/// Who is at the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// The client's address: what limits count and logs show.
    pub ip: IpAddr,
    /// Its port, when known (not through `X-Forwarded-For`).
    pub port: Option<u16>,
    /// The trusted proxy it came through, if any.
    pub via: Option<SocketAddr>,
}

impl Client {
    /// A client connected straight to us.
    pub fn direct(peer: SocketAddr) -> Client {
        Client {
            ip: peer.ip().to_canonical(),
            port: Some(peer.port()),
            via: None,
        }
    }

    /// The client of an HTTP request from `peer`, through the forwarding
    /// headers when `peer` is a trusted proxy.
    pub fn behind(peer: SocketAddr, headers: &HeaderMap, trusted: &Networks) -> Client {
        let ip = forwarded_client(peer.ip(), headers, trusted);
        if ip == peer.ip().to_canonical() {
            return Client::direct(peer);
        }
        Client {
            ip,
            port: None,
            via: Some(peer),
        }
    }

    /// The client a PROXY protocol header named, from proxy `peer`.
    pub fn proxied(peer: SocketAddr, source: Option<SocketAddr>) -> Client {
        match source {
            Some(source) => Client {
                via: Some(peer),
                ..Client::direct(source)
            },
            // The proxy speaks for itself (a health check).
            None => Client::direct(peer),
        }
    }
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => SocketAddr::new(self.ip, port).fmt(f),
            None => self.ip.fmt(f),
        }
    }
}

/// The client's address for a request from `peer`. When `peer` is a
/// trusted proxy, the hops it reports (`Forwarded: for=…`, else
/// `X-Forwarded-For`) are read from the nearest back: the first one that is
/// not itself a trusted proxy is the client. A hop that is not an address
/// (`unknown`, an obfuscated name) ends the walk at the last address read,
/// so a client can never place an address of its choosing.
pub fn forwarded_client(peer: IpAddr, headers: &HeaderMap, trusted: &Networks) -> IpAddr {
    let mut client = peer.to_canonical();
    if !trusted.contains(client) {
        return client;
    }
    let hops = forwarded_hops(headers);
    for hop in hops.iter().rev() {
        match parse_node(hop) {
            Some(ip) => {
                client = ip;
                if !trusted.contains(ip) {
                    break;
                }
            }
            None => break,
        }
    }
    client
}

/// The `for=` nodes of every `Forwarded` header (RFC 7239), in order; else
/// the entries of every `X-Forwarded-For` header.
fn forwarded_hops(headers: &HeaderMap) -> Vec<String> {
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let forwarded: Vec<String> = values("forwarded")
        .iter()
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                key.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| value.trim().trim_matches('"').to_owned())
            })
        })
        .collect();
    if forwarded.is_empty() {
        values("x-forwarded-for")
    } else {
        forwarded
    }
}

/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]:4711`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Some(rest) = node.strip_prefix('[') {
        let (ip, _) = rest.split_once(']')?;
        return ip
            .parse::<Ipv6Addr>()
            .ok()
            .map(|ip| IpAddr::V6(ip).to_canonical());
    }
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    node.parse::<SocketAddr>()
        .ok()
        .map(|s| s.ip().to_canonical())
}

/// A PROXY protocol header that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    #[error("a trusted proxy must start the connection with a PROXY protocol header (v1 or v2)")]
    Missing,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
}

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, `\r\n` included (the specification's figure).
const V1_MAX: usize = 107;

/// Read a PROXY protocol header (v1 or v2) from the start of `stream`, and
/// nothing after it. The client's address, or `None` when the proxy speaks
/// for itself (v1 `UNKNOWN`, v2 `LOCAL`: health checks) or the address
/// family is not IP.
pub async fn read_proxy_header(
    stream: &mut (impl AsyncRead + Unpin),
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    // Twelve bytes are safe to read: the shortest v1 header has fifteen.
    let mut start = [0u8; 12];
    stream.read_exact(&mut start).await?;
    if start == V2_SIGNATURE {
        return read_v2(stream).await;
    }
    if !start.starts_with(b"PROXY ") {
        return Err(ProxyHeaderError::Missing);
    }
    // v1: byte by byte up to "\r\n", so that nothing past it is consumed.
    let mut line = start.to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(ProxyHeaderError::Malformed(
                "a v1 header longer than 107 bytes",
            ));
        }
        line.push(stream.read_u8().await?);
    }
    parse_v1(&line[..line.len() - 2])
}

fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let bad = ProxyHeaderError::Malformed;
    let text = std::str::from_utf8(line).map_err(|_| bad("not ASCII"))?;
    let fields: Vec<&str> = text.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        ["PROXY", family @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src.parse().map_err(|_| bad("a bad source address"))?;
            if ip.is_ipv4() != (*family == "TCP4") {
                return Err(bad("the source address is not of the family named"));
            }
            let port: u16 = sport.parse().map_err(|_| bad("a bad source port"))?;
            Ok(Some(SocketAddr::new(ip.to_canonical(), port)))
        }
        _ => Err(bad("expected PROXY TCP4|TCP6 SRC DST SPORT DPORT")),
    }
}

async fn read_v2(
    stream: &mut (impl AsyncRead + Unpin),
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let bad = ProxyHeaderError::Malformed;
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await?;
    let (version_command, family) = (head[0], head[1]);
    let len = u16::from_be_bytes([head[2], head[3]]) as usize;
    // The addresses and any TLVs: at most 64 KiB, read whole.
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    if version_command >> 4 != 2 {
        return Err(bad("not version 2"));
    }
    match version_command & 0x0f {
        0 => return Ok(None), // LOCAL
        1 => {}               // PROXY
        _ => return Err(bad("an unknown command")),
    }
    match family >> 4 {
        1 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let port = u16::from_be_bytes([body[8], body[9]]);
            Ok(Some(SocketAddr::new(ip.into(), port)))
        }
        2 if body.len() >= 36 => {
            let octets: [u8; 16] = body[..16].try_into().expect("16 bytes");
            let port = u16::from_be_bytes([body[32], body[33]]);
            let ip = IpAddr::V6(Ipv6Addr::from(octets)).to_canonical();
            Ok(Some(SocketAddr::new(ip, port)))
        }
        1 | 2 => Err(bad("too short for its addresses")),
        // UNSPEC or UNIX: no IP address to speak of.
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_blocks() {
        let nets = Networks::parse(&["10.0.0.0/8", "192.168.1.7", "fd00::/8", "::1/128"]).unwrap();
        assert!(nets.contains(ip("10.200.3.4")));
        assert!(!nets.contains(ip("11.0.0.1")));
        assert!(nets.contains(ip("192.168.1.7")));
        assert!(!nets.contains(ip("192.168.1.8")));
        assert!(nets.contains(ip("fd12::1")));
        assert!(nets.contains(ip("::1")));
        assert!(nets.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped");
        let odd = Networks::parse(&["172.16.0.0/12"]).unwrap();
        assert!(odd.contains(ip("172.31.255.255")));
        assert!(!odd.contains(ip("172.32.0.0")));
        assert!(Networks::parse(&["0.0.0.0/0"])
            .unwrap()
            .contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "banana", "10.0.0/8", "::1/129", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        assert!(Networks::loopback().contains(ip("127.3.2.1")));
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn forwarded_headers_are_believed_from_trusted_proxies_only() {
        let trusted = Networks::parse(&["10.0.0.0/8"]).unwrap();
        let xff = headers(&[("x-forwarded-for", "203.0.113.9, 10.0.0.5")]);
        assert_eq!(
            forwarded_client(ip("10.0.0.1"), &xff, &trusted),
            ip("203.0.113.9"),
            "through two trusted proxies"
        );
        assert_eq!(
            forwarded_client(ip("198.51.100.1"), &xff, &trusted),
            ip("198.51.100.1"),
            "an untrusted peer's header is ignored"
        );
        let spoofed = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9")]);
        assert_eq!(
            forwarded_client(ip("10.0.0.1"), &spoofed, &trusted),
            ip("203.0.113.9"),
            "what the client wrote before its real address is not believed"
        );
        let split = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "10.1.1.1:8080"),
        ]);
        assert_eq!(
            forwarded_client(ip("10.0.0.1"), &split, &trusted),
            ip("203.0.113.9")
        );
        let rfc = headers(&[(
            "forwarded",
            r#"for="[2001:db8:cafe::17]:4711";proto=https, for=10.0.0.9;by=10.0.0.1"#,
        )]);
        assert_eq!(
            forwarded_client(ip("10.0.0.1"), &rfc, &trusted),
            ip("2001:db8:cafe::17")
        );
        let unknown = headers(&[("forwarded", "for=unknown, for=10.0.0.9")]);
        assert_eq!(
            forwarded_client(ip("10.0.0.1"), &unknown, &trusted),
            ip("10.0.0.9"),
            "stops at what is not an address"
        );
        assert_eq!(
            forwarded_client(ip("10.0.0.1"), &HeaderMap::new(), &trusted),
            ip("10.0.0.1"),
            "no header: the proxy itself"
        );
    }

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let mut stream = bytes;
        let header = read_proxy_header(&mut stream).await;
        (header, stream.to_vec())
    }

    #[tokio::test]
    async fn proxy_protocol_v1() {
        let (h, rest) = read(b"PROXY TCP4 203.0.113.9 10.0.0.1 56324 7777\r\n/nick x\n").await;
        assert_eq!(h.unwrap(), Some("203.0.113.9:56324".parse().unwrap()));
        assert_eq!(rest, b"/nick x\n", "nothing after the header is consumed");
        let (h, _) = read(b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n").await;
        assert_eq!(h.unwrap(), Some("[2001:db8::1]:1".parse().unwrap()));
        let (h, rest) = read(b"PROXY UNKNOWN\r\nhi").await;
        assert_eq!(h.unwrap(), None);
        assert_eq!(rest, b"hi");
        for bad in [
            &b"PROXY TCP4 nonsense 10.0.0.1 1 2\r\n"[..],
            b"PROXY TCP6 1.2.3.4 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
        ] {
            assert!(matches!(
                read(bad).await.0,
                Err(ProxyHeaderError::Malformed(_))
            ));
        }
        let endless = [b"PROXY ".as_slice(), &[b'x'; 200]].concat();
        assert!(matches!(
            read(&endless).await.0,
            Err(ProxyHeaderError::Malformed(_))
        ));
        assert!(matches!(
            read(b"/nick mallory\n").await.0,
            Err(ProxyHeaderError::Missing)
        ));
    }

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        out.extend_from_slice(addresses);
        out
    }

    #[tokio::test]
    async fn proxy_protocol_v2() {
        let mut tcp4 = vec![203, 0, 113, 9, 10, 0, 0, 1];
        tcp4.extend_from_slice(&56324u16.to_be_bytes());
        tcp4.extend_from_slice(&7777u16.to_be_bytes());
        tcp4.extend_from_slice(&[0x04, 0, 1, 0]); // a TLV, skipped
        let mut bytes = v2(1, 0x11, &tcp4);
        bytes.extend_from_slice(b"after");
        let (h, rest) = read(&bytes).await;
        assert_eq!(h.unwrap(), Some("203.0.113.9:56324".parse().unwrap()));
        assert_eq!(rest, b"after");

        let mut tcp6 = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        tcp6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        tcp6.extend_from_slice(&[0, 80, 0, 81]);
        let (h, _) = read(&v2(1, 0x21, &tcp6)).await;
        assert_eq!(h.unwrap(), Some("[2001:db8::7]:80".parse().unwrap()));

        assert_eq!(read(&v2(0, 0x00, &[])).await.0.unwrap(), None, "LOCAL");
        assert!(matches!(
            read(&v2(1, 0x11, &[1, 2, 3])).await.0,
            Err(ProxyHeaderError::Malformed(_))
        ));
    }
}
