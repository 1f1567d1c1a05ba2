//! The commands the control socket answers.

use serde_json::{json, Map, Value};

use super::{error, Context};
use crate::device::stats::{Kind, Snapshot};
use crate::device::{AioMode, CryptoMode};
use cryptblk_units::ByteSize;

/// Answers one request line.
pub(crate) fn execute(ctx: &Context, line: &[u8]) -> Value {
    let request: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return error(
                "GenericError",
                &format!("not JSON ({e}); send {{\"execute\": \"query-status\"}}"),
            )
        }
    };
    let Some(name) = request.get("execute").and_then(Value::as_str) else {
        return error(
            "GenericError",
            "a request is an object with \"execute\": \"COMMAND\" (and optional \"arguments\")",
        );
    };
    let arguments = match request.get("arguments") {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return error("GenericError", "\"arguments\" must be an object"),
    };
    if let Some(extra) = arguments.keys().next() {
        if matches!(name, "query-status" | "query-stats") {
            return error(
                "GenericError",
                &format!("{name} takes no arguments (got \"{extra}\")"),
            );
        }
    }
    match name {
        "query-status" => json!({ "return": status(ctx) }),
        "query-stats" => json!({ "return": stats(ctx) }),
        "resize" => resize(ctx, &arguments),
        _ => error(
            "CommandNotFound",
            &format!("unknown command \"{name}\"; known: query-status, query-stats, resize"),
        ),
    }
}

/// `resize`: grows the disk to `size` bytes (an integer, or a string such
/// as "20G"); without `size`, a block device grows to what it now holds.
fn resize(ctx: &Context, arguments: &Map<String, Value>) -> Value {
    if let Some(other) = arguments.keys().find(|k| *k != "size") {
        return error(
            "GenericError",
            &format!("resize takes only \"size\" (got \"{other}\")"),
        );
    }
    let size = match arguments.get("size") {
        None => None,
        Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
        Some(Value::String(s)) => match s.parse::<ByteSize>() {
            Ok(b) => Some(b.bytes()),
            Err(e) => return error("GenericError", &format!("size: {e}")),
        },
        Some(other) => {
            return error(
                "GenericError",
                &format!("size must be a byte count such as 21474836480 or \"20G\" (got {other})"),
            )
        }
    };
    match ctx.dev.resize(size) {
        Ok((capacity, notified)) => json!({ "return": {
            "capacity": capacity,
            "guest-notified": notified,
        }}),
        Err(e) => error("GenericError", &e.to_string()),
    }
}

fn status(ctx: &Context) -> Value {
    let dev = &ctx.dev;
    let opts = dev.options();
    let volume = dev.volume();
    let (connected, connections, features, peer) = dev.stats().connection();
    let io_path = match (volume.mapped(), opts.aio) {
        (true, _) => "mmap",
        (false, AioMode::IoUring) => "io_uring",
        (false, AioMode::Sync) => "sync",
    };
    let queues: Vec<Value> = dev
        .stats()
        .queues()
        .iter()
        .enumerate()
        .map(|(i, q)| json!({ "index": i, "in-flight": q.snapshot().in_flight }))
        .collect();
    json!({
        "connected": connected,
        "connections": connections,
        "peer": peer.map(|(pid, uid)| json!({ "pid": pid, "uid": uid })),
        "features": format!("{features:#x}"),
        "num-queues": opts.queues,
        "queue-size": opts.queue_size,
        "queues": queues,
        "crypto": match opts.crypto {
            CryptoMode::Inline => "inline",
            CryptoMode::Workers => "workers",
        },
        "workers": if opts.crypto == CryptoMode::Workers { opts.workers } else { 0 },
        "io": io_path,
        "direct": volume.direct(),
        "image": ctx.image.display().to_string(),
        "capacity": volume.capacity_bytes(),
        "block-size": volume.sector_size(),
        "read-only": opts.readonly,
        "uptime": dev.stats().uptime().as_secs_f64(),
    })
}

fn stats(ctx: &Context) -> Value {
    let (per_queue, total) = ctx.dev.stats().snapshot();
    json!({
        "uptime": ctx.dev.stats().uptime().as_secs_f64(),
        "total": snapshot_json(&total),
        "queues": per_queue.iter().map(snapshot_json).collect::<Vec<_>>(),
    })
}

/// Latency percentiles reported per kind.
pub const PERCENTILES: [(&str, f64); 3] = [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)];

fn snapshot_json(s: &Snapshot) -> Value {
    let mut requests = Map::new();
    let mut latency = Map::new();
    for kind in Kind::ALL {
        requests.insert(kind.name().into(), s.count[kind as usize].into());
        let mut l = Map::new();
        for (name, q) in PERCENTILES {
            l.insert(name.into(), s.percentile(kind, q).into());
        }
        l.insert("sum".into(), s.latency_sum_ns[kind as usize].into());
        let timed: u64 = s.latency[kind as usize].iter().sum();
        l.insert("timed".into(), timed.into());
        latency.insert(kind.name().into(), l.into());
    }
    json!({
        "requests": requests,
        "bytes-read": s.bytes_read,
        "bytes-written": s.bytes_written,
        "errors": { "refused": s.refused, "io": s.io_errors },
        "in-flight": s.in_flight,
        "replayed": s.replayed,
        "latency-ns": latency,
    })
}
