//! The XDP program's verdict on each kind of packet, run in the kernel with `BPF_PROG_TEST_RUN`.
//!
//! Needs root (or CAP_BPF + CAP_NET_ADMIN) and the object from `cargo xtask build-ebpf`; skips
//! with a message where either is missing, except under CI, where it fails instead.

mod common;

use std::net::{IpAddr, Ipv6Addr};

use eventstream::wire::packet::UdpSpec;
use eventstream::xdp::{XdpError, XdpProgram};
use eventstream_common::{Verdict, XdpConfig};

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
    let Some(object) = common::bpf_object() else {
        common::skip("no XDP object: run `cargo xtask build-ebpf`");
        return None;
    };
    match XdpProgram::load(&object) {
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
    })
    .unwrap();
    assert_eq!(verdict(&prog, &v4().frame(b"x")).1, Verdict::PassNoSocket);
    assert_eq!(verdict(&prog, &vlan).1, Verdict::Pass, "VLAN steering off");
    prog.configure(XdpConfig {
        udp_port: 9999,
        allow_vlan: 1,
        attach_mode: 0,
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
