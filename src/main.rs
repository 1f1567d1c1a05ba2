use clap::{Parser, Subcommand};

use cryptblk::luks::cli as luks_cli;

/// cryptblk: a vhost-user-blk daemon that gives guests a plain disk and
/// stores only dm-crypt compatible AES-XTS ciphertext.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a LUKS1, LUKS2 or plain dm-crypt image (cryptsetup luksFormat).
    Format(luks_cli::FormatArgs),
    /// Add, remove or change LUKS passphrases.
    Key(luks_cli::KeyArgs),
    /// Show a LUKS header (never a secret).
    Dump(luks_cli::DumpArgs),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Format(a) => luks_cli::run_format(a),
        Command::Key(a) => luks_cli::run_key(a),
        Command::Dump(a) => luks_cli::run_dump(a),
    };
    if let Err(e) = result {
        eprintln!("cryptblk: {e}");
        std::process::exit(1);
    }
}
