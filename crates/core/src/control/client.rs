//! `cryptblk ctl`: asks a running daemon's control socket one command and
//! prints the answer, once or every `--watch` seconds.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::prometheus;

#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The daemon's control socket (its --control).
    #[arg(long, value_name = "PATH")]
    pub control: PathBuf,
    /// status (query-status), stats (query-stats), or any command name.
    pub command: String,
    /// Arguments as a JSON object, e.g. '{"size": 1073741824}'.
    #[arg(long, value_name = "JSON")]
    pub arguments: Option<String>,
    /// json, or prometheus (stats only: the text exposition format).
    #[arg(long, value_enum, default_value = "json")]
    pub format: Format,
    /// Ask again every SECS seconds; with stats in json format, print one
    /// line of rates per interval, as iostat does.
    #[arg(long, value_name = "SECS")]
    pub watch: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Prometheus,
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach the control socket {path}: {source} (is cryptblk running with --control {path}?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("--arguments must be a JSON object: {0}")]
    Arguments(String),
    #[error("the daemon answered {0}")]
    Refused(String),
    #[error("the daemon's answer is not JSON: {0}")]
    Answer(String),
    #[error("--format prometheus needs the stats command")]
    FormatNeedsStats,
    #[error("--watch needs a positive number of seconds")]
    Watch,
}

/// Runs `cryptblk ctl`.
pub fn run(args: &CtlArgs) -> Result<(), CtlError> {
    let name = match args.command.as_str() {
        "status" => "query-status",
        "stats" => "query-stats",
        other => other,
    };
    if args.format == Format::Prometheus && name != "query-stats" {
        return Err(CtlError::FormatNeedsStats);
    }
    let arguments = match &args.arguments {
        None => None,
        Some(text) => Some(
            serde_json::from_str::<Value>(text)
                .ok()
                .filter(Value::is_object)
                .ok_or_else(|| CtlError::Arguments(text.clone()))?,
        ),
    };
    let Some(secs) = args.watch else {
        let answer = execute(&args.control, name, arguments.as_ref())?;
        print!("{}", render(args.format, &answer));
        return Ok(());
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(CtlError::Watch);
    }
    watch(
        args,
        name,
        arguments.as_ref(),
        Duration::from_secs_f64(secs),
    )
}

fn render(format: Format, answer: &Value) -> String {
    match format {
        Format::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(answer).unwrap_or_default()
        ),
        Format::Prometheus => prometheus::render(answer),
    }
}

fn watch(
    args: &CtlArgs,
    name: &str,
    arguments: Option<&Value>,
    every: Duration,
) -> Result<(), CtlError> {
    let rates = name == "query-stats" && args.format == Format::Json;
    let mut last: Option<Value> = None;
    loop {
        let answer = execute(&args.control, name, arguments)?;
        if rates {
            if last.is_none() {
                println!(
                    "{:>10} {:>10} {:>10} {:>10} {:>9} {:>12} {:>12}",
                    "r/s", "w/s", "rMB/s", "wMB/s", "inflight", "r_p99_us", "w_p99_us"
                );
            }
            if let Some(prev) = &last {
                println!("{}", rate_line(prev, &answer, every.as_secs_f64()));
            }
            last = Some(answer);
        } else {
            print!("{}", render(args.format, &answer));
        }
        std::io::stdout().flush()?;
        std::thread::sleep(every);
    }
}

/// One iostat-like line: what changed between two `query-stats` answers.
fn rate_line(prev: &Value, now: &Value, secs: f64) -> String {
    let d = |path: &[&str]| {
        let get = |v: &Value| path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or(0);
        get(&now["total"]).saturating_sub(get(&prev["total"])) as f64 / secs
    };
    let p99 = |k: &str| {
        now["total"]["latency-ns"][k]["p99"]
            .as_u64()
            .map_or("-".into(), |ns| format!("{:.1}", ns as f64 / 1e3))
    };
    format!(
        "{:>10.0} {:>10.0} {:>10.2} {:>10.2} {:>9} {:>12} {:>12}",
        d(&["requests", "read"]),
        d(&["requests", "write"]),
        d(&["bytes-read"]) / 1e6,
        d(&["bytes-written"]) / 1e6,
        now["total"]["in-flight"].as_u64().unwrap_or(0),
        p99("read"),
        p99("write"),
    )
}

/// Sends one command and returns its `return` value.
pub fn execute(control: &Path, name: &str, arguments: Option<&Value>) -> Result<Value, CtlError> {
    let mut stream = UnixStream::connect(control).map_err(|source| CtlError::Connect {
        path: control.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut request = json!({ "execute": name });
    if let Some(a) = arguments {
        request["arguments"] = a.clone();
    }
    let mut line = request.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    let mut answer: Value =
        serde_json::from_str(&answer).map_err(|_| CtlError::Answer(answer.trim().to_string()))?;
    if let Some(e) = answer.get("error") {
        return Err(CtlError::Refused(e.to_string()));
    }
    Ok(answer["return"].take())
}
