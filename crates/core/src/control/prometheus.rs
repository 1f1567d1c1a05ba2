//! `query-stats` as the Prometheus text exposition format (for node
//! exporter's textfile collector or any scraper that reads a file).

use std::fmt::Write;

use serde_json::Value;

use super::commands::PERCENTILES;
use crate::device::stats::Kind;

/// Renders a `query-stats` return value.
pub fn render(stats: &Value) -> String {
    let mut out = String::new();
    let queues = stats["queues"].as_array().cloned().unwrap_or_default();
    let counter =
        |out: &mut String, name: &str, help: &str, get: &dyn Fn(&Value) -> Vec<(String, u64)>| {
            let _ = writeln!(out, "# HELP cryptblk_{name} {help}");
            let _ = writeln!(out, "# TYPE cryptblk_{name} counter");
            for (i, q) in queues.iter().enumerate() {
                for (labels, v) in get(q) {
                    let _ = writeln!(out, "cryptblk_{name}{{queue=\"{i}\"{labels}}} {v}");
                }
            }
        };
    counter(
        &mut out,
        "requests_total",
        "Requests completed, by kind.",
        &|q| {
            Kind::ALL
                .iter()
                .map(|k| {
                    (
                        format!(",kind=\"{}\"", k.name()),
                        num(&q["requests"][k.name()]),
                    )
                })
                .collect()
        },
    );
    counter(
        &mut out,
        "read_bytes_total",
        "Bytes read by the guest.",
        &|q| vec![(String::new(), num(&q["bytes-read"]))],
    );
    counter(
        &mut out,
        "written_bytes_total",
        "Bytes written by the guest.",
        &|q| vec![(String::new(), num(&q["bytes-written"]))],
    );
    counter(
        &mut out,
        "errors_total",
        "Requests that failed: refused (invalid guest request) or io (the image failed).",
        &|q| {
            ["refused", "io"]
                .iter()
                .map(|k| (format!(",kind=\"{k}\""), num(&q["errors"][*k])))
                .collect()
        },
    );
    counter(
        &mut out,
        "replayed_total",
        "Requests a previous daemon left in flight, run again.",
        &|q| vec![(String::new(), num(&q["replayed"]))],
    );
    let _ = writeln!(
        out,
        "# HELP cryptblk_in_flight Requests popped and not yet completed."
    );
    let _ = writeln!(out, "# TYPE cryptblk_in_flight gauge");
    for (i, q) in queues.iter().enumerate() {
        let _ = writeln!(
            out,
            "cryptblk_in_flight{{queue=\"{i}\"}} {}",
            num(&q["in-flight"])
        );
    }
    latency(&mut out, &stats["total"]);
    out
}

/// The latency summary of all queues together (quantiles do not add up).
fn latency(out: &mut String, total: &Value) {
    let name = "cryptblk_request_latency_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time from pop to completion, all queues."
    );
    let _ = writeln!(out, "# TYPE {name} summary");
    for kind in Kind::ALL {
        let k = kind.name();
        let l = &total["latency-ns"][k];
        for (p, q) in PERCENTILES {
            if let Some(ns) = l[p].as_u64() {
                let _ = writeln!(
                    out,
                    "{name}{{kind=\"{k}\",quantile=\"{q}\"}} {}",
                    seconds(ns)
                );
            }
        }
        let _ = writeln!(
            out,
            "{name}_sum{{kind=\"{k}\"}} {}",
            seconds(num(&l["sum"]))
        );
        let _ = writeln!(out, "{name}_count{{kind=\"{k}\"}} {}", num(&l["timed"]));
    }
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}
