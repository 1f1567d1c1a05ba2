use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use cryptblk::config::{ServeArgs, ServeConfig};
use cryptblk::daemon;
use cryptblk::device::BlkDevice;
use cryptblk::luks::cli as luks_cli;
use cryptblk::notify::Notifier;
use cryptblk::{capabilities, secrets, socket};

/// cryptblk: a vhost-user-blk daemon that gives guests a plain disk and
/// stores only dm-crypt compatible AES-XTS ciphertext.
///
/// Without a subcommand it serves, as `cryptblk serve` does, so that it can
/// be started the way the vhost-user backend program conventions say
/// (`cryptblk --socket-path=PATH --blk-file=IMAGE [--read-only] ...`).
#[derive(Parser)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// Print the vhost-user backend capabilities as JSON (QEMU's
    /// docs/interop/vhost-user.json) and exit; other arguments are ignored.
    #[arg(long)]
    print_capabilities: bool,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(
        flatten,
        next_help_heading = "Serving without a subcommand (as `cryptblk serve`)"
    )]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve an encrypted image to a VMM as a vhost-user-blk device.
    // Boxed: the other variants need not be as large as every serve option.
    Serve(Box<ServeArgs>),
    /// Load-test a vhost-user-blk socket (fio-like).
    Bench(cryptblk::bench::BenchArgs),
    /// First run, no VM needed: make an encrypted image, serve it, benchmark and verify it.
    Demo(cryptblk::demo::DemoArgs),
    /// Create a LUKS1, LUKS2 or plain dm-crypt image (cryptsetup luksFormat).
    Format(luks_cli::FormatArgs),
    /// Add, remove or change LUKS passphrases.
    Key(luks_cli::KeyArgs),
    /// Show a LUKS header (never a secret).
    Dump(luks_cli::DumpArgs),
    /// Ask a running daemon's control socket (--control): status, stats.
    Ctl(cryptblk::control::client::CtlArgs),
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if capabilities::requested(&args) {
        println!("{}", capabilities::document());
        return ExitCode::SUCCESS;
    }
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The options serve was given, for --config's merge: the subcommand's,
    // or the top level's when serving without a subcommand.
    let serve_matches = matches.subcommand_matches("serve").unwrap_or(&matches);
    let command = match cli.command {
        Some(command) => command,
        // A bare `cryptblk` prints the usage rather than complaining that
        // --socket is missing.
        None if args.is_empty() => {
            eprintln!("{}", Cli::command().render_usage());
            eprintln!("For more information, try '--help'.");
            return ExitCode::from(2);
        }
        None => Command::Serve(Box::new(cli.serve)),
    };
    let result = match command {
        Command::Serve(args) => serve(*args, serve_matches),
        Command::Bench(args) => std::process::exit(cryptblk::bench::cli::main(args)),
        Command::Demo(args) => cryptblk::demo::run(&args).map_err(Into::into),
        Command::Format(a) => {
            secrets::forbid_core_dumps();
            luks_command(&a.image, &a.storage, || luks_cli::run_format(&a))
        }
        Command::Key(a) => {
            secrets::forbid_core_dumps();
            let op = a.op();
            luks_command(&op.image, &op.storage, || luks_cli::run_key(&a))
        }
        Command::Dump(a) => luks_command(&a.image, &a.storage, || luks_cli::run_dump(&a)),
        Command::Ctl(a) => cryptblk::control::client::run(&a).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cryptblk: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: Option<&str>) {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if let Some(level) = level {
        b.parse_filters(level);
    }
    let _ = b.try_init();
}

/// Runs `format`, `key` or `dump` on `image`, which may be an NBD URI or
/// an RBD image reached as `storage` says.
fn luks_command(
    image: &std::path::Path,
    storage: &luks_cli::StorageArgs,
    run: impl FnOnce() -> Result<(), cryptblk::luks::LuksError>,
) -> Result<(), Box<dyn std::error::Error>> {
    init_logging(None);
    cryptblk::config::reach_luks_image(image, storage)?;
    run().map_err(Into::into)
}

fn serve(args: ServeArgs, cli: &clap::ArgMatches) -> Result<(), Box<dyn std::error::Error>> {
    // Before the key is read: no core dump or ptrace by others may hold it.
    secrets::forbid_core_dumps();
    let args = args.with_config_file(cli)?;
    init_logging(args.log_level.as_deref());
    // Both read (and remove) environment variables: here, while the
    // process has a single thread.
    let notify = Notifier::from_env();
    let activation = socket::activation_from_env()?;
    let cfg = ServeConfig::from_args_and_activation(args, activation)?;
    let volume = cfg.open_volume()?;
    let dev = BlkDevice::new(volume, cfg.device.clone());
    daemon::serve(
        dev,
        &cfg.listen,
        &cfg.access,
        &cfg.sandbox,
        cfg.control.as_deref(),
        &notify,
    )?;
    Ok(())
}
