//! `cargo xtask microbench`: ours beside the best public crate for each job, measured in the
//! same run, repeated, and reported as ratios (PERF.md).
//!
//! Each run is one `cargo bench -p eventstream-benches`; after it, criterion's
//! `target/criterion/<group>/<function>/<value>/new/{benchmark,estimates}.json` give the median
//! time per iteration of every row. Within a group and value, every peer is compared with the
//! row named `ours` (or `ours_*`): ratio = peer time / our time, so above 1 means ours is faster.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::run;

#[derive(clap::Args)]
pub struct Args {
    /// Whole-suite repetitions.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Shorter warm-up and measurement (for a smoke run, not for the README).
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON summary.
    #[arg(long, default_value = "target/bench/microbench.json")]
    json: PathBuf,
    /// Where to write the Markdown table.
    #[arg(long, default_value = "target/bench/microbench.md")]
    markdown: PathBuf,
    /// Replace the table between the README's microbench markers.
    #[arg(long)]
    update_readme: bool,
    /// Only benches whose name matches this criterion filter.
    #[arg(long)]
    filter: Option<String>,
}

/// One measured row of one run.
#[derive(Clone, Debug)]
struct Row {
    group: String,
    function: String,
    value: String,
    /// Median nanoseconds per unit of throughput (per item, or per byte for the parser).
    ns_per_unit: f64,
    /// "item" or "byte".
    unit: &'static str,
    /// Units per iteration, for converting back (parser: bytes per datagram).
    units: f64,
}

pub fn main(root: &Path, args: &Args) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let criterion_dir = root.join("target/criterion");
    let mut runs: Vec<Vec<Row>> = Vec::new();
    for i in 1..=args.runs {
        eprintln!("microbench: run {i} of {}", args.runs);
        if criterion_dir.exists() {
            std::fs::remove_dir_all(&criterion_dir)?;
        }
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root)
            .args(["bench", "-p", "eventstream-benches", "--"]);
        if let Some(f) = &args.filter {
            cmd.arg(f);
        }
        if args.quick {
            cmd.env("EVENTSTREAM_BENCH_QUICK", "1");
        }
        run(&mut cmd)?;
        runs.push(collect(&criterion_dir)?);
    }
    let summary = summarize(&runs);
    let meta = machine();
    let doc = json!({ "machine": meta, "runs": args.runs, "quick": args.quick, "rows": summary });
    for p in [&args.json, &args.markdown] {
        if let Some(dir) = root.join(p).parent() {
            std::fs::create_dir_all(dir)?;
        }
    }
    std::fs::write(
        root.join(&args.json),
        serde_json::to_string_pretty(&doc)? + "\n",
    )?;
    let table = markdown(&doc);
    std::fs::write(root.join(&args.markdown), &table)?;
    if args.update_readme {
        update_readme(&root.join("README.md"), &table)?;
    }
    print!("{table}");
    Ok(())
}

fn read_json(p: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

/// Every `new/benchmark.json` under criterion's output directory.
fn collect(dir: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n == "new") {
                    rows.push(row(&path)?);
                } else if path
                    .file_name()
                    .is_some_and(|n| n != "report" && n != "base")
                {
                    stack.push(path);
                }
            }
        }
    }
    rows.sort_by(|a, b| (&a.group, &a.value, &a.function).cmp(&(&b.group, &b.value, &b.function)));
    Ok(rows)
}

fn row(new_dir: &Path) -> Result<Row> {
    let b = read_json(&new_dir.join("benchmark.json"))?;
    let e = read_json(&new_dir.join("estimates.json"))?;
    let median = e["median"]["point_estimate"]
        .as_f64()
        .context("estimates.json has no median")?;
    let (unit, units) = match &b["throughput"] {
        Value::Object(m) if m.contains_key("Bytes") => ("byte", m["Bytes"].as_f64().unwrap_or(1.0)),
        Value::Object(m) if m.contains_key("Elements") => {
            ("item", m["Elements"].as_f64().unwrap_or(1.0))
        }
        _ => ("iter", 1.0),
    };
    let s = |k: &str| b[k].as_str().unwrap_or_default().to_owned();
    Ok(Row {
        group: s("group_id"),
        function: s("function_id"),
        value: s("value_str"),
        ns_per_unit: median / units,
        unit,
        units,
    })
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Per row: median/min/max time over runs; per peer row: the ratio to ours in each run.
fn summarize(runs: &[Vec<Row>]) -> Vec<Value> {
    let mut by_key: BTreeMap<(String, String, String), Vec<Row>> = BTreeMap::new();
    for run in runs {
        for r in run {
            by_key
                .entry((r.group.clone(), r.value.clone(), r.function.clone()))
                .or_default()
                .push(r.clone());
        }
    }
    // A peer is compared with `ours`, or where a group has several `ours_*` rows (the parser's
    // spans and frames), with the slower of them, so the ratio never flatters us.
    let ours_of = |group: &str, value: &str, run: &[Row]| -> Option<f64> {
        run.iter()
            .filter(|r| r.group == group && r.value == value && r.function.starts_with("ours"))
            .map(|r| r.ns_per_unit)
            .reduce(f64::max)
    };
    let mut out = Vec::new();
    for ((group, value, function), rows) in &by_key {
        let mut t: Vec<f64> = rows.iter().map(|r| r.ns_per_unit).collect();
        let first = &rows[0];
        let mut ratios = Vec::new();
        if !function.starts_with("ours") {
            for run in runs {
                let peer = run
                    .iter()
                    .find(|r| &r.group == group && &r.value == value && &r.function == function);
                if let (Some(peer), Some(ours)) = (peer, ours_of(group, value, run)) {
                    ratios.push(peer.ns_per_unit / ours);
                }
            }
        }
        let min = t.iter().copied().fold(f64::INFINITY, f64::min);
        let max = t.iter().copied().fold(0.0, f64::max);
        out.push(json!({
            "group": group, "value": value, "function": function,
            "unit": first.unit, "units_per_iter": first.units,
            "ns_per_unit": { "median": median(&mut t), "min": min, "max": max },
            "ratio_peer_over_ours": ratios,
            "best_ratio": ratios.iter().copied().fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r)))),
        }));
    }
    out
}

pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let out = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    json!({
        "date": out("date", &["-u", "+%Y-%m-%d"]),
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": out("uname", &["-r"]),
        "rustc": out("rustc", &["--version"]),
    })
}

fn markdown(doc: &Value) -> String {
    let m = &doc["machine"];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Measured {} on {} ({} cores), kernel {}, {}; {} whole runs{}. Times are medians over runs \
         (min–max); ratio = peer time / our time per run, above 1 means ours is faster.\n",
        m["date"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["kernel"].as_str().unwrap_or("?"),
        m["rustc"].as_str().unwrap_or("?"),
        doc["runs"],
        if doc["quick"].as_bool() == Some(true) {
            " (quick settings)"
        } else {
            ""
        },
    );
    let _ = writeln!(
        s,
        "| bench | case | impl | time per unit | ratio per run | best |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for r in doc["rows"].as_array().into_iter().flatten() {
        let t = &r["ns_per_unit"];
        let (scale, unit) = if r["unit"] == "byte" {
            // Report the parser per datagram, and as MB/s.
            (r["units_per_iter"].as_f64().unwrap_or(1.0), "datagram")
        } else {
            (1.0, r["unit"].as_str().unwrap_or("item"))
        };
        let f = |k: &str| t[k].as_f64().unwrap_or(f64::NAN) * scale;
        let mut time = format!(
            "{:.2} ns/{unit} ({:.2}–{:.2})",
            f("median"),
            f("min"),
            f("max")
        );
        if r["unit"] == "byte" {
            let mbps = 1e3 / t["median"].as_f64().unwrap_or(f64::NAN);
            let _ = write!(time, ", {mbps:.0} MB/s");
        }
        let ratios: Vec<String> = r["ratio_peer_over_ours"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_f64)
            .map(|x| format!("{x:.2}"))
            .collect();
        let best = r["best_ratio"]
            .as_f64()
            .map_or_else(|| "—".to_owned(), |b| format!("{b:.2}"));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            r["group"].as_str().unwrap_or(""),
            r["value"].as_str().unwrap_or(""),
            r["function"].as_str().unwrap_or(""),
            time,
            if ratios.is_empty() {
                "(ours)".to_owned()
            } else {
                ratios.join(", ")
            },
            if ratios.is_empty() { "" } else { &best },
        );
    }
    s
}

const START: &str = "<!-- microbench:start -->";
const END: &str = "<!-- microbench:end -->";

fn update_readme(path: &Path, table: &str) -> Result<()> {
    replace_between(path, START, END, table)
}

/// Replaces what lies between the `start` and `end` markers of the file at `path`.
pub fn replace_between(path: &Path, start: &str, end: &str, table: &str) -> Result<()> {
    let text = std::fs::read_to_string(path)?;
    let (Some(a), Some(b)) = (text.find(start), text.find(end)) else {
        bail!("{} has no {start} ... {end} markers", path.display());
    };
    let new = format!("{}{start}\n{table}{}", &text[..a], &text[b..]);
    std::fs::write(path, new)?;
    Ok(())
}
