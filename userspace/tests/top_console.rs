//! `eventstream top` drawn into ratatui's test backend from two recorded scrapes of a real
//! appliance on AF_XDP in the netns lab (`tests/data/scrape-{1,2}.prom`, one second apart,
//! the blaster offering 80 000 events/s over four topics, one per datagram, against
//! `xdp.rate_limit.packets_per_sec: 60000`): every panel shows what the scrapes hold.

use eventstream::ops::top::{Scrape, Snapshot, draw};
use ratatui::Terminal;
use ratatui::backend::TestBackend;

fn screen(s: &Snapshot<'_>) -> String {
    let mut t = Terminal::new(TestBackend::new(150, 44)).unwrap();
    t.draw(|f| draw(f, s)).unwrap();
    let buf = t.backend().buffer();
    let w = buf.area.width as usize;
    buf.content
        .chunks(w)
        .map(|row| row.iter().map(|c| c.symbol()).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_recorded_scrape_renders_every_panel() {
    let first = Scrape::parse(include_str!("data/scrape-1.prom"));
    let second = Scrape::parse(include_str!("data/scrape-2.prom"));
    let text = screen(&Snapshot {
        now: &second,
        before: Some((&first, 1.0)),
        from: "127.0.0.1:18090",
    });
    for want in [
        "RUNNING",
        "ingest queue",
        "received",
        "xsk",
        "delivered",
        "memory/realtime",
        "memory/transactional",
        "memory/batch",
        "XDP verdicts",
        "redirect",
        "drop_rate_limited",
        "latency",
        "→routed",
        "realtime",
        "p50",
        "p99",
        "p99.9",
        "max",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    // The xsk receive rate is the difference between the scrapes over the second between them.
    let key = "eventstream_received_events_total{source=\"xsk\"}";
    let rate = second.get(key).unwrap() - first.get(key).unwrap();
    assert!(rate > 10_000.0, "the recording was taken under load");
    let shown = format!("{:.1}k", rate / 1e3);
    assert!(text.contains(&shown), "{shown} missing from:\n{text}");

    // The first frame, before any rate can be known, still draws.
    let first_frame = screen(&Snapshot {
        now: &first,
        before: None,
        from: "127.0.0.1:18090",
    });
    assert!(
        first_frame.contains("RUNNING") && first_frame.contains(" - "),
        "{first_frame}"
    );
}

#[test]
fn grafana_dashboard_queries_only_exported_metrics() {
    let dash: serde_json::Value =
        serde_json::from_str(include_str!("../../config/grafana-dashboard.json")).unwrap();
    // Every family the appliance can export, from the one table `/metrics` renders.
    let table = eventstream::ops::admin::every_family();
    let families: std::collections::HashSet<&str> = table.families.iter().map(|f| f.name).collect();
    let mut exprs = Vec::new();
    fn walk<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(e) = m.get("expr").and_then(|e| e.as_str()) {
                    out.push(e);
                }
                m.values().for_each(|x| walk(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&dash, &mut exprs);
    assert!(
        exprs.len() >= 10,
        "a dashboard worth the name: {}",
        exprs.len()
    );
    for e in exprs {
        let mut rest = e;
        let mut named = 0;
        while let Some(at) = rest.find("eventstream_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            assert!(
                families.contains(name) || families.contains(base),
                "{name} in {e:?} is not exported"
            );
            named += 1;
            rest = &tail[end..];
        }
        assert!(named > 0, "{e:?} names no metric of ours");
    }
}

#[test]
fn the_readme_lists_every_exported_family_and_no_other() {
    let readme = include_str!("../../README.md");
    // The README's metric list: the table under "### Metrics".
    let start = readme.find("\n### Metrics\n").expect("a Metrics section");
    let section = &readme[start + 1..];
    let section = &section[..section[4..].find("\n#").map_or(section.len(), |e| e + 4)];
    let listed: std::collections::HashSet<&str> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .collect();
    let table = eventstream::ops::admin::every_family();
    let exported: std::collections::HashSet<&str> = table.families.iter().map(|f| f.name).collect();
    let mut missing: Vec<_> = exported.difference(&listed).collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "exported, not in the README: {missing:?}"
    );
    let mut stale: Vec<_> = listed.difference(&exported).collect();
    stale.sort();
    assert!(stale.is_empty(), "in the README, not exported: {stale:?}");
}

#[test]
fn every_family_follows_the_naming_conventions() {
    use eventstream::ops::metrics::{Kind, Value};
    let table = eventstream::ops::admin::every_family();
    let mut series = std::collections::HashSet::new();
    for f in &table.families {
        assert!(f.name.starts_with("eventstream_"), "{}", f.name);
        match f.kind {
            Kind::Counter => assert!(f.name.ends_with("_total"), "{}", f.name),
            Kind::Histogram => assert!(f.name.ends_with("_seconds"), "{}: base unit", f.name),
            Kind::Gauge => assert!(!f.name.ends_with("_total"), "{}", f.name),
        }
        assert!(
            !f.name.contains("_ms") && !f.name.contains("_us") && !f.name.contains("millis"),
            "{}: base units only",
            f.name
        );
        for s in &f.samples {
            assert!(
                series.insert((f.name, s.labels.clone())),
                "{} twice",
                f.name
            );
            assert_eq!(matches!(s.value, Value::Hist(_)), f.kind == Kind::Histogram);
            for (k, _) in &s.labels {
                assert_ne!(*k, "topic", "{}: no per-topic labels", f.name);
            }
        }
    }
    // Protocol rejections are errors with an error_type; discards say they are intentional;
    // a DLQ event is not also delivered.
    let labels = |name: &str| -> Vec<&'static str> {
        table.get(name).unwrap().samples[0]
            .labels
            .iter()
            .map(|(k, _)| *k)
            .collect()
    };
    assert!(labels("eventstream_protocol_errors_total").contains(&"error_type"));
    assert!(labels("eventstream_discarded_events_total").contains(&"intentional"));
    assert!(labels("eventstream_sink_errors_total").contains(&"error_type"));
    assert!(
        table
            .get("eventstream_delivered_events_total")
            .unwrap()
            .samples
            .iter()
            .all(|s| s.labels.iter().all(|(_, v)| v != "dlq"))
    );
    for needed in [
        "eventstream_build_info",
        "eventstream_uptime_seconds",
        "eventstream_stage_latency_seconds",
    ] {
        assert!(table.get(needed).is_some(), "{needed}");
    }
}
