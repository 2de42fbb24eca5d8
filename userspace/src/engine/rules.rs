//! The rules the data plane applies that an operator may change while it runs: the route table
//! and the control plane's watermarks and priority floors (`SIGHUP`, `POST /config/reload`).
//!
//! The housekeeping side publishes a whole new [`Rules`] ([`LiveRules::publish`], an
//! `arc-swap` store, then the generation number). Each data-plane thread holds a [`RulesView`]
//! and calls [`RulesView::refresh`] once per batch: one relaxed load of the generation, and
//! only when it moved, one load of the new rules (a reference count, no lock). A batch never
//! mixes two rule sets, and events already routed keep their route: nothing is lost or counted
//! twice across a reload.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use super::Target;
use super::control::ControlConfig;
use super::route::Router;

/// One consistent set of reloadable rules.
#[derive(Clone, Debug)]
pub struct Rules {
    /// Topic routes.
    pub router: Router<Target>,
    /// Watermarks and priority floors.
    pub control: ControlConfig,
}

/// The rules in force, shared by every thread.
#[derive(Debug)]
pub struct LiveRules {
    current: ArcSwap<Rules>,
    /// Bumped after each publish; what data-plane threads poll.
    generation: AtomicU64,
}

impl LiveRules {
    /// Rules in force from the start.
    pub fn new(rules: Rules) -> Self {
        Self {
            current: ArcSwap::from_pointee(rules),
            generation: AtomicU64::new(0),
        }
    }

    /// Puts `rules` in force: every data-plane thread takes them at its next batch.
    pub fn publish(&self, rules: Rules) {
        self.current.store(Arc::new(rules));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The rules in force now.
    pub fn load(&self) -> Arc<Rules> {
        self.current.load_full()
    }

    /// A view for one thread.
    pub fn view(&self) -> RulesView<'_> {
        let seen = self.generation.load(Ordering::Acquire);
        RulesView {
            live: self,
            seen,
            rules: self.load(),
        }
    }
}

/// One thread's copy of the rules in force, refreshed once per batch.
#[derive(Debug)]
pub struct RulesView<'a> {
    live: &'a LiveRules,
    seen: u64,
    rules: Arc<Rules>,
}

impl RulesView<'_> {
    /// Takes newer rules if there are any; `true` when it did.
    #[inline]
    pub fn refresh(&mut self) -> bool {
        let g = self.live.generation.load(Ordering::Acquire);
        if g == self.seen {
            return false;
        }
        self.rules = self.live.load();
        self.seen = g;
        true
    }

    /// The rules this thread applies.
    #[inline]
    pub fn get(&self) -> &Rules {
        &self.rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::WorkerClass;
    use crate::engine::dedup::KeyFrom;

    fn rules(topic: &str, class: WorkerClass) -> Rules {
        let mut router = Router::new();
        router
            .add(
                topic,
                Target {
                    class,
                    key: KeyFrom::TopicAndPayload,
                },
            )
            .unwrap();
        Rules {
            router,
            control: ControlConfig::default(),
        }
    }

    #[test]
    fn a_view_takes_published_rules_at_its_next_refresh_only() {
        let live = LiveRules::new(rules("a.>", WorkerClass::Realtime));
        let mut v = live.view();
        assert!(!v.refresh(), "nothing new");
        assert!(v.get().router.route("a.b").is_some());
        live.publish(rules("b.>", WorkerClass::Batch));
        assert!(
            v.get().router.route("a.b").is_some(),
            "not before the refresh"
        );
        assert!(v.refresh());
        assert!(v.get().router.route("a.b").is_none());
        assert_eq!(
            v.get().router.route("b.c").map(|t| t.class),
            Some(WorkerClass::Batch)
        );
        assert!(!v.refresh());
    }
}
