//! The admin port under hostile clients: absurd and lying `Content-Length`s, bodies that never
//! come, header floods, garbage, more connections than the cap, and state changes without a
//! token or from another origin. None of them crashes or freezes it: `/metrics` keeps answering,
//! refusals are counted, and SIGTERM still ends the daemon promptly.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

mod common;
use common::daemon::{exit_report, http, read_until, series, start, stop};

/// Sends `raw` on a fresh connection and returns the status code of the answer (0 if the
/// server closed without one).
fn raw(admin: &str, raw: &[u8]) -> u16 {
    let mut c = TcpStream::connect(admin).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = c.write_all(raw);
    let mut resp = Vec::new();
    let _ = c.read_to_end(&mut resp);
    String::from_utf8_lossy(&resp)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// `POST /state` with `word`, the given extra header lines, and a `Host`.
fn post(admin: &str, host: &str, headers: &str, word: &str) -> u16 {
    raw(
        admin,
        format!(
            "POST /state HTTP/1.1\r\nHost: {host}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{word}",
            word.len()
        )
        .as_bytes(),
    )
}

fn config(token_file: &std::path::Path) -> String {
    format!(
        "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n  tcp:\n    bind: null\nadmin:\n  bind: \"127.0.0.1:0\"\n  token_file: \"{}\"\n  max_connections: 8\n  timeout_secs: 1\n",
        token_file.display()
    )
}

#[test]
fn hostile_requests_neither_crash_nor_freeze_the_admin_port() {
    let tok_dir = std::env::temp_dir().join(format!("es-admin-tok-{}", std::process::id()));
    std::fs::create_dir_all(&tok_dir).unwrap();
    let token = "s3cret-token-0123456789";
    let tok = tok_dir.join("token");
    std::fs::write(&tok, format!("{token}\n")).unwrap();
    let (child, mut out, _udp, dir) = start(&config(&tok), "admin-hostile");
    let admin = read_until(&mut out, "listening admin ");

    // A Content-Length near i64::MAX on a GET: answered, nothing read, nothing aborted.
    let code = raw(
        &admin,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 9223372036854775000\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 200);
    assert_eq!(http(&admin, "GET", "/healthz", ""), (200, "ok\n".into()));

    // A body announced and never sent: 408 after admin.timeout_secs, while /metrics answers
    // at once on other connections meanwhile.
    let hung = std::thread::spawn({
        let admin = admin.clone();
        move || {
            let mut c = TcpStream::connect(&admin).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(
                c,
                "POST /state HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {token}\r\nContent-Length: 5000\r\n\r\nd"
            )
            .unwrap();
            let mut resp = String::new();
            let _ = c.read_to_string(&mut resp);
            resp
        }
    });
    // Slow clients that never finish their headers (a byte, then silence).
    let slow: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut c = TcpStream::connect(&admin).unwrap();
            c.write_all(b"G").unwrap();
            c
        })
        .collect();
    let t0 = Instant::now();
    let (code, m) = http(&admin, "GET", "/metrics", "");
    assert_eq!(code, 200);
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "/metrics answers while others hang"
    );
    assert!(m.contains("eventstream_received_events_total"), "{m}");
    let resp = hung.join().unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 408"),
        "a body that never comes: {resp:?}"
    );
    drop(slow);

    // A header flood and garbage: refused by status, the server stays up.
    let flood = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    assert_eq!(raw(&admin, flood.as_bytes()), 431);
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let code = raw(
        &admin,
        format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
    );
    assert!(code == 431 || code == 400, "{code}");
    assert_eq!(raw(&admin, b"\x00\x01GARBAGE\r\n\r\n"), 400);
    assert_eq!(
        raw(
            &admin,
            b"DELETE /state HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ),
        405
    );

    // More connections than admin.max_connections: the rest are closed at accept and counted;
    // once the idle ones time out, service is back.
    let hold: Vec<TcpStream> = (0..12)
        .map(|_| TcpStream::connect(&admin).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    drop(hold);
    std::thread::sleep(Duration::from_millis(1500));
    let (code, m) = http(&admin, "GET", "/metrics", "");
    assert_eq!(code, 200);
    assert!(
        series(&m, "eventstream_admin_refused_connections_total") >= 4,
        "{m}"
    );

    // State changes: token, Host and Origin are checked before anything is done.
    let bearer = format!("Authorization: Bearer {token}\r\n");
    assert_eq!(post(&admin, &admin, "", "pause"), 403, "no token");
    assert_eq!(
        post(&admin, &admin, "Authorization: Bearer wrong\r\n", "pause"),
        403
    );
    assert_eq!(
        post(&admin, "rebound.example:8090", &bearer, "pause"),
        403,
        "DNS rebinding"
    );
    assert_eq!(
        post(
            &admin,
            &admin,
            &format!("{bearer}Origin: http://evil.example\r\n"),
            "pause"
        ),
        403,
        "CSRF from a web page"
    );
    assert_eq!(
        http(&admin, "GET", "/state", ""),
        (200, "{\"state\":\"RUNNING\"}\n".into()),
        "nothing refused changed the state"
    );
    let (_, m) = http(&admin, "GET", "/metrics", "");
    assert!(
        series(
            &m,
            "eventstream_admin_request_errors_total{error_type=\"forbidden\"}"
        ) >= 4,
        "{m}"
    );
    let port = admin.rsplit_once(':').unwrap().1;
    assert_eq!(
        post(
            &admin,
            &format!("localhost:{port}"),
            &format!("{bearer}Origin: http://{admin}\r\n"),
            "drain"
        ),
        202
    );
    let r = exit_report(child, out, "an authorised drain did not stop the daemon");
    assert_eq!(r["state_transitions"]["DRAINING"], 1, "{r}");
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(tok_dir);
}

#[test]
fn sigterm_ends_the_daemon_while_admin_clients_hang() {
    let tok_dir = std::env::temp_dir().join(format!("es-admin-tok2-{}", std::process::id()));
    std::fs::create_dir_all(&tok_dir).unwrap();
    let tok = tok_dir.join("token");
    std::fs::write(&tok, "another-token-0123456789").unwrap();
    let (child, mut out, _udp, dir) = start(&config(&tok), "admin-hang");
    let admin = read_until(&mut out, "listening admin ");
    let _hang: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut c = TcpStream::connect(&admin).unwrap();
            let _ = c.write_all(b"POST /state HTTP/1.1\r\nContent-Length: 5000\r\n\r\n");
            c
        })
        .collect();
    let t0 = Instant::now();
    let _ = stop(child, out);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(tok_dir);
}

#[test]
fn a_short_or_missing_token_file_is_a_clear_error_at_start() {
    let tok_dir = std::env::temp_dir().join(format!("es-admin-tok3-{}", std::process::id()));
    std::fs::create_dir_all(&tok_dir).unwrap();
    for (name, contents) in [("short", Some("abc")), ("missing", None)] {
        let tok = tok_dir.join(name);
        if let Some(c) = contents {
            std::fs::write(&tok, c).unwrap();
        }
        let cfg = tok_dir.join(format!("{name}.yaml"));
        std::fs::write(&cfg, config(&tok)).unwrap();
        let o = common::daemon::command()
            .args(["run", "--no-xdp", "--config"])
            .arg(&cfg)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("admin.token_file"), "{name}: {err}");
        assert!(
            !err.to_lowercase().contains("backtrace"),
            "{name}: a clean error, not a backtrace: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(tok_dir);
}
