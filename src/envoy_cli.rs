//! Envoy's command line, as Istio's pilot-agent passes it (SPEC §10): `ringside` with no
//! subcommand and Envoy's options runs as a sidecar from a bootstrap file. Parsing only, no
//! I/O: every option Envoy has is accepted (those that change nothing for ringside are kept
//! for `/server_info` and otherwise ignored); an option Envoy does not have, or a value it
//! would refuse, is a usage error naming it.

use std::time::Duration;

/// A usage error: one line naming the option and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Error(String);

/// Envoy's `--mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Run (Envoy's default).
    #[default]
    Serve,
    /// Check the bootstrap and exit.
    Validate,
    /// Load the bootstrap, start nothing, and exit.
    InitOnly,
}

/// What ringside takes from Envoy's options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// `-c/--config-path`: the bootstrap file (JSON or YAML).
    pub config_path: Option<String>,
    /// `--config-yaml`: a bootstrap fragment merged over the file.
    pub config_yaml: Option<String>,
    /// `--concurrency`: workers; absent, SPEC §1's default.
    pub concurrency: Option<usize>,
    /// `--drain-time-s`: how long a graceful drain lasts.
    pub drain_time: Option<Duration>,
    /// `-l/--log-level`, as an env_logger filter (`warn` for Envoy's `warning`).
    pub log_level: Option<&'static str>,
    /// `--mode`.
    pub mode: Mode,
    /// The arguments as given, for `/server_info`'s `command_line_options`.
    pub given: Vec<String>,
}

/// How an option takes its value.
#[derive(Clone, Copy)]
enum Takes {
    /// A flag without a value.
    Nothing,
    /// Any value.
    Any,
    /// A non-negative integer.
    Count,
    /// One of these words.
    OneOf(&'static [&'static str]),
}

/// Envoy's log levels (`spdlog`'s names), with the env_logger level each becomes.
const LOG_LEVELS: [(&str, &str); 8] = [
    ("trace", "trace"),
    ("debug", "debug"),
    ("info", "info"),
    ("warning", "warn"),
    ("warn", "warn"),
    ("error", "error"),
    ("critical", "error"),
    ("off", "off"),
];

/// Every option of Envoy's command line (`envoy --help`, 1.3x-1.40), short forms beside.
const OPTIONS: &[(&str, Option<&str>, Takes)] = &[
    ("--config-path", Some("-c"), Takes::Any),
    ("--config-yaml", None, Takes::Any),
    ("--concurrency", None, Takes::Count),
    ("--drain-time-s", None, Takes::Count),
    ("--parent-shutdown-time-s", None, Takes::Count),
    ("--drain-strategy", None, Takes::OneOf(&["gradual", "immediate"])),
    ("--local-address-ip-version", None, Takes::OneOf(&["v4", "v6"])),
    (
        "--log-level",
        Some("-l"),
        Takes::OneOf(&["trace", "debug", "info", "warning", "warn", "error", "critical", "off"]),
    ),
    ("--component-log-level", None, Takes::Any),
    ("--log-format", None, Takes::Any),
    ("--log-path", None, Takes::Any),
    ("--log-format-escaped", None, Takes::Nothing),
    ("--enable-fine-grain-logging", None, Takes::Nothing),
    ("--file-flush-interval-msec", None, Takes::Count),
    ("--file-flush-min-size-kb", None, Takes::Count),
    ("--base-id", None, Takes::Count),
    ("--use-dynamic-base-id", None, Takes::Nothing),
    ("--base-id-path", None, Takes::Any),
    ("--restart-epoch", None, Takes::Count),
    ("--hot-restart-version", None, Takes::Nothing),
    ("--disable-hot-restart", None, Takes::Nothing),
    ("--enable-core-dump", None, Takes::Nothing),
    ("--service-cluster", None, Takes::Any),
    ("--service-node", None, Takes::Any),
    ("--service-zone", None, Takes::Any),
    ("--allow-unknown-static-fields", None, Takes::Nothing),
    ("--reject-unknown-dynamic-fields", None, Takes::Nothing),
    ("--ignore-unknown-dynamic-fields", None, Takes::Nothing),
    ("--skip-deprecated-logs", None, Takes::Nothing),
    ("--disable-extensions", None, Takes::Any),
    ("--cpuset-threads", None, Takes::Nothing),
    ("--enable-mutex-tracing", None, Takes::Nothing),
    ("--socket-path", None, Takes::Any),
    ("--socket-mode", None, Takes::Any),
    ("--stats-tag", None, Takes::Any),
    ("--admin-address-path", None, Takes::Any),
    ("--mode", None, Takes::OneOf(&["serve", "validate", "init_only"])),
];

/// Whether `args` (after the program name) are Envoy's command line rather than one of
/// ringside's subcommands: the first argument is an option other than help and version.
pub fn is_envoy_command_line(args: &[String]) -> bool {
    args.first()
        .is_some_and(|a| a.starts_with('-') && !matches!(a.as_str(), "-h" | "--help" | "-V" | "--version"))
}

/// Parse Envoy's options (`--name value`, `--name=value`, `-c value`).
pub fn parse(args: &[String]) -> Result<Options, Error> {
    let mut o = Options { given: args.to_vec(), ..Options::default() };
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let Some(&(long, _, takes)) = OPTIONS.iter().find(|(l, s, _)| *l == name || *s == Some(name)) else {
            return Err(Error(format!("unknown option {name} (not an Envoy option)")));
        };
        let value = match takes {
            Takes::Nothing if inline.is_some() => {
                return Err(Error(format!("option {long} takes no value")));
            }
            Takes::Nothing => String::new(),
            _ => match inline.or_else(|| rest.next().cloned()) {
                Some(v) => v,
                None => return Err(Error(format!("option {long} needs a value"))),
            },
        };
        match takes {
            Takes::Count if value.parse::<u64>().is_err() => {
                return Err(Error(format!("option {long}: {value:?} is not a non-negative integer")));
            }
            Takes::OneOf(words) if !words.contains(&value.as_str()) => {
                return Err(Error(format!("option {long}: {value:?} is not one of {}", words.join(", "))));
            }
            _ => {}
        }
        match long {
            "--config-path" => o.config_path = Some(value),
            "--config-yaml" => o.config_yaml = Some(value),
            "--concurrency" => o.concurrency = value.parse().ok(),
            "--drain-time-s" => o.drain_time = value.parse().ok().map(Duration::from_secs),
            "--log-level" => o.log_level = LOG_LEVELS.iter().find(|(e, _)| *e == value).map(|(_, l)| *l),
            "--mode" => {
                o.mode = match value.as_str() {
                    "validate" => Mode::Validate,
                    "init_only" => Mode::InitOnly,
                    _ => Mode::Serve,
                }
            }
            "--component-log-level" => check_component_levels(&value)?,
            _ => {} // accepted; changes nothing for ringside (SPEC §10)
        }
    }
    if o.config_path.is_none() && o.config_yaml.is_none() {
        return Err(Error("no bootstrap: give -c FILE or --config-yaml".into()));
    }
    Ok(o)
}

/// `--component-log-level misc:error,upstream:debug`: each level must be one Envoy knows.
fn check_component_levels(value: &str) -> Result<(), Error> {
    for pair in value.split(',') {
        let level = pair.split_once(':').map(|(_, l)| l);
        if !level.is_some_and(|l| LOG_LEVELS.iter().any(|(e, _)| *e == l)) {
            return Err(Error(format!("option --component-log-level: {pair:?} is not COMPONENT:LEVEL")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    /// What pilot-agent passes a default sidecar (Istio's `proxy/envoy.go`).
    const PILOT_AGENT: &str = "-c etc/istio/proxy/envoy-rev.json --drain-time-s 45 --drain-strategy immediate \
        --local-address-ip-version v4 --file-flush-interval-msec 1000 --disable-hot-restart \
        --allow-unknown-static-fields -l warning --component-log-level misc:error \
        --skip-deprecated-logs --concurrency 2";

    #[test]
    fn pilot_agents_command_line_is_accepted_and_read() {
        let o = parse(&args(PILOT_AGENT)).unwrap();
        assert_eq!(o.config_path.as_deref(), Some("etc/istio/proxy/envoy-rev.json"));
        assert_eq!(o.concurrency, Some(2));
        assert_eq!(o.drain_time, Some(Duration::from_secs(45)));
        assert_eq!(o.log_level, Some("warn"));
        assert_eq!(o.mode, Mode::Serve);
        assert_eq!(o.given, args(PILOT_AGENT));
        assert!(is_envoy_command_line(&o.given));
    }

    #[test]
    fn long_short_and_inline_forms_are_the_same_option() {
        for form in [
            "-l debug -c b.yaml",
            "--log-level debug --config-path b.yaml",
            "--log-level=debug --config-path=b.yaml",
        ] {
            let o = parse(&args(form)).unwrap();
            assert_eq!((o.log_level, o.config_path.as_deref()), (Some("debug"), Some("b.yaml")), "{form}");
        }
    }

    #[test]
    fn an_option_envoy_does_not_have_or_a_value_it_would_refuse_is_named() {
        for (line, says) in [
            ("-c b.json --frobnicate", "unknown option --frobnicate"),
            ("-c b.json -l nonsense", "--log-level: \"nonsense\" is not one of"),
            ("-c b.json --concurrency two", "--concurrency: \"two\" is not a non-negative integer"),
            ("-c b.json --drain-strategy slow", "--drain-strategy"),
            ("-c b.json --component-log-level misc", "--component-log-level"),
            ("-c", "--config-path needs a value"),
            ("-c b.json --disable-hot-restart=1", "takes no value"),
            ("--concurrency 2", "no bootstrap"),
        ] {
            let e = parse(&args(line)).unwrap_err().to_string();
            assert!(e.contains(says), "{line}: {e}");
        }
    }

    #[test]
    fn subcommands_help_and_version_are_not_envoy_command_lines() {
        for line in ["run --config x.yaml", "validate --config x", "--version", "-h", ""] {
            assert!(!is_envoy_command_line(&args(line)), "{line}");
        }
    }

    #[test]
    fn mode_validate_is_read() {
        assert_eq!(parse(&args("--mode validate -c b.json")).unwrap().mode, Mode::Validate);
    }
}
