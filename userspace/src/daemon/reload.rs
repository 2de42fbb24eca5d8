//! Hot reload (`SIGHUP`, `POST /config/reload`): the configuration file is read again and what
//! can change while the appliance runs is put in force without a restart and without losing an
//! event: the routes, the control plane's watermarks and priority floors ([`Rules`], swapped
//! whole for the data plane, see [`crate::engine::rules`]) and the TCP limits ([`TcpLimits`]).
//! A file that does not parse or validate is refused with its error, and the rules in force
//! stay. Keys that only a restart can change (sockets, sinks, pools, the XDP setup) are named
//! in the answer and the log when they differ, and left as they are.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use tracing::{info, warn};

use crate::engine::Target;
use crate::engine::dedup::KeyFrom;
use crate::engine::route::Router;
use crate::engine::rules::{LiveRules, Rules};
use crate::ingest::tcp::TcpLimits;
use crate::ops::config::{Config, KeyConfig};

/// The reloadable rules of `cfg`.
///
/// # Errors
/// A route pattern that does not compile.
pub fn rules_of(cfg: &Config) -> Result<Rules> {
    let mut router = Router::new();
    for r in &cfg.routes {
        let key = match r.key {
            KeyConfig::Hash => KeyFrom::TopicAndPayload,
            KeyConfig::PayloadId => KeyFrom::PayloadId,
        };
        router.add(
            &r.topic,
            Target {
                class: r.class,
                key,
            },
        )?;
    }
    if let Some(class) = cfg.engine.default_route {
        router.set_default(Target {
            class,
            key: KeyFrom::TopicAndPayload,
        });
    }
    Ok(Rules {
        router,
        control: cfg.control,
    })
}

/// The TCP limits of `cfg`.
pub fn tcp_limits_of(cfg: &Config) -> (Duration, Duration, usize) {
    let t = &cfg.ingest.tcp;
    (
        Duration::from_secs(t.read_timeout_secs),
        Duration::from_secs(t.frame_timeout_secs),
        t.max_connections_per_source,
    )
}

/// Sections of the configuration a reload does not apply (they need a restart), by name.
fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut v = Vec::new();
    let mut check = |name, differs: bool| {
        if differs {
            v.push(name);
        }
    };
    check("protocol", old.protocol != new.protocol);
    check("xdp", old.xdp != new.xdp);
    check("ingest.udp", old.ingest.udp != new.ingest.udp);
    check(
        "ingest.tcp (bind, max_connections, frames_per_connection)",
        old.ingest.tcp.bind != new.ingest.tcp.bind
            || old.ingest.tcp.max_connections != new.ingest.tcp.max_connections
            || old.ingest.tcp.frames_per_connection != new.ingest.tcp.frames_per_connection,
    );
    check("pool", old.pool != new.pool);
    check("queue", old.queue != new.queue);
    check(
        "engine (other than default_route)",
        engine_but_routes(old) != engine_but_routes(new),
    );
    check("sinks", old.sinks != new.sinks);
    check("admin", old.admin != new.admin);
    check("privileges", old.privileges != new.privileges);
    v
}

fn engine_but_routes(c: &Config) -> crate::ops::config::EngineConfig {
    let mut e = c.engine.clone();
    e.default_route = None;
    e
}

/// Reloads the configuration file into the running appliance.
#[derive(Debug)]
pub struct Reloader<'a> {
    path: Option<PathBuf>,
    live: &'a LiveRules,
    tcp: &'a TcpLimits,
    /// The configuration in force (what the file said at the last good load, with the command
    /// line's overrides).
    running: Mutex<Config>,
    /// Reloads that were put in force, and those refused: `config_reloads_total{result}`.
    pub counts: [AtomicU64; 2],
}

impl<'a> Reloader<'a> {
    /// A reloader for `path` (none: the appliance was started without a file).
    pub fn new(
        path: Option<PathBuf>,
        running: Config,
        live: &'a LiveRules,
        tcp: &'a TcpLimits,
    ) -> Self {
        Self {
            path,
            live,
            tcp,
            running: Mutex::new(running),
            counts: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    /// Reads the file again and puts its reloadable parts in force.
    ///
    /// # Errors
    /// The file's error (read, parse, validation, a bad route), in words for the operator; the
    /// rules in force stay.
    pub fn reload(&self) -> std::result::Result<String, String> {
        let r = self.try_reload();
        match &r {
            Ok(what) => {
                self.counts[0].fetch_add(1, Ordering::Relaxed);
                info!(%what, "configuration reloaded");
            }
            Err(e) => {
                self.counts[1].fetch_add(1, Ordering::Relaxed);
                warn!(reason = %e, "configuration reload refused; the rules in force stay");
            }
        }
        r
    }

    fn try_reload(&self) -> std::result::Result<String, String> {
        let path = self
            .path
            .as_ref()
            .ok_or("started without a configuration file: nothing to reload")?;
        let mut new = Config::load(path).map_err(|e| e.to_string())?;
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        // The command line's overrides stay in force.
        new.xdp.iface.clone_from(&running.xdp.iface);
        new.xdp.queues = running.xdp.queues;
        new.ingest.udp.bind = running.ingest.udp.bind;
        let rules = rules_of(&new).map_err(|e| e.to_string())?;
        let routes = new.routes.len();
        self.live.publish(rules);
        let (read, frame, per_source) = tcp_limits_of(&new);
        self.tcp.set(read, frame, per_source);
        let ignored = restart_only(&running, &new);
        *running = new;
        let mut what = format!(
            "{routes} routes, control thresholds and TCP limits in force from {}",
            path.display()
        );
        if !ignored.is_empty() {
            what.push_str(&format!(
                "; changed but kept until a restart: {}",
                ignored.join(", ")
            ));
        }
        Ok(what)
    }
}
