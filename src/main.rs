//! depro: a deployment manager for fleets that run Consul.
//!
//! `agent` runs on every host and makes it follow a KV tree; the other
//! commands drive that tree for operators. See docs/architecture in the
//! README for the map of modules.

mod agent;
mod cli;
mod config;
mod consul;
mod duration;
mod error;
mod help;
mod hooks;
mod local_state;
mod logging;
mod pacing;
mod plan;
mod session;
mod signals;
mod tree;
mod version_name;
mod watch;

use cli::Command;
use error::{Error, Result};

fn main() {
    let result = cli::parse(std::env::args_os().skip(1)).and_then(run);
    if let Err(err) = result {
        eprintln!("depro: {err}");
        std::process::exit(err.exit_code() as i32);
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Help(topic) => Ok(print!("{}", help::text(topic.as_deref())?)),
        Command::Version => Ok(println!("{}", help::version())),
        Command::Agent(args) => agent::run(args),
        _ => Err(Error::Usage("this command is not implemented yet".into())),
    }
}
