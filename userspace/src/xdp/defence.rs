//! The XDP program as the first line of defence: which sources may send events (an allow-list
//! of CIDRs in the `ALLOW` LPM trie) and how fast each may (a token bucket per source in the
//! `RATE` LRU map, sized by two fields of `CONFIG`). Both act only on event datagrams (UDP to the
//! event port); what they drop is counted as `drop_denied` and `drop_rate_limited` verdicts.

use std::borrow::BorrowMut;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData};
use eventstream_common::{RATE_MAX_PPS, SourceAddr, XdpConfig};

use super::XdpError;

/// A source network, `198.18.0.0/15` or `2001:db8::/32` (a bare address is a /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// The network's address, host bits cleared.
    pub addr: IpAddr,
    /// Prefix length: 0..=32 for IPv4, 0..=128 for IPv6.
    pub prefix: u8,
}

impl Cidr {
    /// The trie key: IPv4 as `::ffff:a.b.c.d` with the prefix moved past the 96 mapped bits.
    pub fn key(&self) -> Key<SourceAddr> {
        match self.addr {
            IpAddr::V4(a) => Key::new(96 + u32::from(self.prefix), a.to_ipv6_mapped().octets()),
            IpAddr::V6(a) => Key::new(u32::from(self.prefix), a.octets()),
        }
    }

    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |a: IpAddr| match a {
            IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        };
        let ((net, width), (host, host_width)) = (bits(self.addr), bits(ip));
        if width != host_width {
            return false;
        }
        let mask = u128::MAX
            .checked_shl(128 - u32::from(self.prefix))
            .unwrap_or(0);
        net & mask == host & mask
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why a CIDR was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Not an IPv4 or IPv6 address before the `/`.
    #[error("{0:?} is not an IP address")]
    Address(String),
    /// The prefix length is not a number within the address family's width.
    #[error("prefix {prefix:?} is not 0..={max}")]
    Prefix {
        /// What was written.
        prefix: String,
        /// 32 or 128.
        max: u8,
    },
    /// Bits are set past the prefix (`10.0.0.1/8`): most likely a typo, so it is refused.
    #[error("host bits set past /{prefix} (did you mean {network}?)")]
    HostBits {
        /// The prefix length.
        prefix: u8,
        /// The network with those bits cleared.
        network: String,
    },
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = a.trim().parse().map_err(|_| CidrError::Address(a.into()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| CidrError::Prefix {
                    prefix: p.into(),
                    max,
                })?,
        };
        let cidr = Self { addr, prefix };
        let network = cidr.network();
        if network != addr {
            return Err(CidrError::HostBits {
                prefix,
                network: format!("{network}/{prefix}"),
            });
        }
        Ok(cidr)
    }
}

impl Cidr {
    /// The address with every bit past the prefix cleared.
    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What the program enforces on event datagrams, and which multicast groups it steers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Defence {
    /// Multicast groups whose event datagrams are steered (`ingest.udp.multicast_groups`);
    /// datagrams to any other group go to the kernel.
    pub groups: Vec<IpAddr>,
    /// Sources allowed to send events; empty for everyone.
    pub allow: Vec<Cidr>,
    /// Datagrams per second per source; 0 for no limit.
    pub rate_pps: u32,
    /// Bucket depth; 0 takes one second's worth (`rate_pps`).
    pub burst: u32,
}

impl Defence {
    /// `config` with this defence's fields set (the others kept).
    pub fn apply(&self, mut config: XdpConfig) -> XdpConfig {
        config.allow_list = u8::from(!self.allow.is_empty());
        config.rate_pps = self.rate_pps.min(RATE_MAX_PPS);
        config.rate_burst = match (self.rate_pps, self.burst) {
            (0, _) => 0,
            (r, 0) => r.min(RATE_MAX_PPS),
            (_, b) => b,
        };
        config
    }
}

/// A group's key in `GROUPS`: IPv6 bytes, IPv4 mapped (as the program reads destinations).
pub fn group_key(group: IpAddr) -> SourceAddr {
    match group {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// Replaces the content of the `GROUPS` hash with `groups`.
pub(super) fn fill_groups<T: BorrowMut<MapData>>(
    map: &mut HashMap<T, SourceAddr, u8>,
    groups: &[IpAddr],
) -> Result<(), XdpError> {
    let old: Vec<SourceAddr> = map
        .keys()
        .collect::<Result<_, _>>()
        .map_err(|e| XdpError::bpf("listing GROUPS", e))?;
    for key in &old {
        map.remove(key)
            .map_err(|e| XdpError::bpf("clearing GROUPS", e))?;
    }
    for g in groups {
        map.insert(group_key(*g), 1, 0)
            .map_err(|e| XdpError::bpf(format!("adding {g} to GROUPS"), e))?;
    }
    Ok(())
}

/// Replaces the content of the `ALLOW` trie with `allow`.
pub(super) fn fill_allow<T: BorrowMut<MapData>>(
    trie: &mut LpmTrie<T, SourceAddr, u8>,
    allow: &[Cidr],
) -> Result<(), XdpError> {
    let old: Vec<Key<SourceAddr>> = trie
        .keys()
        .collect::<Result<_, _>>()
        .map_err(|e| XdpError::bpf("listing ALLOW", e))?;
    for key in &old {
        trie.remove(key)
            .map_err(|e| XdpError::bpf("clearing ALLOW", e))?;
    }
    for cidr in allow {
        trie.insert(&cidr.key(), 1, 0)
            .map_err(|e| XdpError::bpf(format!("adding {cidr} to ALLOW"), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_refuse_what_is_not_one() {
        let c: Cidr = "198.18.0.0/15".parse().unwrap();
        assert_eq!(c.prefix, 15);
        assert_eq!(c.key().prefix_len(), 96 + 15);
        assert_eq!(
            &c.key().data()[..12],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
        );
        assert!(c.contains("198.19.255.1".parse().unwrap()));
        assert!(!c.contains("198.20.0.1".parse().unwrap()));
        assert!(
            !c.contains("::ffff:198.18.0.1".parse().unwrap()),
            "families apart"
        );
        let host: Cidr = "2001:db8::7".parse().unwrap();
        assert_eq!((host.prefix, host.key().prefix_len()), (128, 128));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        assert_eq!(
            "10.0.0.1/8".parse::<Cidr>().unwrap_err().to_string(),
            "host bits set past /8 (did you mean 10.0.0.0/8?)"
        );
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::Prefix { max: 32, .. })
        ));
        assert!(matches!(
            "nope/8".parse::<Cidr>(),
            Err(CidrError::Address(_))
        ));
        assert!(matches!(
            "::/129".parse::<Cidr>(),
            Err(CidrError::Prefix { .. })
        ));
    }

    #[test]
    fn group_keys_are_ipv6_bytes_with_ipv4_mapped() {
        assert_eq!(
            group_key("239.18.0.7".parse().unwrap()),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 239, 18, 0, 7]
        );
        assert_eq!(group_key("ff15::7".parse().unwrap())[..2], [0xff, 0x15]);
    }

    #[test]
    fn the_defence_sets_only_its_own_fields() {
        let base = XdpConfig::default();
        let d = Defence {
            allow: vec!["198.18.0.0/15".parse().unwrap()],
            rate_pps: 1000,
            burst: 0,
            ..Defence::default()
        };
        let c = d.apply(base);
        assert_eq!((c.allow_list, c.rate_pps, c.rate_burst), (1, 1000, 1000));
        assert_eq!((c.udp_port, c.allow_vlan), (base.udp_port, base.allow_vlan));
        let off = Defence::default().apply(c);
        assert_eq!((off.allow_list, off.rate_pps, off.rate_burst), (0, 0, 0));
    }
}
