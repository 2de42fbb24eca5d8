//! Ethernet/IP/UDP framing for the AF_XDP path: finding the UDP payload in a received frame
//! (the userspace mirror of the XDP program's classifier), and building UDP frames (test
//! fixtures, the lab's live-frame generator).
//!
//! Everything is bounds-checked; a frame that does not parse yields `None`, never a panic.

use std::net::IpAddr;
use std::ops::Range;

use eventstream_common::wire::{
    ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_UDP, IPV4_MIN_HLEN,
    IPV6_HLEN, UDP_HLEN, VLAN_HLEN,
};

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Source and destination of a received UDP datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpMeta {
    /// Source address.
    pub src: IpAddr,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
}

/// The byte range of the UDP payload inside an Ethernet frame, with the datagram's addressing.
///
/// Accepts one VLAN tag, IPv4 with options (no fragments) and IPv6 without extension headers,
/// exactly what the XDP program steers. The UDP length field bounds the payload (Ethernet
/// padding on short frames is excluded); a length past the frame end is rejected.
pub fn udp_payload(frame: &[u8]) -> Option<(Range<usize>, UdpMeta)> {
    let mut proto = be16(frame, 12)?;
    let mut off = ETH_HLEN;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = be16(frame, off + 2)?;
        off += VLAN_HLEN;
    }
    let src = match proto {
        ETH_P_IP => {
            let ip = frame.get(off..off + IPV4_MIN_HLEN)?;
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ip[0] >> 4 != 4
                || ihl < IPV4_MIN_HLEN
                || ip[9] != IPPROTO_UDP
                || be16(ip, 6)? & 0x3fff != 0
            {
                return None;
            }
            let src = IpAddr::from([ip[12], ip[13], ip[14], ip[15]]);
            off += ihl;
            src
        }
        ETH_P_IPV6 => {
            let ip = frame.get(off..off + IPV6_HLEN)?;
            if ip[0] >> 4 != 6 || ip[6] != IPPROTO_UDP {
                return None;
            }
            let mut a = [0u8; 16];
            a.copy_from_slice(&ip[8..24]);
            off += IPV6_HLEN;
            IpAddr::from(a)
        }
        _ => return None,
    };
    let udp = frame.get(off..off + UDP_HLEN)?;
    let len = usize::from(be16(udp, 4)?);
    if len < UDP_HLEN || off + len > frame.len() {
        return None;
    }
    let meta = UdpMeta {
        src,
        src_port: be16(udp, 0)?,
        dst_port: be16(udp, 2)?,
    };
    Some((off + UDP_HLEN..off + len, meta))
}

/// Addressing for building UDP frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpSpec {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// One 802.1Q tag with this VLAN id, if any.
    pub vlan: Option<u16>,
    /// Source address (same family as `dst`).
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
}

fn checksum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn checksum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl UdpSpec {
    /// Bytes of headers before the payload.
    pub const fn header_len(&self) -> usize {
        let vlan = if self.vlan.is_some() { 4 } else { 0 };
        let ip = if self.dst.is_ipv4() { 20 } else { 40 };
        ETH_HLEN + vlan + ip + 8
    }

    /// One Ethernet frame carrying `payload` in a UDP datagram, with valid IPv4 header and UDP
    /// checksums (UDP over IPv6 must have one).
    ///
    /// # Panics
    /// If the payload does not fit a UDP datagram, or `src` and `dst` differ in family.
    pub fn frame(&self, payload: &[u8]) -> Vec<u8> {
        let udp_len = u16::try_from(8 + payload.len()).expect("payload fits a UDP datagram");
        let mut f = Vec::with_capacity(self.header_len() + payload.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        if let Some(id) = self.vlan {
            f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            f.extend_from_slice(&(id & 0x0fff).to_be_bytes());
        }
        let mut pseudo = 0u32;
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&ETH_P_IP.to_be_bytes());
                let ip_start = f.len();
                let total = 20 + udp_len;
                f.extend_from_slice(&[0x45, 0]);
                f.extend_from_slice(&total.to_be_bytes());
                f.extend_from_slice(&[0, 0, 0x40, 0, 64, IPPROTO_UDP, 0, 0]); // id, DF, ttl, proto
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                let c = checksum_fold(checksum_add(0, &f[ip_start..]));
                f[ip_start + 10..ip_start + 12].copy_from_slice(&c.to_be_bytes());
                pseudo = checksum_add(pseudo, &s.octets());
                pseudo = checksum_add(pseudo, &d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&udp_len.to_be_bytes());
                f.extend_from_slice(&[IPPROTO_UDP, 64]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                pseudo = checksum_add(pseudo, &s.octets());
                pseudo = checksum_add(pseudo, &d.octets());
            }
            _ => panic!("source and destination must be the same IP family"),
        }
        pseudo += u32::from(IPPROTO_UDP) + u32::from(udp_len);
        let udp_start = f.len();
        f.extend_from_slice(&self.src_port.to_be_bytes());
        f.extend_from_slice(&self.dst_port.to_be_bytes());
        f.extend_from_slice(&udp_len.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        let c = match checksum_fold(checksum_add(pseudo, &f[udp_start..])) {
            0 => 0xffff, // 0 means "no checksum"; a computed zero is sent as all ones
            c => c,
        };
        f[udp_start + 6..udp_start + 8].copy_from_slice(&c.to_be_bytes());
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn spec(src: IpAddr, dst: IpAddr, vlan: Option<u16>) -> UdpSpec {
        UdpSpec {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            vlan,
            src,
            dst,
            src_port: 40000,
            dst_port: 8082,
        }
    }

    #[test]
    fn built_frames_parse_back_to_their_payload() {
        let v4 = (
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)),
        );
        let v6 = (
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        );
        for (src, dst) in [v4, v6] {
            for vlan in [None, Some(100)] {
                let s = spec(src, dst, vlan);
                let f = s.frame(b"hello events");
                let (range, meta) = udp_payload(&f).unwrap();
                assert_eq!(&f[range.clone()], b"hello events");
                assert_eq!(range.start, s.header_len());
                assert_eq!(
                    meta,
                    UdpMeta {
                        src,
                        src_port: 40000,
                        dst_port: 8082
                    }
                );
                // Ethernet padding after the datagram is not payload.
                let mut padded = f.clone();
                padded.extend([0; 20]);
                assert_eq!(udp_payload(&padded).unwrap().0, range);
            }
        }
    }

    #[test]
    fn ipv4_header_checksum_verifies() {
        let f = spec(
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)),
            None,
        )
        .frame(b"x");
        assert_eq!(checksum_fold(checksum_add(0, &f[14..34])), 0);
    }

    #[test]
    fn short_or_foreign_frames_are_none() {
        let f = spec(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            None,
        )
        .frame(b"abc");
        for cut in 0..f.len() - 3 {
            assert!(udp_payload(&f[..cut]).is_none(), "cut at {cut}");
        }
        let mut tcp = f.clone();
        tcp[14 + 9] = 6;
        assert!(udp_payload(&tcp).is_none());
        let mut frag = f.clone();
        frag[14 + 6] = 0x20; // more fragments
        assert!(udp_payload(&frag).is_none());
        let mut long = f;
        long[14 + 20 + 4] = 0xff; // UDP length past the frame
        assert!(udp_payload(&long).is_none());
    }
}
