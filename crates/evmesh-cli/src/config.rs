//! `evmesh serve --config FILE`: a TOML file with a key for any flag of `serve` (its
//! name without the dashes). Flags win over the environment, the environment over
//! the file, the file over the defaults. Every key is checked, also one a flag
//! overrides: an unknown key or a bad value is an error naming the key and its line.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use clap::error::ContextKind;
use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory as _, FromArgMatches as _};

use crate::Cli;

/// Flags that are not settings.
const META: [&str; 3] = ["config", "print-config", "help"];

/// Settings whose values are never shown.
const SECRETS: [&str; 2] = ["nats-password", "nats-token"];

/// Settings a running node takes again on SIGHUP.
pub(crate) const RELOADABLE: [&str; 6] = [
    "log-level",
    "retention-max-age",
    "retention-max-events",
    "retention-max-bytes",
    "max-connections",
    "max-schema-versions",
];

/// One key of a config file: the flags it stands for, and its line.
struct Entry {
    key: String,
    line: usize,
    argv: Vec<String>,
}

/// A config file, read and its keys matched to flags.
pub(crate) struct ConfigFile {
    path: PathBuf,
    entries: Vec<Entry>,
}

/// One effective setting of `serve`: its value (secrets redacted) and where it came
/// from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Setting {
    pub key: String,
    pub value: Option<String>,
    pub source: String,
}

fn serve_command() -> clap::Command {
    Cli::command()
        .find_subcommand("serve")
        .cloned()
        .unwrap_or_else(|| clap::Command::new("serve"))
}

/// The 1-based line of the first line of `text` that sets `key`.
fn key_line(text: &str, key: &str) -> usize {
    text.lines()
        .position(|line| {
            let line = line.trim_start();
            [key.to_owned(), format!("\"{key}\""), format!("'{key}'")]
                .iter()
                .any(|k| {
                    line.strip_prefix(k.as_str())
                        .is_some_and(|rest| rest.trim_start().starts_with('='))
                })
        })
        .map_or(1, |i| i + 1)
}

impl ConfigFile {
    /// Reads `path` and matches each key to a flag of `serve`.
    pub(crate) fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow!("cannot read the config file {}: {e}", path.display()))?;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
            anyhow!(
                "{}{}: {}",
                path.display(),
                line.map(|l| format!(":{l}")).unwrap_or_default(),
                e.message()
            )
        })?;
        let serve = serve_command();
        let mut entries = Vec::new();
        for (key, value) in &table {
            let line = key_line(&text, key);
            let at = format!("{}:{line}", path.display());
            let Some(arg) = serve
                .get_arguments()
                .find(|a| a.get_long() == Some(key.as_str()) && !META.contains(&key.as_str()))
            else {
                bail!(
                    "{at}: unknown key {key:?}: the keys are evmesh serve's flags without their dashes (evmesh serve --help)"
                );
            };
            let flag = format!("--{key}");
            let argv = match (value, arg.get_action()) {
                (toml::Value::Boolean(true), ArgAction::SetTrue) => vec![flag],
                (toml::Value::Boolean(false), ArgAction::SetTrue) => Vec::new(),
                (_, ArgAction::SetTrue) => bail!("{at}: {key} is true or false"),
                (toml::Value::String(s), _) => vec![flag, s.clone()],
                (toml::Value::Integer(n), _) => vec![flag, n.to_string()],
                (toml::Value::Array(items), _) if arg.get_value_delimiter().is_some() => {
                    let items: Option<Vec<&str>> = items.iter().map(toml::Value::as_str).collect();
                    let Some(items) = items else {
                        bail!("{at}: {key} is a list of strings");
                    };
                    vec![flag, items.join(",")]
                }
                (other, _) => bail!(
                    "{at}: {key} is a string or a number, not {}",
                    other.type_str()
                ),
            };
            entries.push(Entry {
                key: key.clone(),
                line,
                argv,
            });
        }
        Ok(Self {
            path: path.to_owned(),
            entries,
        })
    }

    /// `message` about the file, at the line of the key whose flag it names.
    fn locate(&self, message: &str, flag: Option<&str>) -> anyhow::Error {
        let named = |e: &&Entry| {
            let long = format!("--{}", e.key);
            flag.map_or_else(
                || message.contains(&format!("{long} ")) || message.ends_with(&long),
                |f| {
                    f == long
                        || f.starts_with(&format!("{long} "))
                        || f.starts_with(&format!("{long}="))
                },
            )
        };
        match self.entries.iter().find(named) {
            Some(e) => anyhow!("{}:{}: {}: {message}", self.path.display(), e.line, e.key),
            None => anyhow!("{}: {message}", self.path.display()),
        }
    }

    /// Checks every key's value, as `serve` would take it.
    pub(crate) fn check(&self) -> anyhow::Result<usize> {
        let mut argv: Vec<OsString> = vec!["evmesh".into(), "serve".into()];
        for e in &self.entries {
            argv.extend(e.argv.iter().map(OsString::from));
        }
        let matches = Cli::command()
            .try_get_matches_from(&argv)
            .map_err(|e| self.clap_error(&e))?;
        let cli = Cli::from_arg_matches(&matches).map_err(|e| self.clap_error(&e))?;
        if let crate::Command::Serve(args) = cli.command {
            crate::serve::check(&args).map_err(|e| self.locate(&e.to_string(), None))?;
        }
        Ok(self.entries.len())
    }

    fn clap_error(&self, e: &clap::Error) -> anyhow::Error {
        let rendered = e.render().to_string();
        // clap's first paragraph, as one line.
        let first = rendered
            .lines()
            .take_while(|line| !line.trim().is_empty())
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(" ")
            .trim_start_matches("error: ")
            .to_owned();
        let flag = e.get(ContextKind::InvalidArg).map(ToString::to_string);
        self.locate(&first, flag.as_deref())
    }
}

/// The command line `argv` with the settings of the file at `path` added where
/// neither a flag nor the environment gave one, parsed; and each setting's
/// source.
pub(crate) fn apply(argv: &[OsString], path: Option<&Path>) -> anyhow::Result<(Cli, Vec<Setting>)> {
    let original = Cli::command().try_get_matches_from(argv)?;
    let Some(given) = original.subcommand_matches("serve") else {
        return Ok((Cli::from_arg_matches(&original)?, Vec::new()));
    };
    let serve = serve_command();
    let id = |key: &str| {
        serve
            .get_arguments()
            .find(|a| a.get_long() == Some(key))
            .map(|a| a.get_id().to_string())
    };
    let mut merged = argv.to_vec();
    let mut from_file: BTreeMap<String, String> = BTreeMap::new();
    if let Some(path) = path {
        let file = ConfigFile::load(path)?;
        file.check()?;
        for e in &file.entries {
            let overridden = id(&e.key).is_some_and(|id| {
                matches!(
                    given.value_source(&id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            });
            if !overridden {
                merged.extend(e.argv.iter().map(OsString::from));
                from_file.insert(e.key.clone(), format!("{}:{}", path.display(), e.line));
            }
        }
    }
    let matches = Cli::command().try_get_matches_from(&merged)?;
    let cli = Cli::from_arg_matches(&matches)?;
    let Some(effective) = matches.subcommand_matches("serve") else {
        return Ok((cli, Vec::new()));
    };
    let mut settings = Vec::new();
    for arg in serve.get_arguments() {
        let Some(key) = arg.get_long() else { continue };
        if META.contains(&key) {
            continue;
        }
        let id = arg.get_id().as_str();
        let value = match arg.get_action() {
            ArgAction::SetTrue => Some(effective.get_flag(id).to_string()),
            _ => effective.get_raw(id).map(|values| {
                values
                    .map(|v| v.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(",")
            }),
        };
        let value = value.map(|v| {
            if SECRETS.contains(&key) {
                "<redacted>".to_owned()
            } else {
                v
            }
        });
        let source = match from_file.get(key) {
            Some(at) => at.clone(),
            None => match given.value_source(id) {
                Some(ValueSource::CommandLine) => "flag".to_owned(),
                Some(ValueSource::EnvVariable) => format!(
                    "env {}",
                    arg.get_env()
                        .map(|e| e.to_string_lossy())
                        .unwrap_or_default()
                ),
                Some(ValueSource::DefaultValue) => "default".to_owned(),
                _ => "unset".to_owned(),
            },
        };
        settings.push(Setting {
            key: key.to_owned(),
            value,
            source,
        });
    }
    Ok((cli, settings))
}

/// The settings as a TOML file `--config` takes, each with its source.
pub(crate) fn print(settings: &[Setting]) -> String {
    let width = settings
        .iter()
        .filter_map(|s| s.value.as_ref().map(|v| s.key.len() + v.len()))
        .max()
        .unwrap_or(0)
        + 6;
    let mut out = String::new();
    for s in settings {
        let line = match &s.value {
            Some(v) if v == "true" || v == "false" => format!("{} = {v}", s.key),
            Some(v) => format!(
                "{} = \"{}\"",
                s.key,
                v.replace('\\', "\\\\").replace('"', "\\\"")
            ),
            None => format!("# {}", s.key),
        };
        out.push_str(&format!("{line:width$}# {}\n", s.source));
    }
    out
}

#[derive(clap::Args)]
pub(crate) struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(clap::Subcommand)]
enum ConfigCommand {
    /// Check a config file for `evmesh serve --config`: every key known, every value
    /// valid.
    Check { file: PathBuf },
}

pub(crate) fn run(args: ConfigArgs) -> anyhow::Result<()> {
    match args.command {
        ConfigCommand::Check { file } => {
            let n = ConfigFile::load(&file)?.check()?;
            println!("{}: {n} setting(s), valid", file.display());
            Ok(())
        }
    }
}
