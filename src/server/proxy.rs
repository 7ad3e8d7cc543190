//! Which client address goes into the audit log.
//!
//! Qilin only listens on loopback or a unix socket, so in production every connection
//! comes from the reverse proxy and the TCP peer is always nginx. The proxy's headers
//! carry the real client, but a client can send those same headers itself; they are
//! believed only when the hop that sent them is an operator-listed trusted proxy
//! (`--trusted-proxy CIDR`). A unix-socket peer is always trusted: only local processes
//! with write permission on the socket file can connect, and that is how nginx is
//! meant to reach us (README "Deployment").

use std::net::IpAddr;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("--trusted-proxy {spec:?}: {problem}")]
    Invalid { spec: String, problem: &'static str },
}

/// One network: `addr` with its host bits zero, and the prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Net {
    V4(u32, u8),
    V6(u128, u8),
}

impl Net {
    fn contains(self, ip: IpAddr) -> bool {
        match (self, ip) {
            (Net::V4(net, len), IpAddr::V4(ip)) => u32::from(ip) & mask32(len) == net,
            (Net::V6(net, len), IpAddr::V6(ip)) => u128::from(ip) & mask128(len) == net,
            _ => false,
        }
    }
}

fn mask32(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

/// The operator's list of reverse proxies whose forwarding headers we believe.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies {
    nets: Vec<Net>,
}

impl TrustedProxies {
    /// Parses `IP` or `IP/PREFIX` specs (v4 or v6). A bare IP is a single host.
    /// Host bits set under the prefix (`10.0.0.1/8`) are refused rather than masked:
    /// it is almost always a typo for something narrower, and trusting a wider range
    /// than meant lets clients forge their logged address.
    pub fn parse(specs: &[String]) -> Result<TrustedProxies, ProxyError> {
        let nets = specs.iter().map(|spec| parse_net(spec)).collect::<Result<Vec<_>, _>>()?;
        Ok(TrustedProxies { nets })
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// True when `ip` is inside one of the trusted networks. An IPv4-mapped IPv6
    /// address (`::ffff:10.0.0.1`, what a dual-stack socket reports) counts as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|net| net.contains(ip))
    }

    /// The client address to log. `peer` is the TCP peer, `None` for a unix socket
    /// (trusted, see the module doc).
    ///
    /// From a trusted peer: a valid `X-Real-IP` wins (nginx sets it from
    /// `$remote_addr`, overwriting whatever the client sent); otherwise
    /// `X-Forwarded-For` is walked from the right, skipping trusted hops, and the first
    /// untrusted address is the client — entries further left were written by the
    /// client itself and prove nothing. If every entry is trusted, the left-most one
    /// is the best we know. A malformed entry stops the walk (nothing to its left can
    /// be believed) and the last address reached is used. With no usable header the
    /// peer itself is the answer (`"unix"` for a socket).
    ///
    /// From an untrusted peer the headers are ignored: anyone could have sent them.
    /// The result is always a formatted IP or `"unix"`, never header text, so nothing
    /// a client sends can reach the log through it.
    pub fn client_address(
        &self,
        peer: Option<IpAddr>,
        x_real_ip: Option<&str>,
        x_forwarded_for: Option<&str>,
    ) -> String {
        let peer = peer.map(|ip| ip.to_canonical());
        let trusted = match peer {
            None => true,
            Some(ip) => self.contains(ip),
        };
        if trusted {
            if let Some(ip) = x_real_ip.and_then(parse_ip) {
                return ip.to_string();
            }
            if let Some(ip) = x_forwarded_for.and_then(|h| self.walk_forwarded_for(h)) {
                return ip.to_string();
            }
        }
        match peer {
            Some(ip) => ip.to_string(),
            None => "unix".to_string(),
        }
    }

    fn walk_forwarded_for(&self, header: &str) -> Option<IpAddr> {
        let mut last_trusted = None;
        for item in header.rsplit(',') {
            let Some(ip) = parse_ip(item) else {
                break;
            };
            if !self.contains(ip) {
                return Some(ip);
            }
            last_trusted = Some(ip);
        }
        last_trusted
    }
}

/// A header entry as an address: surrounding spaces trimmed, IPv4-mapped folded to
/// IPv4. Ports and brackets are not accepted: nginx writes bare addresses.
fn parse_ip(s: &str) -> Option<IpAddr> {
    s.trim().parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

fn parse_net(spec: &str) -> Result<Net, ProxyError> {
    let invalid = |problem| ProxyError::Invalid { spec: spec.to_string(), problem };
    let trimmed = spec.trim();
    if trimmed.is_empty() {
        return Err(invalid("empty; expected an IP address or CIDR such as 10.0.0.0/8"));
    }
    let (addr, prefix) = match trimmed.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (trimmed, None),
    };
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| invalid("not an IP address or CIDR (e.g. 10.0.0.0/8, fd00::/8, 127.0.0.1)"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match prefix {
        None => max,
        Some(p) => {
            // `u8::from_str` accepts a leading '+'; a prefix is plain digits only.
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid("the prefix length after '/' must be a number"));
            }
            match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => {
                    return Err(invalid(if max == 32 {
                        "an IPv4 prefix length is at most 32"
                    } else {
                        "an IPv6 prefix length is at most 128"
                    }))
                }
            }
        }
    };
    let net = match ip {
        IpAddr::V4(v4) => Net::V4(u32::from(v4), len),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            // `::ffff:10.0.0.0/104` means 10.0.0.0/8; addresses are compared as IPv4.
            Some(v4) if len >= 96 => Net::V4(u32::from(v4), len - 96),
            _ => Net::V6(u128::from(v6), len),
        },
    };
    let has_host_bits = match net {
        Net::V4(a, l) => a & !mask32(l) != 0,
        Net::V6(a, l) => a & !mask128(l) != 0,
    };
    if has_host_bits {
        return Err(invalid(
            "address has bits set beyond the prefix length; use the network address \
             (e.g. 10.0.0.0/8, not 10.0.0.1/8)",
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn proxies(specs: &[&str]) -> TrustedProxies {
        let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
        TrustedProxies::parse(&specs).expect("valid specs")
    }

    #[test]
    fn parses_v4_and_v6_cidrs_and_bare_ips() {
        let t = proxies(&["10.0.0.0/8", "192.168.1.7", "fd00::/8", "::1", "0.0.0.0/0"]);
        assert_eq!(
            t.nets,
            vec![
                Net::V4(0x0a00_0000, 8),
                Net::V4(0xc0a8_0107, 32),
                Net::V6(0xfd << 120, 8),
                Net::V6(1, 128),
                Net::V4(0, 0),
            ]
        );
    }

    #[test]
    fn membership_follows_the_prefix() {
        let t = proxies(&["10.1.0.0/16", "192.168.1.7", "fd00::/8", "::1"]);
        assert!(t.contains(ip("10.1.0.0")));
        assert!(t.contains(ip("10.1.255.255")));
        assert!(!t.contains(ip("10.2.0.0")));
        assert!(!t.contains(ip("10.0.255.255")));
        assert!(t.contains(ip("192.168.1.7")));
        assert!(!t.contains(ip("192.168.1.8")));
        assert!(t.contains(ip("fdab::1")));
        assert!(!t.contains(ip("fe80::1")));
        assert!(t.contains(ip("::1")));
        assert!(!t.contains(ip("::2")));
        // v4 and v6 never match each other's networks...
        assert!(!t.contains(ip("0.0.0.1")));
        // ...except IPv4-mapped IPv6, which is IPv4 in disguise.
        assert!(t.contains(ip("::ffff:10.1.2.3")));
        assert!(!t.contains(ip("::ffff:10.2.2.3")));
    }

    #[test]
    fn zero_prefix_trusts_everything_of_its_family() {
        let t = proxies(&["0.0.0.0/0"]);
        assert!(t.contains(ip("1.2.3.4")));
        assert!(t.contains(ip("255.255.255.255")));
        assert!(!t.contains(ip("2001:db8::1")));
        let t6 = proxies(&["::/0"]);
        assert!(t6.contains(ip("2001:db8::1")));
        assert!(!t6.contains(ip("1.2.3.4")));
    }

    #[test]
    fn v4_mapped_spec_means_v4() {
        let t = proxies(&["::ffff:10.0.0.0/104"]);
        assert!(t.contains(ip("10.9.9.9")));
        assert!(!t.contains(ip("11.0.0.1")));
    }

    #[test]
    fn bad_specs_are_named_in_the_error() {
        for bad in [
            "",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/x",
            "10.0.0.1/8",
            "fd00::1/8",
            "localhost",
            "10.0.0",
            "10.0.0.0/8/8",
        ] {
            let err = TrustedProxies::parse(&[bad.to_string()])
                .expect_err(&format!("{bad:?} should be refused"));
            let msg = err.to_string();
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
            assert!(msg.starts_with("--trusted-proxy"), "{msg}");
        }
        // One bad spec among good ones still fails, and names the bad one.
        let err = TrustedProxies::parse(&["10.0.0.0/8".into(), "1.2.3.4/40".into()])
            .expect_err("bad prefix");
        assert!(err.to_string().contains("\"1.2.3.4/40\""));
    }

    #[test]
    fn untrusted_peer_headers_are_ignored() {
        let t = proxies(&["10.0.0.0/8"]);
        let peer = Some(ip("203.0.113.9"));
        assert_eq!(
            t.client_address(peer, Some("1.1.1.1"), Some("2.2.2.2, 10.0.0.1")),
            "203.0.113.9"
        );
        // No trusted proxies configured: even loopback peers' headers are ignored.
        let none = proxies(&[]);
        assert!(none.is_empty());
        assert_eq!(
            none.client_address(Some(ip("127.0.0.1")), Some("1.1.1.1"), Some("2.2.2.2")),
            "127.0.0.1"
        );
    }

    #[test]
    fn trusted_peer_real_ip_wins() {
        let t = proxies(&["127.0.0.1"]);
        let peer = Some(ip("127.0.0.1"));
        assert_eq!(t.client_address(peer, Some(" 198.51.100.4 "), Some("9.9.9.9")), "198.51.100.4");
        assert_eq!(t.client_address(peer, Some("2001:db8::7"), None), "2001:db8::7");
        // Mapped form is logged as plain IPv4.
        assert_eq!(t.client_address(peer, Some("::ffff:198.51.100.4"), None), "198.51.100.4");
        // Invalid X-Real-IP falls through to X-Forwarded-For, then to the peer.
        assert_eq!(t.client_address(peer, Some("evil\"}"), Some("9.9.9.9")), "9.9.9.9");
        assert_eq!(t.client_address(peer, Some("not an ip"), None), "127.0.0.1");
        assert_eq!(t.client_address(peer, None, None), "127.0.0.1");
    }

    #[test]
    fn forwarded_for_takes_the_rightmost_untrusted_hop() {
        let t = proxies(&["127.0.0.1", "10.0.0.0/8"]);
        let peer = Some(ip("127.0.0.1"));
        // The client forged "6.6.6.6" on the left; nginx appended the real 203.0.113.5,
        // an internal balancer appended 10.0.0.2.
        assert_eq!(
            t.client_address(peer, None, Some("6.6.6.6, 203.0.113.5, 10.0.0.2")),
            "203.0.113.5"
        );
        assert_eq!(t.client_address(peer, None, Some("6.6.6.6,203.0.113.5")), "203.0.113.5");
        // A client forging a trusted-looking address on the left gains nothing.
        assert_eq!(t.client_address(peer, None, Some("10.9.9.9, 203.0.113.5")), "203.0.113.5");
        // Every hop trusted: the left-most is the closest we know to the client.
        assert_eq!(t.client_address(peer, None, Some("10.0.0.7, 10.0.0.2")), "10.0.0.7");
        // Garbage stops the walk; nothing to its left is believed.
        assert_eq!(t.client_address(peer, None, Some("6.6.6.6, garbage, 10.0.0.2")), "10.0.0.2");
        assert_eq!(t.client_address(peer, None, Some("6.6.6.6, garbage")), "127.0.0.1");
        assert_eq!(t.client_address(peer, None, Some("")), "127.0.0.1");
        assert_eq!(t.client_address(peer, None, Some("2001:db8::1, 10.0.0.2")), "2001:db8::1");
    }

    #[test]
    fn mapped_peer_is_matched_and_logged_as_v4() {
        let t = proxies(&["127.0.0.1"]);
        let peer = Some(ip("::ffff:127.0.0.1"));
        assert_eq!(t.client_address(peer, Some("198.51.100.4"), None), "198.51.100.4");
        let untrusted = Some(ip("::ffff:203.0.113.9"));
        assert_eq!(t.client_address(untrusted, Some("1.1.1.1"), None), "203.0.113.9");
    }

    #[test]
    fn unix_socket_peer_is_trusted() {
        let t = proxies(&[]);
        assert_eq!(t.client_address(None, Some("198.51.100.4"), None), "198.51.100.4");
        assert_eq!(t.client_address(None, None, Some("6.6.6.6, 203.0.113.5")), "203.0.113.5");
        assert_eq!(t.client_address(None, None, None), "unix");
        assert_eq!(t.client_address(None, Some("junk"), Some("junk")), "unix");
    }
}
