//! Topic routing: which worker class an event goes to.
//!
//! Topics are UTF-8 with levels separated by `/` or `.` (PROTOCOL.md). A route's pattern is a
//! topic whose levels may be wildcards, as NATS and MQTT users expect:
//! - `*` (or MQTT's `+`) matches exactly one level;
//! - `>` matches one or more remaining levels (NATS);
//! - `#` matches zero or more remaining levels (MQTT: `sensors/#` matches `sensors` too).
//!
//! Lookup order: an exact route for the whole topic (one hash lookup), then the wildcard routes
//! in the order they were configured, then the default route; none of these is `None`, which
//! the dispatcher sends to the DLQ with `reason="no_route"`. Routing allocates nothing.

use std::collections::HashMap;

/// One level of a route pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    Literal(Box<str>),
    /// `*` or `+`.
    One,
    /// `>`: one or more levels.
    OneOrMore,
    /// `#`: zero or more levels.
    ZeroOrMore,
}

/// A route pattern that is not valid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("route pattern {pattern:?}: {why}")]
pub struct PatternError {
    /// The pattern.
    pub pattern: String,
    /// What is wrong.
    pub why: &'static str,
}

fn levels(topic: &str) -> impl Iterator<Item = &str> {
    topic.split(['/', '.'])
}

/// A compiled wildcard pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pattern(Vec<Level>);

impl Pattern {
    fn parse(p: &str) -> Result<Self, PatternError> {
        let err = |why| PatternError {
            pattern: p.to_owned(),
            why,
        };
        if p.is_empty() {
            return Err(err("empty"));
        }
        let mut out = Vec::new();
        let all: Vec<&str> = levels(p).collect();
        for (i, l) in all.iter().enumerate() {
            let last = i + 1 == all.len();
            out.push(match *l {
                "*" | "+" => Level::One,
                ">" if last => Level::OneOrMore,
                "#" if last => Level::ZeroOrMore,
                ">" | "#" => return Err(err("`>` and `#` may only be the last level")),
                "" => return Err(err("empty level")),
                lit => Level::Literal(lit.into()),
            });
        }
        Ok(Self(out))
    }

    fn is_literal(&self) -> bool {
        self.0.iter().all(|l| matches!(l, Level::Literal(_)))
    }

    fn matches(&self, topic: &str) -> bool {
        let mut t = levels(topic);
        for (i, level) in self.0.iter().enumerate() {
            match level {
                Level::Literal(lit) => {
                    if t.next() != Some(&**lit) {
                        return false;
                    }
                }
                Level::One => {
                    if t.next().is_none() {
                        return false;
                    }
                }
                Level::OneOrMore => return t.next().is_some(),
                Level::ZeroOrMore => {
                    debug_assert_eq!(i + 1, self.0.len());
                    return true;
                }
            }
        }
        t.next().is_none()
    }
}

/// Routes topics to targets of type `T`.
#[derive(Clone, Debug)]
pub struct Router<T> {
    exact: HashMap<Box<str>, T>,
    wildcards: Vec<(Pattern, T)>,
    default: Option<T>,
}

impl<T> Default for Router<T> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            wildcards: Vec::new(),
            default: None,
        }
    }
}

impl<T> Router<T> {
    /// An empty router: every topic is `no_route`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a route. A pattern without wildcards is an exact route (the first one added for a
    /// topic wins); wildcard routes are tried in the order added.
    ///
    /// # Errors
    /// [`PatternError`] for an empty pattern, an empty level, or `>`/`#` before the last level.
    pub fn add(&mut self, pattern: &str, target: T) -> Result<(), PatternError> {
        let p = Pattern::parse(pattern)?;
        if p.is_literal() {
            self.exact.entry(pattern.into()).or_insert(target);
        } else {
            self.wildcards.push((p, target));
        }
        Ok(())
    }

    /// Sets the route for topics nothing else matches.
    pub fn set_default(&mut self, target: T) {
        self.default = Some(target);
    }

    /// Where `topic` goes; `None` is `no_route`.
    #[inline]
    pub fn route(&self, topic: &str) -> Option<&T> {
        if let Some(t) = self.exact.get(topic) {
            return Some(t);
        }
        self.wildcards
            .iter()
            .find(|(p, _)| p.matches(topic))
            .map(|(_, t)| t)
            .or(self.default.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router<&'static str> {
        let mut r = Router::new();
        r.add("orders.eu", "exact").unwrap();
        r.add("orders.*", "one").unwrap();
        r.add("metrics/>", "rest").unwrap();
        r.add("sensors/#", "mqtt").unwrap();
        r.add("a.+.c", "plus").unwrap();
        r
    }

    #[test]
    fn exact_beats_wildcards_and_wildcards_go_in_order() {
        let r = router();
        assert_eq!(r.route("orders.eu"), Some(&"exact"));
        assert_eq!(r.route("orders.us"), Some(&"one"));
        assert_eq!(
            r.route("orders/us"),
            Some(&"one"),
            "`/` and `.` both separate levels"
        );
        assert_eq!(r.route("orders.us.west"), None, "`*` is exactly one level");
        assert_eq!(r.route("orders"), None);
        assert_eq!(r.route("a.b.c"), Some(&"plus"));
    }

    #[test]
    fn nats_rest_needs_a_level_mqtt_hash_does_not() {
        let r = router();
        assert_eq!(r.route("metrics/cpu"), Some(&"rest"));
        assert_eq!(r.route("metrics/cpu/core0"), Some(&"rest"));
        assert_eq!(
            r.route("metrics"),
            None,
            "`>` needs at least one more level"
        );
        assert_eq!(
            r.route("sensors"),
            Some(&"mqtt"),
            "`#` matches the parent too"
        );
        assert_eq!(r.route("sensors/t/1"), Some(&"mqtt"));
    }

    #[test]
    fn default_catches_the_rest_and_none_means_no_route() {
        let mut r = router();
        assert_eq!(r.route("unknown"), None);
        r.set_default("dflt");
        assert_eq!(r.route("unknown"), Some(&"dflt"));
        assert_eq!(r.route(""), Some(&"dflt"));
    }

    #[test]
    fn bad_patterns_are_errors() {
        let mut r: Router<()> = Router::new();
        for p in ["", "a..b", "a.>.b", "#.a", "a/"] {
            assert!(r.add(p, ()).is_err(), "{p:?}");
        }
        assert_eq!(
            r.add("a.>.b", ()).unwrap_err().to_string(),
            "route pattern \"a.>.b\": `>` and `#` may only be the last level"
        );
    }
}
