//! Running the daemon from a test: start it with a config, read the lines it prints, talk to
//! its admin port, blast it, and stop it for its exit report.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A daemon started by a test: the child, its stdout (after the line waited for), what that
/// line named (an address), and the directory holding its config and log.
pub type Started = (
    std::process::Child,
    BufReader<std::process::ChildStdout>,
    String,
    std::path::PathBuf,
);

/// `eventstream` as a child that dies with the thread that started it (`PR_SET_PDEATHSIG`): a
/// test that fails before it stops its daemon leaves none running behind it.
pub fn command() -> Command {
    use std::os::unix::process::CommandExt as _;
    let mut c = Command::new(env!("CARGO_BIN_EXE_eventstream"));
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl(2),
    // which is async-signal-safe; it touches no memory of the parent's.
    unsafe {
        c.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

/// Starts the daemon with `config`, returns it and the UDP address it bound.
pub fn start(config: &str, tag: &str) -> Started {
    spawn(&["--no-xdp"], config, tag, "listening udp ")
}

/// Starts the daemon on AF_XDP in the lab namespace `netns` on `iface`; returns it and its admin
/// address (printed once the sockets are bound and registered).
pub fn start_in_lab(config: &str, tag: &str, netns: &str, iface: &str) -> Started {
    spawn(
        &["--netns", netns, "--iface", iface],
        config,
        tag,
        "listening admin ",
    )
}

/// Starts the daemon on the kernel paths only (`--no-xdp`) in the lab namespace `netns`;
/// returns it and the UDP address it bound.
pub fn start_kernel_in_lab(config: &str, tag: &str, netns: &str) -> Started {
    spawn(
        &["--netns", netns, "--no-xdp"],
        config,
        tag,
        "listening udp ",
    )
}

/// Where each daemon started by [`spawn`] writes its log (stderr), by pid: a failed stop shows
/// the log's end.
static LOGS: std::sync::Mutex<Vec<(u32, std::path::PathBuf)>> = std::sync::Mutex::new(Vec::new());

/// The last lines of the log of daemon `pid`, if it was started here.
fn log_tail(pid: u32) -> String {
    let path = LOGS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .find(|(p, _)| *p == pid)
        .map(|(_, l)| l.clone());
    path.and_then(|p| std::fs::read_to_string(p).ok())
        .map(|t| {
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        })
        .unwrap_or_default()
}

/// Writes `config` into a directory of its own, runs `eventstream run ARGS --config FILE` and
/// reads stdout up to the line starting with `ready`; returns what follows `ready` on it.
fn spawn(args: &[&str], config: &str, tag: &str, ready: &str) -> Started {
    let dir = std::env::temp_dir().join(format!("es-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("eventstream.yaml");
    std::fs::write(&path, config).unwrap();
    let log = dir.join("daemon.stderr");
    let mut child = command()
        .arg("run")
        .args(args)
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    LOGS.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push((child.id(), log));
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let addr = read_until(&mut out, ready);
    (child, out, addr, dir)
}

/// SIGTERMs the daemon and returns its JSON report.
pub fn stop(
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
) -> serde_json::Value {
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child's.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    exit_report(child, out, "daemon did not exit after SIGTERM")
}

/// Waits (at most 10 s, else fails with `why`) for the daemon to exit 0; returns its report.
pub fn exit_report(
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
    why: &str,
) -> serde_json::Value {
    exit_report_within(child, out, why, Duration::from_secs(10))
}

/// As [`exit_report`], waiting at most `limit`.
pub fn exit_report_within(
    mut child: std::process::Child,
    mut out: BufReader<std::process::ChildStdout>,
    why: &str,
    limit: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "{why}; its log ends:\n{}",
            log_tail(child.id())
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "{status}; its log ends:\n{}",
        log_tail(child.id())
    );
    read_report(&mut out)
}

/// The rest of the first stdout line that starts with `prefix` (an address the daemon bound).
pub fn read_until(out: &mut impl BufRead, prefix: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "no `{prefix}` line on stdout"
        );
        if let Some(rest) = line.trim().strip_prefix(prefix) {
            return rest.to_owned();
        }
    }
}

/// The JSON report: the first stdout line that is a JSON object.
pub fn read_report(out: &mut impl BufRead) -> serde_json::Value {
    for line in out.lines() {
        let line = line.unwrap();
        if line.starts_with('{') {
            return serde_json::from_str(&line).unwrap();
        }
    }
    panic!("no JSON report on stdout");
}

/// One HTTP/1.0 request to the admin port; returns (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        c,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Runs `eventstream blast` with `args` (for at most 10 s) and returns its JSON tally.
pub fn blast(args: &[&str]) -> serde_json::Value {
    blast_for(args, 10)
}

/// [`blast`], for at most `secs` seconds.
pub fn blast_for(args: &[&str], secs: u64) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_eventstream"))
        .arg("blast")
        .args(args)
        .args(["--quiet", "--duration", &secs.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "blast {args:?}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The value of one series in a Prometheus text body (0 when absent).
pub fn series(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}
