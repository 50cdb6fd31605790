//! The `ringside` binary: parse flags, run, print one-line errors, exit 64 for bad usage or
//! config and 1 for runtime failures.

use std::process::ExitCode;

use clap::Parser;
use ringside::admin::{self, Role};
use ringside::cli::{Cli, Command, IptablesArgs};
use ringside::config::Config;
use ringside::{capture, demo, envoy_cli, worker};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if envoy_cli::is_envoy_command_line(&args) {
        return envoy(&args);
    }
    let cli = Cli::try_parse();
    // The demo prints its own story; proxy logs would interleave with it.
    let level = if matches!(&cli, Ok(Cli { command: Command::Demo(_) })) { "warn" } else { "info" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_target(false)
        .init();
    let cli = match cli {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                out(format_args!("{e}"));
                return ExitCode::SUCCESS;
            }
            let text = e.to_string();
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let first = lines.next().unwrap_or("bad usage").trim_start_matches("error: ");
            // "the following required arguments were not provided:" names them on the next line.
            match lines.next().filter(|_| first.ends_with(':')) {
                Some(what) => eprintln!("ringside: {first} {what}"),
                None => eprintln!("ringside: {first}"),
            }
            return ExitCode::from(EX_USAGE);
        }
    };
    match cli.command {
        Command::Validate(args) => match args.into_config() {
            // The certificate files are part of the config: load them as `run` would.
            Ok(cfg) => match ringside::tls::Certs::load(&cfg) {
                Ok(_) => {
                    out(format_args!("ringside: config ok\n"));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ringside: tls: {e}");
                    ExitCode::from(EX_USAGE)
                }
            },
            Err(e) => usage(e),
        },
        Command::Run(args) => match args.into_config() {
            Ok(cfg) => run(cfg),
            Err(e) => usage(e),
        },
        Command::Iptables(args) => iptables(&args),
        Command::Demo(args) => match demo::run(args.connections) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ringside: demo: {e:#}");
                ExitCode::from(1)
            }
        },
    }
}

/// `ringside` with Envoy's options, as Istio's pilot-agent starts it (SPEC §10).
fn envoy(args: &[String]) -> ExitCode {
    let options = envoy_cli::parse(args);
    let level = options.as_ref().ok().and_then(|o| o.log_level).unwrap_or("info");
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_target(false)
        .init();
    let options = match options {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ringside: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let cfg = match ringside::cli::envoy_config(&options) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    match options.mode {
        envoy_cli::Mode::Serve => run(cfg),
        envoy_cli::Mode::Validate | envoy_cli::Mode::InitOnly => {
            out(format_args!("ringside: bootstrap ok\n"));
            ExitCode::SUCCESS
        }
    }
}

/// `ringside iptables`: the rules are the same for all three actions, so `--print` shows
/// exactly what `--apply` adds.
fn iptables(args: &IptablesArgs) -> ExitCode {
    let options = args.options();
    let result = if args.print {
        capture::iptables::rules(&options).iter().for_each(|r| out(format_args!("{r}\n")));
        Ok(())
    } else if args.apply {
        capture::iptables::apply(&options).map(|n| log::info!("iptables: {n} rules added"))
    } else {
        capture::iptables::clean(options.ipv6).map(|()| log::info!("iptables: capture rules removed"))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringside: iptables: {e}");
            ExitCode::from(1)
        }
    }
}

/// Print to stdout. A reader that stopped reading (`ringside --help | head -1`) is not an
/// error of ours: `print!` would panic on the broken pipe (Rust ignores SIGPIPE).
fn out(text: std::fmt::Arguments) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_fmt(text);
}

fn usage(e: ringside::config::Error) -> ExitCode {
    eprintln!("ringside: config: {e}");
    ExitCode::from(EX_USAGE)
}

fn run(cfg: Config) -> ExitCode {
    match serve(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringside: {e:#}");
            // A certificate file that does not load is bad config, like a bad key (SPEC §4).
            match e.downcast_ref::<worker::Error>() {
                Some(worker::Error::Tls(_)) => ExitCode::from(EX_USAGE),
                _ => ExitCode::from(1),
            }
        }
    }
}

fn serve(cfg: Config) -> anyhow::Result<()> {
    if let Some((level, note)) = capture::startup_note(&cfg.listeners) {
        log::log!(level, "{note}");
    }
    let proxy = worker::start(cfg)?;
    let shared = proxy.shared.clone();
    let c = &shared.config;
    for (role, bind) in
        [(Role::Admin, c.admin.listen), (Role::Metrics, c.metrics.listen), (Role::Health, c.health.listen)]
    {
        if let Some(addr) = bind.0 {
            let bound = admin::spawn(role, addr, shared.clone()).map_err(|e| {
                anyhow::anyhow!("{} listener: bind {addr}: {e}", format!("{role:?}").to_lowercase())
            })?;
            log::info!("{} listener on {bound}", format!("{role:?}").to_lowercase());
        }
    }
    if let Some(status) = shared.xds.clone() {
        let publisher = shared.clone();
        let apply: ringside::xds::Apply = Box::new(move |cfg| publisher.publish_checked(cfg));
        ringside::xds::spawn((*shared.config).clone(), apply, status)?;
    }
    let mut signals =
        signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])?;
    let on_signal = shared.clone();
    std::thread::Builder::new().name("ringside-signals".into()).spawn(move || {
        if let Some(sig) = signals.forever().next() {
            log::info!("signal {sig}: draining for {}", on_signal.config.drain_timeout);
            on_signal.terminate();
        }
    })?;
    proxy.join();
    log::info!("drained; exiting");
    Ok(())
}
