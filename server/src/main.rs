//! The `ballast` binary: the registry server and the offline admin tools.

use clap::Parser;

/// Ballast: an OCI container registry with its own storage engine.
#[derive(Parser)]
#[command(name = "ballast", version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
