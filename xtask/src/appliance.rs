//! What `demo` and `bench` share: the lab with the XDP program pinned in its receiving
//! namespace, and the appliance started there as a child process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use eventstream::tools::lab::{Lab, RX_IF, in_netns};
use eventstream::xdp::Pinned;
use eventstream_common::AttachMode;
use serde_json::Value;

/// Says what is missing when not root, before anything is touched.
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{what} needs root: it creates network namespaces and a veth pair (CAP_NET_ADMIN), \
             loads and attaches an XDP program (CAP_BPF, CAP_NET_ADMIN), mounts bpffs if needed \
             (CAP_SYS_ADMIN) and locks AF_XDP memory (CAP_IPC_LOCK). Run it as root, e.g. \
             `sudo -E cargo xtask {what}`."
        );
    }
    Ok(())
}

/// Installs the Debian packages the lab and the daemon need when they are missing (we are root
/// here): iproute2 for the namespaces, and pkg-config, libhwloc-dev and libudev-dev for the
/// daemon's hwloc topology. Elsewhere than Debian/Ubuntu it names what to install.
fn ensure_packages() -> Result<()> {
    install_missing(&[])
}

/// As `ensure_packages`, with `extra` (Debian package, command that proves it is there)
/// besides.
pub fn install_missing(extra: &[(&str, &[&str])]) -> Result<()> {
    let ok = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let mut missing = Vec::new();
    for (pkg, probe) in extra {
        if !ok(probe[0], &probe[1..]) {
            missing.push(*pkg);
        }
    }
    if !ok("ip", &["-V"]) {
        missing.push("iproute2");
    }
    if !ok("pkg-config", &["--version"]) {
        missing.push("pkg-config");
    }
    if !ok("pkg-config", &["--exists", "hwloc"]) {
        missing.push("libhwloc-dev");
    }
    if !ok("pkg-config", &["--exists", "libudev"]) {
        missing.push("libudev-dev");
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !ok("apt-get", &["--version"]) {
        bail!(
            "missing: {} (Debian names; install the equivalents and rerun)",
            missing.join(", ")
        );
    }
    eprintln!("installing {} with apt-get", missing.join(", "));
    crate::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["update", "-qq"]),
    )?;
    crate::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
}

/// Builds the XDP object and the release daemon, installing what a fresh machine lacks first;
/// returns (object, binary).
pub fn build_all(root: &Path) -> Result<(PathBuf, PathBuf)> {
    ensure_packages()?;
    let object = crate::ebpf::build(root, true)?;
    crate::run(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "--locked",
        "-p",
        "eventstream",
    ]))?;
    // Where cargo put it: `CARGO_TARGET_DIR` when set, else the workspace's `target/`.
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok((object, target.join("release/eventstream")))
}

/// The lab, with the XDP program attached to the receiver's interface and pinned; both are
/// removed on drop (the program first, then the namespaces).
#[derive(Debug)]
pub struct PinnedLab {
    /// The lab (dropped last).
    pub lab: Lab,
    /// The attach mode the program got.
    pub mode: AttachMode,
}

impl PinnedLab {
    /// Brings the lab `name` up and pins the program from `object` on its receiver.
    pub fn up(name: &str, object: &Path) -> Result<Self> {
        Self::up_with_queues(name, object, 1)
    }

    /// As [`Self::up`], with `queues` RX queues on the receiver.
    pub fn up_with_queues(name: &str, object: &Path, queues: u32) -> Result<Self> {
        // Pins are kept per network namespace (`es-rx@netns-INODE`), so labs never share them.
        let lab = Lab::up_with_queues(name, queues)?;
        let mode = in_netns(&lab.rx_ns, || {
            crate::xdp::attach_and_pin(
                object,
                RX_IF,
                &[AttachMode::Driver, AttachMode::Skb],
                eventstream_common::DEFAULT_UDP_PORT,
                true,
            )
        })??;
        Ok(Self { lab, mode })
    }
}

impl Drop for PinnedLab {
    fn drop(&mut self) {
        let _ = in_netns(&self.lab.rx_ns, || Pinned::remove(RX_IF));
    }
}

/// The appliance, running in a namespace as a child process.
#[derive(Debug)]
pub struct Appliance {
    measure: std::cell::Cell<Measure>,
    child: Child,
    out: BufReader<ChildStdout>,
    /// The admin address inside the namespace.
    pub admin: String,
    ns: String,
}

/// What a throughput step counts as delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    /// Events delivered to worker sinks (the whole pipeline).
    Delivered,
    /// Events parsed on the AF_XDP path (`--probe parse`).
    Received,
    /// AF_XDP datagrams times events per datagram (`--probe bare`: nothing is parsed).
    Datagrams(u16),
}

impl Appliance {
    /// Starts `bin run --config CONFIG --netns NS ARGS...`; waits for its admin address.
    /// `log` receives its stderr (None: inherit, so its log lines show).
    pub fn start(
        bin: &Path,
        config: &Path,
        ns: &str,
        args: &[&str],
        log: Option<&Path>,
    ) -> Result<Self> {
        let stderr = match log {
            Some(p) => Stdio::from(
                std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
            ),
            None => Stdio::inherit(),
        };
        let mut child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(config)
            .args(["--netns", ns])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        let admin = loop {
            line.clear();
            if out.read_line(&mut line)? == 0 {
                let status = child.wait()?;
                bail!("the appliance exited before it was ready ({status}); see its log above");
            }
            if let Some(a) = line.trim().strip_prefix("listening admin ") {
                break a.to_owned();
            }
        };
        // Then wait until every thread runs: traffic sent before would measure start-up.
        loop {
            line.clear();
            if out.read_line(&mut line)? == 0 {
                let status = child.wait()?;
                bail!("the appliance exited before it was ready ({status}); see its log above");
            }
            if line.trim() == "ready" {
                break;
            }
        }
        Ok(Self {
            measure: std::cell::Cell::new(Measure::Delivered),
            child,
            out,
            admin,
            ns: ns.to_owned(),
        })
    }

    /// `GET /metrics`, as (series with labels, value) pairs.
    pub fn metrics(&self) -> Result<Vec<(String, f64)>> {
        let admin = self.admin.clone();
        let body = in_netns(&self.ns, move || -> Result<String> {
            let mut s = TcpStream::connect(&admin)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })??;
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect())
    }

    /// What [`Appliance::delivered`] counts from now on.
    pub fn measure(&self, m: Measure) {
        self.measure.set(m);
    }

    /// Events delivered to worker sinks (or, for a probe, what it measures), and to the DLQ,
    /// so far.
    pub fn delivered(&self) -> Result<(u64, u64)> {
        let m = self.metrics()?;
        let series = |name: &str| -> u64 {
            m.iter()
                .filter(|(k, _)| k.starts_with(name))
                .map(|(_, v)| *v as u64)
                .sum()
        };
        match self.measure.get() {
            Measure::Delivered => {}
            Measure::Received => {
                return Ok((
                    series("eventstream_received_events_total{source=\"xsk\"}"),
                    0,
                ));
            }
            Measure::Datagrams(per) => {
                let d = series("eventstream_received_datagrams_total{source=\"xsk\"}");
                return Ok((d * u64::from(per), 0));
            }
        }
        let sum = |family: &str| -> u64 {
            m.iter()
                .filter(|(k, _)| k.starts_with(family))
                .map(|(_, v)| *v as u64)
                .sum()
        };
        Ok((
            sum("eventstream_delivered_events_total{"),
            sum("eventstream_dlq_events_total{"),
        ))
    }

    /// Waits until delivery stops moving (at most `limit`); returns the last totals.
    pub fn settle(&self, limit: Duration) -> Result<(u64, u64)> {
        let end = Instant::now() + limit;
        let mut last = self.delivered()?;
        let mut still = 0;
        while Instant::now() < end && still < 3 {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.delivered()?;
            still = if now == last { still + 1 } else { 0 };
            last = now;
        }
        Ok(last)
    }

    /// Its resident set size (`VmRSS`), KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmRSS in /proc/PID/status")
    }

    /// SIGTERMs it (a drain) and returns its JSON report.
    pub fn stop(mut self) -> Result<Value> {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child's.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("the appliance did not drain within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            bail!("the appliance exited with {status}");
        }
        for line in (&mut self.out).lines() {
            let line = line?;
            if line.starts_with('{') {
                return Ok(serde_json::from_str(&line)?);
            }
        }
        bail!("the appliance printed no report")
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
