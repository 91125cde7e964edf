//! depro: a deployment manager for fleets that run Consul.
//!
//! `agent` runs on every host and makes it follow a KV tree; the other
//! commands drive that tree for operators. The README's "How the code is
//! laid out" maps the modules; docs/protocol.md is the tree's contract.

mod agent;
mod artifact;
mod cli;
mod commands;
mod completion;
mod config;
mod consul;
mod cursor;
mod doorbell;
mod duration;
mod error;
mod fan_out;
mod flags;
mod help;
mod hook_output;
mod hooks;
mod local_state;
mod logging;
mod metrics;
mod pacing;
mod peer;
mod plan;
mod signals;
mod signing;
mod tree;
mod version_name;

use cli::Command;
use error::{Error, Result};

fn main() {
    // The agent's own helper process, not a command (see `artifact`).
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == artifact::FETCH_COMMAND)
    {
        std::process::exit(artifact::fetch_main());
    }
    let result = cli::parse(std::env::args_os().skip(1)).and_then(run);
    if let Err(err) = result {
        eprintln!("depro: {err}");
        std::process::exit(err.exit_code() as i32);
    }
}

fn run(command: Command) -> Result<()> {
    let env = &config::process_env;
    match command {
        Command::Help(topic) => help::text(topic.as_deref()).map(|text| print!("{text}")),
        Command::Missing => {
            eprint!("{}", help::text(None)?);
            Err(Error::Usage(
                "no command given: name one of the commands above (`depro help` lists them)".into(),
            ))
        }
        Command::Version => {
            println!("{}", help::version());
            Ok(())
        }
        Command::Agent(args) => agent::run(args),
        Command::Deploy(args) => commands::deploy(args, env),
        Command::Rollout(args) => commands::rollout(args, env),
        Command::Rollback(args) => commands::rollback(args, env),
        Command::Restart(args) => commands::restart(args, env),
        Command::Remove(args) => commands::remove(args, env),
        Command::Prune(args) => commands::prune(args, env),
        Command::Status(args) => commands::status(args, env),
        Command::Events(args) => commands::events(args, env),
        Command::History(args) => commands::history(args, env),
        Command::Policy(args) => commands::policy(args, env),
        Command::Pause(args) => commands::pause(args, env),
        Command::Resume(args) => commands::resume(args, env, None),
        Command::Promote(args, version) => commands::resume(args, env, Some(version)),
        Command::Forget(args, node) => commands::forget(args, env, &node),
        Command::Keygen(file) => {
            let comment = commands::user_at_host(env);
            let public = signing::keygen(&file, &comment).map_err(Error::Refused)?;
            println!(
                "wrote {} (the private key, mode 0600: keep it where deploys are signed) and {} \
                 (the public key: add its line to \"trusted_keys\" of each deployment)",
                file.display(),
                public.display()
            );
            Ok(())
        }
        Command::Wait(args) => commands::wait(args, env),
        Command::Completion(shell) => {
            print!("{}", completion::script(shell));
            Ok(())
        }
    }
}
