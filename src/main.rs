use clap::{Parser, Subcommand};

/// cryptblk: a vhost-user-blk daemon that gives guests a plain disk and
/// stores only dm-crypt compatible AES-XTS ciphertext.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

fn main() {
    let _cli = Cli::parse();
}
