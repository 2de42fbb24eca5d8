//! The control plane: pipeline state from queue depth and admin commands, and what each state
//! admits.
//!
//! | state | entered | events |
//! |---|---|---|
//! | `RUNNING` | depth below `low` (from `DROPPING`), or `resume` | all admitted |
//! | `PAUSED` | `pause` | ingest stops taking new events; queued work continues |
//! | `DRAINING` | `drain`, SIGTERM | ingest stopped; queues flush to sinks; then exit |
//! | `DROPPING` | depth at or above `high`; or below `critical_low` from `EMERGENCY` | priority below `dropping_min_priority` to the DLQ, `reason="dropping"` |
//! | `EMERGENCY` | depth at or above `critical` | priority below `emergency_min_priority` to the DLQ, `reason="emergency"` |
//!
//! The gaps between `high` and `low`, and between `critical` and `critical_low`, are the
//! hysteresis that keeps the state from flapping around one threshold. Depth is a fraction of
//! capacity. Every transition is counted and returned to the caller to log.

use serde::Deserialize;

/// The pipeline's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PipelineState {
    /// Normal operation.
    Running = 0,
    /// Ingest paused by an operator.
    Paused = 1,
    /// Shutting down: ingest stopped, queues flushing.
    Draining = 2,
    /// Shedding low priorities.
    Dropping = 3,
    /// Only the highest priorities pass.
    Emergency = 4,
}

impl PipelineState {
    /// All states, in gauge-value order.
    pub const ALL: [PipelineState; 5] = [
        Self::Running,
        Self::Paused,
        Self::Draining,
        Self::Dropping,
        Self::Emergency,
    ];

    /// `RUNNING`, `PAUSED`, ...
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Running => "RUNNING",
            Self::Paused => "PAUSED",
            Self::Draining => "DRAINING",
            Self::Dropping => "DROPPING",
            Self::Emergency => "EMERGENCY",
        }
    }

    /// From the gauge value.
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Running),
            1 => Some(Self::Paused),
            2 => Some(Self::Draining),
            3 => Some(Self::Dropping),
            4 => Some(Self::Emergency),
            _ => None,
        }
    }
}

/// Thresholds, as fractions of queue capacity, and priority floors.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// Back to `RUNNING` below this.
    pub low_watermark: f64,
    /// `DROPPING` at or above this.
    pub high_watermark: f64,
    /// `EMERGENCY` at or above this.
    pub critical_watermark: f64,
    /// Back from `EMERGENCY` to `DROPPING` below this.
    pub critical_low_watermark: f64,
    /// In `DROPPING`, events with a lower priority go to the DLQ.
    pub dropping_min_priority: u8,
    /// In `EMERGENCY`, events with a lower priority go to the DLQ.
    pub emergency_min_priority: u8,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            low_watermark: 0.50,
            high_watermark: 0.75,
            critical_watermark: 0.90,
            critical_low_watermark: 0.80,
            dropping_min_priority: 3,
            emergency_min_priority: 200,
        }
    }
}

impl ControlConfig {
    /// Checks `0 < low < high <= critical_low < critical <= 1`.
    ///
    /// # Errors
    /// The first violated relation, naming the keys.
    pub fn validate(&self) -> Result<(), &'static str> {
        let c = self;
        if !(c.low_watermark > 0.0 && c.low_watermark < c.high_watermark) {
            return Err("control.low_watermark must be above 0 and below control.high_watermark");
        }
        if c.high_watermark > c.critical_low_watermark {
            return Err("control.high_watermark must not exceed control.critical_low_watermark");
        }
        if c.critical_low_watermark >= c.critical_watermark || c.critical_watermark > 1.0 {
            return Err(
                "control.critical_low_watermark < control.critical_watermark <= 1 must hold",
            );
        }
        if c.dropping_min_priority > c.emergency_min_priority {
            return Err(
                "control.dropping_min_priority must not exceed control.emergency_min_priority",
            );
        }
        Ok(())
    }
}

/// An operator command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Stop taking new events.
    Pause,
    /// Take events again (from `PAUSED`).
    Resume,
    /// Stop ingest, flush, exit.
    Drain,
}

/// Why the control plane turned an event away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shed {
    /// Below `dropping_min_priority` while `DROPPING`.
    Dropping,
    /// Below `emergency_min_priority` while `EMERGENCY`.
    Emergency,
}

impl Shed {
    /// The DLQ / `discarded_total` reason.
    pub const fn reason(self) -> &'static str {
        match self {
            Self::Dropping => "dropping",
            Self::Emergency => "emergency",
        }
    }
}

/// The state machine. Owned by the dispatcher thread.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    cfg: ControlConfig,
    state: PipelineState,
    /// Transitions into each state, indexed by `PipelineState as usize`.
    transitions: [u64; 5],
}

impl ControlPlane {
    /// Starts `RUNNING`.
    pub fn new(cfg: ControlConfig) -> Self {
        Self {
            cfg,
            state: PipelineState::Running,
            transitions: [0; 5],
        }
    }

    /// Takes new watermarks and priority floors (a reload); the state stays, and the next
    /// observation applies them.
    pub fn set_config(&mut self, cfg: ControlConfig) {
        self.cfg = cfg;
    }

    /// The current state.
    pub const fn state(&self) -> PipelineState {
        self.state
    }

    /// Transitions into each state so far.
    pub const fn transitions(&self) -> &[u64; 5] {
        &self.transitions
    }

    fn go(&mut self, to: PipelineState) -> Option<(PipelineState, PipelineState)> {
        if to == self.state {
            return None;
        }
        let from = core::mem::replace(&mut self.state, to);
        self.transitions[to as usize] += 1;
        Some((from, to))
    }

    /// Feeds the queue depth; returns the transition it caused, if any. `PAUSED` and
    /// `DRAINING` are left only by commands.
    pub fn observe(
        &mut self,
        depth: usize,
        capacity: usize,
    ) -> Option<(PipelineState, PipelineState)> {
        use PipelineState::*;
        let f = depth as f64 / capacity.max(1) as f64;
        let c = self.cfg;
        let to = match self.state {
            Paused | Draining => return None,
            _ if f >= c.critical_watermark => Emergency,
            Emergency if f >= c.critical_low_watermark => Emergency,
            Emergency | Dropping if f >= c.low_watermark => Dropping,
            Running if f >= c.high_watermark => Dropping,
            Running => Running,
            Emergency | Dropping => Running,
        };
        self.go(to)
    }

    /// Applies an operator command; returns the transition, if any. `DRAINING` is final.
    pub fn command(&mut self, cmd: Command) -> Option<(PipelineState, PipelineState)> {
        match (self.state, cmd) {
            (PipelineState::Draining, _) => None,
            (_, Command::Drain) => self.go(PipelineState::Draining),
            (_, Command::Pause) => self.go(PipelineState::Paused),
            (PipelineState::Paused, Command::Resume) => self.go(PipelineState::Running),
            (_, Command::Resume) => None,
        }
    }

    /// Whether an event of `priority` passes in the current state.
    ///
    /// # Errors
    /// The [`Shed`] reason when it goes to the DLQ instead.
    #[inline]
    pub fn admit(&self, priority: u8) -> Result<(), Shed> {
        admit(&self.cfg, self.state, priority)
    }
}

/// What `state` does with an event of `priority`, by `cfg`'s floors: the rule that
/// [`ControlPlane::admit`] applies, for threads that only read the published state.
///
/// # Errors
/// The [`Shed`] reason when it goes to the DLQ instead.
#[inline]
pub fn admit(cfg: &ControlConfig, state: PipelineState, priority: u8) -> Result<(), Shed> {
    match state {
        PipelineState::Dropping if priority < cfg.dropping_min_priority => Err(Shed::Dropping),
        PipelineState::Emergency if priority < cfg.emergency_min_priority => Err(Shed::Emergency),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::PipelineState::*;
    use super::*;

    fn cp() -> ControlPlane {
        ControlPlane::new(ControlConfig::default())
    }

    #[test]
    fn rises_through_the_watermarks_and_falls_with_hysteresis() {
        let mut c = cp();
        assert_eq!(c.observe(70, 100), None);
        assert_eq!(c.observe(75, 100), Some((Running, Dropping)));
        assert_eq!(
            c.observe(60, 100),
            None,
            "between low and high: stays DROPPING"
        );
        assert_eq!(c.observe(95, 100), Some((Dropping, Emergency)));
        assert_eq!(
            c.observe(85, 100),
            None,
            "above critical_low: stays EMERGENCY"
        );
        assert_eq!(c.observe(79, 100), Some((Emergency, Dropping)));
        assert_eq!(c.observe(50, 100), None, "at low: stays DROPPING");
        assert_eq!(c.observe(49, 100), Some((Dropping, Running)));
        assert_eq!(
            c.observe(99, 100),
            Some((Running, Emergency)),
            "a jump goes straight up"
        );
        assert_eq!(
            c.observe(0, 100),
            Some((Emergency, Running)),
            "and a drop straight down"
        );
        assert_eq!(c.transitions()[Dropping as usize], 2);
        assert_eq!(c.transitions()[Emergency as usize], 2);
    }

    #[test]
    fn admission_by_priority() {
        let mut c = cp();
        assert_eq!(c.admit(0), Ok(()));
        c.observe(80, 100);
        assert_eq!(c.admit(2), Err(Shed::Dropping));
        assert_eq!(c.admit(3), Ok(()));
        c.observe(100, 100);
        assert_eq!(c.admit(199), Err(Shed::Emergency));
        assert_eq!(c.admit(255), Ok(()));
        assert_eq!(Shed::Emergency.reason(), "emergency");
    }

    #[test]
    fn commands_and_their_limits() {
        let mut c = cp();
        assert_eq!(c.command(Command::Resume), None);
        assert_eq!(c.command(Command::Pause), Some((Running, Paused)));
        assert_eq!(c.observe(100, 100), None, "load does not leave PAUSED");
        assert_eq!(c.command(Command::Resume), Some((Paused, Running)));
        assert_eq!(c.command(Command::Drain), Some((Running, Draining)));
        assert_eq!(c.command(Command::Resume), None, "DRAINING is final");
        assert_eq!(c.observe(0, 100), None);
    }

    #[test]
    fn config_relations_are_checked() {
        assert!(ControlConfig::default().validate().is_ok());
        let bad = ControlConfig {
            low_watermark: 0.8,
            ..ControlConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("low_watermark"));
        let bad = ControlConfig {
            critical_watermark: 1.5,
            ..ControlConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
