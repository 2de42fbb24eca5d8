//! The XDP program's verdict on each kind of packet, run in the kernel with `BPF_PROG_TEST_RUN`.
//!
//! Needs root (or CAP_BPF + CAP_NET_ADMIN); skips with a message without, except under CI,
//! where it fails instead. Runs the object built into the binary; the object `cargo xtask
//! build-ebpf` writes is checked to be the same program.

mod common;

use std::net::{IpAddr, Ipv6Addr};

use eventstream::wire::packet::UdpSpec;
use eventstream::xdp::defence::Defence;
use eventstream::xdp::{ObjectSource, XdpError, XdpProgram};
use eventstream_common::{Verdict, XdpConfig};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const PORT: u16 = 8082;

fn v4() -> UdpSpec {
    common::udp_v4()
}

fn v6() -> UdpSpec {
    UdpSpec {
        src: IpAddr::V6(Ipv6Addr::new(0x2001, 0x2, 0, 0, 0, 0, 0, 1)),
        dst: IpAddr::V6(Ipv6Addr::new(0x2001, 0x2, 0, 0, 0, 0, 0, 2)),
        ..v4()
    }
}

/// IPv4 header starts after the 14-byte Ethernet header.
const IP: usize = 14;

fn fixtures() -> Vec<(&'static str, Vec<u8>, Verdict)> {
    let payload = [0u8, 0, 0, 5, 1, 0, 1, b't', b'x'];
    let udp4 = v4().frame(&payload);

    let mut arp = udp4[..12].to_vec();
    arp.extend_from_slice(&0x0806u16.to_be_bytes());
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0; 20]);

    let mut icmp = udp4.clone();
    icmp[IP + 9] = 1;

    // TCP SYN whose destination port is the event port: TCP always goes to the kernel.
    let mut syn = udp4[..IP + 20].to_vec();
    syn[IP + 9] = 6;
    syn.extend_from_slice(&40_000u16.to_be_bytes());
    syn.extend_from_slice(&PORT.to_be_bytes());
    syn.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);

    let other_port = UdpSpec {
        dst_port: 9999,
        ..v4()
    }
    .frame(&payload);

    let mut ihl_small = udp4.clone();
    ihl_small[IP] = 0x44; // IHL 4: 16 bytes, below the minimum of 20

    let truncated_udp = udp4[..IP + 20 + 4].to_vec(); // half a UDP header

    let mut fragment = udp4.clone();
    fragment[IP + 6] = 0x20; // more fragments

    let mut later_fragment = udp4.clone();
    later_fragment[IP + 7] = 0x10; // offset 16 * 8 bytes

    let mut bad_udp_len = udp4.clone();
    bad_udp_len[IP + 20 + 4..IP + 20 + 6].copy_from_slice(&4u16.to_be_bytes());

    let mut ipv6_ext = v6().frame(&payload);
    ipv6_ext[IP + 6] = 44; // a fragment extension header follows

    vec![
        ("ARP", arp, Verdict::Pass),
        ("ICMP", icmp, Verdict::Pass),
        ("TCP SYN to the event port", syn, Verdict::Pass),
        ("UDP to the event port, IPv4", udp4, Verdict::PassNoSocket),
        (
            "UDP to the event port, IPv6",
            v6().frame(&payload),
            Verdict::PassNoSocket,
        ),
        (
            "UDP to the event port, VLAN",
            UdpSpec {
                vlan: Some(42),
                ..v4()
            }
            .frame(&payload),
            Verdict::PassNoSocket,
        ),
        (
            "UDP to the event port, VLAN + IPv6",
            UdpSpec {
                vlan: Some(7),
                ..v6()
            }
            .frame(&payload),
            Verdict::PassNoSocket,
        ),
        ("UDP to another port", other_port, Verdict::Pass),
        ("IPv4 IHL < 5", ihl_small, Verdict::PassMalformed),
        (
            "truncated UDP header",
            truncated_udp,
            Verdict::PassMalformed,
        ),
        ("UDP length below 8", bad_udp_len, Verdict::PassMalformed),
        ("IPv4 fragment (MF)", fragment, Verdict::PassFragment),
        (
            "IPv4 fragment (offset)",
            later_fragment,
            Verdict::PassFragment,
        ),
        ("IPv6 with an extension header", ipv6_ext, Verdict::Pass),
        ("Ethernet header only", vec![0xff; 14], Verdict::Pass),
    ]
}

fn load() -> Option<XdpProgram> {
    match XdpProgram::load(ObjectSource::Embedded) {
        Ok(p) => Some(p),
        Err(e @ XdpError::NotPermitted { .. }) => {
            common::skip(&e.to_string());
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// Runs `packet` once and returns the action and the one verdict counter that moved.
fn verdict(prog: &XdpProgram, packet: &[u8]) -> (u32, Verdict) {
    let before = prog.stats().unwrap();
    let run = prog.test_run(packet).unwrap();
    let moved = prog.stats().unwrap().since(&before);
    let hits: Vec<Verdict> = Verdict::ALL
        .into_iter()
        .filter(|v| moved.get(*v) != 0)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "exactly one counter moves per packet: {moved:?}"
    );
    assert_eq!(moved.get(hits[0]), 1);
    (run.retval, hits[0])
}

#[test]
fn each_fixture_gets_its_verdict() {
    let Some(mut prog) = load() else { return };
    prog.configure(XdpConfig {
        udp_port: PORT,
        allow_vlan: 1,
        attach_mode: 0,
        ..XdpConfig::default()
    })
    .unwrap();
    for (name, packet, want) in fixtures() {
        let (action, got) = verdict(&prog, &packet);
        assert_eq!(got, want, "{name}");
        assert_eq!(
            action, XDP_PASS,
            "{name}: everything passes while no socket is bound"
        );
    }
}

#[test]
fn configuration_changes_what_is_steered() {
    let Some(mut prog) = load() else { return };
    let vlan = UdpSpec {
        vlan: Some(42),
        ..v4()
    }
    .frame(b"x");
    // Unconfigured (port 0): nothing is event traffic.
    assert_eq!(verdict(&prog, &v4().frame(b"x")).1, Verdict::Pass);
    prog.configure(XdpConfig {
        udp_port: PORT,
        allow_vlan: 0,
        attach_mode: 0,
        ..XdpConfig::default()
    })
    .unwrap();
    assert_eq!(verdict(&prog, &v4().frame(b"x")).1, Verdict::PassNoSocket);
    assert_eq!(verdict(&prog, &vlan).1, Verdict::Pass, "VLAN steering off");
    prog.configure(XdpConfig {
        udp_port: 9999,
        allow_vlan: 1,
        attach_mode: 0,
        ..XdpConfig::default()
    })
    .unwrap();
    assert_eq!(
        verdict(&prog, &v4().frame(b"x")).1,
        Verdict::Pass,
        "port changed"
    );
    assert_eq!(
        verdict(
            &prog,
            &UdpSpec {
                dst_port: 9999,
                ..v4()
            }
            .frame(b"x")
        )
        .1,
        Verdict::PassNoSocket
    );
}

#[test]
fn packets_shorter_than_ethernet_are_refused_by_the_kernel_not_the_program() {
    let Some(prog) = load() else { return };
    let e = prog.test_run(&[0u8; 10]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
}

fn from(src: &str) -> UdpSpec {
    let src: IpAddr = src.parse().unwrap();
    match src {
        IpAddr::V4(_) => UdpSpec { src, ..v4() },
        IpAddr::V6(_) => UdpSpec { src, ..v6() },
    }
}

#[test]
fn the_allow_list_drops_event_traffic_from_other_sources_only() {
    let Some(mut prog) = load() else { return };
    let defence = Defence {
        allow: vec![
            "198.18.0.0/24".parse().unwrap(),
            "2001:2::/64".parse().unwrap(),
        ],
        ..Defence::default()
    };
    prog.set_allow_list(&defence).unwrap();
    prog.configure(defence.apply(XdpConfig {
        udp_port: PORT,
        ..XdpConfig::default()
    }))
    .unwrap();
    for (src, want, action) in [
        ("198.18.0.1", Verdict::PassNoSocket, XDP_PASS),
        ("198.18.0.255", Verdict::PassNoSocket, XDP_PASS),
        ("198.18.1.1", Verdict::DropDenied, XDP_DROP),
        ("203.0.113.9", Verdict::DropDenied, XDP_DROP),
        ("2001:2::9", Verdict::PassNoSocket, XDP_PASS),
        ("2001:3::1", Verdict::DropDenied, XDP_DROP),
        // IPv4-mapped sources never belong on the wire: malformed, never taken for IPv4.
        ("::ffff:198.18.0.1", Verdict::PassMalformed, XDP_PASS),
    ] {
        let (got_action, got) = verdict(&prog, &from(src).frame(b"x"));
        assert_eq!((got, got_action), (want, action), "from {src}");
    }
    // Not event traffic: the allow-list does not apply.
    let other = UdpSpec {
        dst_port: 9999,
        ..from("203.0.113.9")
    };
    assert_eq!(
        verdict(&prog, &other.frame(b"x")),
        (XDP_PASS, Verdict::Pass)
    );
    // Replaced, not appended to; and off again when the list is empty.
    let only = Defence {
        allow: vec!["203.0.113.0/24".parse().unwrap()],
        ..Defence::default()
    };
    prog.set_allow_list(&only).unwrap();
    assert_eq!(
        verdict(&prog, &from("198.18.0.1").frame(b"x")).1,
        Verdict::DropDenied
    );
    assert_eq!(
        verdict(&prog, &from("203.0.113.9").frame(b"x")).1,
        Verdict::PassNoSocket
    );
    prog.configure(Defence::default().apply(XdpConfig {
        udp_port: PORT,
        ..XdpConfig::default()
    }))
    .unwrap();
    assert_eq!(
        verdict(&prog, &from("198.18.0.1").frame(b"x")).1,
        Verdict::PassNoSocket
    );
}

#[test]
fn multicast_event_datagrams_are_steered_only_to_the_groups_joined() {
    let Some(mut prog) = load() else { return };
    let defence = Defence {
        groups: vec!["239.18.0.7".parse().unwrap(), "ff15::7".parse().unwrap()],
        ..Defence::default()
    };
    prog.set_allow_list(&defence).unwrap();
    prog.configure(defence.apply(XdpConfig {
        udp_port: PORT,
        ..XdpConfig::default()
    }))
    .unwrap();
    let to = |dst: &str| -> Vec<u8> {
        let dst: IpAddr = dst.parse().unwrap();
        match dst {
            IpAddr::V4(_) => UdpSpec { dst, ..v4() },
            IpAddr::V6(_) => UdpSpec { dst, ..v6() },
        }
        .frame(b"x")
    };
    // No socket is registered: a steered datagram falls back to the kernel as pass_no_socket.
    for (dst, want) in [
        ("239.18.0.7", Verdict::PassNoSocket),
        ("239.18.0.9", Verdict::Pass),
        ("224.0.0.1", Verdict::Pass),
        ("ff15::7", Verdict::PassNoSocket),
        ("ff15::9", Verdict::Pass),
        ("198.18.0.2", Verdict::PassNoSocket),
        ("2001:2::2", Verdict::PassNoSocket),
    ] {
        assert_eq!(verdict(&prog, &to(dst)), (XDP_PASS, want), "to {dst}");
    }
    // Replaced, not appended to: with no groups, every group's traffic is the kernel's.
    prog.set_allow_list(&Defence::default()).unwrap();
    assert_eq!(verdict(&prog, &to("239.18.0.7")).1, Verdict::Pass);
    assert_eq!(verdict(&prog, &to("198.18.0.2")).1, Verdict::PassNoSocket);
}

#[test]
fn each_source_gets_its_own_token_bucket() {
    let Some(mut prog) = load() else { return };
    // 1 datagram/s with a burst of 3: back-to-back test runs get 3 through, then drops (the
    // loop takes far less than the second a fourth token needs).
    prog.configure(
        Defence {
            rate_pps: 1,
            burst: 3,
            ..Defence::default()
        }
        .apply(XdpConfig {
            udp_port: PORT,
            ..XdpConfig::default()
        }),
    )
    .unwrap();
    let a = from("198.18.0.7").frame(b"x");
    let got: Vec<Verdict> = (0..5).map(|_| verdict(&prog, &a).1).collect();
    assert_eq!(
        got,
        [
            Verdict::PassNoSocket,
            Verdict::PassNoSocket,
            Verdict::PassNoSocket,
            Verdict::DropRateLimited,
            Verdict::DropRateLimited,
        ]
    );
    assert_eq!(verdict(&prog, &a).0, XDP_DROP);
    // Another source, IPv6 too, has a full bucket of its own.
    for src in ["198.18.0.8", "2001:2::5"] {
        assert_eq!(
            verdict(&prog, &from(src).frame(b"x")).1,
            Verdict::PassNoSocket,
            "{src}"
        );
    }
    // Traffic that is not steered never spends tokens.
    let other = UdpSpec {
        dst_port: 9999,
        ..from("198.18.0.7")
    };
    assert_eq!(verdict(&prog, &other.frame(b"x")).1, Verdict::Pass);
}

#[test]
fn the_object_xtask_builds_is_the_embedded_program() {
    let Some(embedded) = load() else { return };
    let Some(object) = common::bpf_object() else {
        return common::skip("no XDP object: run `cargo xtask build-ebpf`");
    };
    let file = XdpProgram::load(ObjectSource::File(&std::path::absolute(object).unwrap())).unwrap();
    assert_eq!(
        file.tag().unwrap(),
        embedded.tag().unwrap(),
        "a program pinned by `cargo xtask load` must be recognised by the daemon"
    );
}
