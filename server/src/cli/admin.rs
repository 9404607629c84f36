//! The admin commands (`env`, `key`, `flag`, `segment`, `eval`, `token`, `job`, `audit`): each
//! one call of [`AdminClient`] (`env clone --wait` polls its job), printed as a summary for
//! people or, with `--json`, as the server's answer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use serde_json::Value;
use vane_core::model::{Flag, Serve};
use vane_core::protocol::epoch_hex;

use super::Failure;
use crate::api::client::{AdminClient, AdminError};
use crate::api::{EnvState, Explanation, JobInfo, JobState, Retention, Written};
use crate::keys::KeyKind;

/// Where the admin commands send their requests.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Base URL of the server's HTTP API.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:7480",
        env = "VANE_SERVER"
    )]
    pub server: String,
    /// Admin token; default: the `admin-token` file in the data directory.
    #[arg(long, global = true, env = "VANE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the server's JSON answer instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `vane env …`.
#[derive(Debug, Subcommand)]
pub enum EnvCmd {
    /// Create an environment.
    Create {
        /// Its name.
        name: String,
    },
    /// List environments.
    List,
    /// Show one environment.
    Get {
        /// Its name.
        name: String,
    },
    /// Delete an environment with its flags and keys.
    Delete {
        /// Its name.
        name: String,
    },
    /// Copy an environment's flags and segments (not its keys) into a new one. The new one
    /// exists at once, `creating`, and is served once the copy is done.
    Clone {
        /// The environment to copy.
        source: String,
        /// The new environment's name.
        name: String,
        /// Wait until it is ready, showing the progress.
        #[arg(long)]
        wait: bool,
    },
    /// Set how much of an environment's change log is kept beyond the in-memory window.
    Retention {
        /// The environment.
        name: String,
        /// Keep at most this many of the newest changes (default: the server's).
        #[arg(long)]
        changes: Option<u64>,
        /// Drop changes older than this many days (default: the server's).
        #[arg(long)]
        days: Option<u64>,
    },
}

/// `vane token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a named admin token and print its secret (shown only this once).
    Create {
        /// Its name: the actor the audit log records for what it does.
        name: String,
    },
    /// List the named admin tokens.
    List,
    /// Revoke a named admin token; it is refused from now on.
    Revoke {
        /// Its name.
        name: String,
    },
}

/// `vane job …`.
#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// Show a job and its progress.
    Get {
        /// The job id.
        id: String,
    },
    /// Start a failed clone again, from its source as it is now.
    Retry {
        /// The job id.
        id: String,
        /// Wait until the environment is ready, showing the progress.
        #[arg(long)]
        wait: bool,
    },
}

/// The kind of an SDK key.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KindArg {
    /// Backend services: full rules.
    Server,
    /// Mobile apps: evaluated values only.
    Mobile,
}

/// `vane key …`.
#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Create an SDK key and print its secret (shown only this once).
    Create {
        /// The environment.
        env: String,
        /// What the key may do.
        #[arg(long, value_enum)]
        kind: KindArg,
    },
    /// List an environment's keys.
    List {
        /// The environment.
        env: String,
    },
    /// Revoke a key; its sessions end at once.
    Revoke {
        /// The environment.
        env: String,
        /// The key id (from `key list`).
        id: String,
    },
}

/// `vane flag …`.
#[derive(Debug, Subcommand)]
pub enum FlagCmd {
    /// Create or replace a flag.
    #[command(group = clap::ArgGroup::new("source").required(true))]
    Set {
        /// The environment.
        env: String,
        /// The flag key.
        flag: String,
        /// A boolean flag, on, serving this value (and `false` when toggled off).
        #[arg(long, group = "source")]
        bool: Option<bool>,
        /// The flag's JSON definition (see docs/FLAGS.md); `-` reads stdin.
        #[arg(long, group = "source")]
        file: Option<PathBuf>,
    },
    /// Turn a flag on or off.
    #[command(group = clap::ArgGroup::new("state").required(true))]
    Toggle {
        /// The environment.
        env: String,
        /// The flag key.
        flag: String,
        /// Turn it on.
        #[arg(long, group = "state")]
        on: bool,
        /// Turn it off.
        #[arg(long, group = "state")]
        off: bool,
    },
    /// Show one flag's definition.
    Get {
        /// The environment.
        env: String,
        /// The flag key.
        flag: String,
    },
    /// List an environment's flags with the value each serves.
    List {
        /// The environment.
        env: String,
    },
    /// Delete a flag.
    Delete {
        /// The environment.
        env: String,
        /// The flag key.
        flag: String,
    },
}

/// `vane segment …`.
#[derive(Debug, Subcommand)]
pub enum SegmentCmd {
    /// Create or replace a segment from its JSON definition (see docs/FLAGS.md).
    Set {
        /// The environment.
        env: String,
        /// The segment key.
        segment: String,
        /// The JSON file; `-` reads stdin.
        #[arg(long)]
        file: PathBuf,
    },
    /// Show one segment.
    Get {
        /// The environment.
        env: String,
        /// The segment key.
        segment: String,
    },
    /// List an environment's segments.
    List {
        /// The environment.
        env: String,
    },
    /// Delete a segment no flag uses.
    Delete {
        /// The environment.
        env: String,
        /// The segment key.
        segment: String,
    },
}

impl From<AdminError> for Failure {
    fn from(e: AdminError) -> Failure {
        match e {
            AdminError::Unreachable { .. } => Failure::unreachable(e.to_string()),
            _ => Failure::refused(e.to_string()),
        }
    }
}

/// The client, and how to print answers.
struct Admin {
    client: AdminClient,
    json: bool,
}

impl Admin {
    fn connect(data: &Path, args: &AdminArgs) -> Result<Admin, Failure> {
        let token = match &args.token {
            Some(t) => t.clone(),
            None => {
                let path = data.join("admin-token");
                std::fs::read_to_string(&path)
                    .map(|t| t.trim().to_owned())
                    .map_err(|e| {
                        Failure::unreachable(format!(
                            "no admin token: pass --token, set VANE_ADMIN_TOKEN, or point --data at the server's directory ({}: {e})",
                            path.display()
                        ))
                    })?
            }
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| Failure::unreachable(e.to_string()))?;
        Ok(Admin {
            client: AdminClient::with_http(http, &args.server, token),
            json: args.json,
        })
    }

    /// Prints the answer as JSON with `--json`, else the summary.
    fn print<T: Serialize>(&self, answer: &T, summary: impl FnOnce(&T) -> String) {
        if self.json {
            println!("{}", serde_json::to_string(answer).unwrap_or_default());
        } else {
            println!("{}", summary(answer));
        }
    }

    fn print_written(&self, w: &Written) {
        self.print(w, |w| format!("version {}", w.at.version));
    }
}

pub(super) async fn env(data: &Path, args: &AdminArgs, cmd: EnvCmd) -> Result<(), Failure> {
    let a = Admin::connect(data, args)?;
    match cmd {
        EnvCmd::Create { name } => {
            let env = a.client.create_env(&name).await?;
            a.print(&env, |e| {
                format!("created {} (epoch {})", e.name, epoch_hex(e.at.epoch))
            });
        }
        EnvCmd::List => {
            let list = a.client.envs().await?;
            a.print(&list, |list| {
                let mut out = format!(
                    "{:<24} {:>8} {:>6}  {:<16}  {}",
                    "NAME", "VERSION", "FLAGS", "EPOCH", "STATE"
                );
                for e in &list.environments {
                    let state = match (e.state, e.progress) {
                        (EnvState::Creating, Some(p)) => {
                            format!("creating ({}/{})", p.copied, p.total)
                        }
                        (state, _) => state.as_str().to_owned(),
                    };
                    out.push_str(&format!(
                        "\n{:<24} {:>8} {:>6}  {:<16}  {state}",
                        e.name,
                        e.at.version,
                        e.flags,
                        epoch_hex(e.at.epoch)
                    ));
                }
                out
            });
        }
        EnvCmd::Get { name } => {
            let env = a.client.env(&name).await?;
            a.print(&env, |e| {
                format!(
                    "{}: version {}, {} flags, epoch {}",
                    e.name,
                    e.at.version,
                    e.flags,
                    epoch_hex(e.at.epoch)
                )
            });
        }
        EnvCmd::Delete { name } => {
            a.client.delete_env(&name).await?;
            a.print(&Value::Null, |_| format!("deleted {name}"));
        }
        EnvCmd::Clone { source, name, wait } => {
            let job = a.client.clone_env(&source, &name, Some(true)).await?;
            let job = if wait { a.follow(job).await? } else { job };
            a.print(&job, job_summary);
            if job.state == JobState::Failed {
                return Err(Failure::refused(job_summary(&job)));
            }
        }
        EnvCmd::Retention {
            name,
            changes,
            days,
        } => {
            let retention = Retention {
                max_changes: changes,
                max_age_days: days,
            };
            let env = a.client.set_retention(&name, retention).await?;
            a.print(&env, |e| {
                let or_all = |n: Option<u64>, unit: &str| {
                    n.map_or_else(|| "no limit".to_owned(), |n| format!("{n} {unit}"))
                };
                format!(
                    "{}: keeps {} of changes, {} back (never less than the in-memory window)",
                    e.name,
                    or_all(e.retention.max_changes, "changes"),
                    or_all(e.retention.max_age_days, "days"),
                )
            });
        }
    }
    Ok(())
}

/// A job in a line.
fn job_summary(j: &JobInfo) -> String {
    match j.state {
        JobState::Running => format!(
            "{}: cloning {} into {}, {} of {} copied",
            j.id, j.source, j.target, j.copied, j.total
        ),
        JobState::Done => format!(
            "{}: {} is ready ({} items copied from {})",
            j.id, j.target, j.copied, j.source
        ),
        JobState::Failed => format!(
            "{}: cloning {} into {} failed: {} (retry with `vane job retry {}`, or delete {})",
            j.id,
            j.source,
            j.target,
            j.error.as_deref().unwrap_or("no reason recorded"),
            j.id,
            j.target
        ),
    }
}

/// A progress bar, `[#####.....]  500/1000`.
fn bar(copied: u64, total: u64) -> String {
    const WIDTH: u64 = 30;
    let filled = (copied * WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH)
        .min(WIDTH);
    format!(
        "[{}{}] {copied}/{total}",
        "#".repeat(filled as usize),
        ".".repeat((WIDTH - filled) as usize)
    )
}

impl Admin {
    /// Polls a job until it ends, drawing its progress on stderr (redrawn in place on a
    /// terminal, a line per step of a tenth otherwise).
    async fn follow(&self, mut job: JobInfo) -> Result<JobInfo, Failure> {
        use std::io::{IsTerminal, Write};
        let tty = std::io::stderr().is_terminal();
        let mut shown = None;
        while job.state == JobState::Running {
            let tenth = (job.copied * 10).checked_div(job.total).unwrap_or(10);
            if tty {
                eprint!("\r{}", bar(job.copied, job.total));
                let _ = std::io::stderr().flush();
            } else if shown != Some(tenth) {
                eprintln!("{}", bar(job.copied, job.total));
                shown = Some(tenth);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            job = self.client.job(&job.id).await?;
        }
        if tty {
            eprintln!("\r{}", bar(job.copied, job.total));
        } else if job.state == JobState::Done {
            eprintln!("{}", bar(job.copied, job.total));
        }
        Ok(job)
    }
}

pub(super) async fn token(data: &Path, args: &AdminArgs, cmd: TokenCmd) -> Result<(), Failure> {
    let a = Admin::connect(data, args)?;
    match cmd {
        TokenCmd::Create { name } => {
            let token = a.client.create_token(&name).await?;
            a.print(&token, |t| t.secret.clone());
        }
        TokenCmd::List => {
            let list = a.client.tokens().await?;
            a.print(&list, |list| {
                let mut out = format!("{:<24} {:<16} {}", "NAME", "PREFIX", "STATE");
                for t in &list.tokens {
                    let state = if t.revoked_at.is_none() {
                        "active"
                    } else {
                        "revoked"
                    };
                    out.push_str(&format!("\n{:<24} {:<16} {state}", t.name, t.prefix));
                }
                out
            });
        }
        TokenCmd::Revoke { name } => {
            let token = a.client.revoke_token(&name).await?;
            a.print(&token, |t| format!("revoked {}", t.name));
        }
    }
    Ok(())
}

pub(super) async fn job(data: &Path, args: &AdminArgs, cmd: JobCmd) -> Result<(), Failure> {
    let a = Admin::connect(data, args)?;
    let job = match cmd {
        JobCmd::Get { id } => a.client.job(&id).await?,
        JobCmd::Retry { id, wait } => {
            let job = a.client.retry_job(&id).await?;
            if wait { a.follow(job).await? } else { job }
        }
    };
    a.print(&job, job_summary);
    if job.state == JobState::Failed {
        return Err(Failure::refused(job_summary(&job)));
    }
    Ok(())
}

pub(super) async fn audit(
    data: &Path,
    args: &AdminArgs,
    env: &str,
    limit: usize,
    before: Option<u64>,
) -> Result<(), Failure> {
    let a = Admin::connect(data, args)?;
    let page = a.client.audit(env, limit, before).await?;
    a.print(&page, |page| {
        let mut out = format!(
            "{:>6}  {:<24} {:<16} {:<16} {}",
            "ID", "WHEN (UTC)", "ACTOR", "ACTION", "TARGET"
        );
        for e in &page.entries {
            let when =
                time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(e.at_ms) * 1_000_000)
                    .ok()
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_else(|| e.at_ms.to_string());
            out.push_str(&format!(
                "\n{:>6}  {:<24} {:<16} {:<16} {}",
                e.id,
                when,
                e.actor,
                e.action,
                e.target.as_deref().unwrap_or("-")
            ));
        }
        if let Some(next) = page.next_before {
            out.push_str(&format!("\nmore: vane audit {env} --before {next}"));
        }
        out
    });
    Ok(())
}

pub(super) async fn key(data: &Path, args: &AdminArgs, cmd: KeyCmd) -> Result<(), Failure> {
    let a = Admin::connect(data, args)?;
    match cmd {
        KeyCmd::Create { env, kind } => {
            let kind = match kind {
                KindArg::Server => KeyKind::Server,
                KindArg::Mobile => KeyKind::Mobile,
            };
            let key = a.client.create_key(&env, kind).await?;
            a.print(&key, |k| k.secret.clone());
        }
        KeyCmd::List { env } => {
            let list = a.client.keys(&env).await?;
            a.print(&list, |list| {
                let mut out = format!("{:<18} {:<7} {:<16} {}", "ID", "KIND", "PREFIX", "STATE");
                for k in &list.keys {
                    let state = if k.revoked_at.is_none() {
                        "active"
                    } else {
                        "revoked"
                    };
                    out.push_str(&format!(
                        "\n{:<18} {:<7} {:<16} {state}",
                        k.id,
                        k.kind.as_str(),
                        k.prefix
                    ));
                }
                out
            });
        }
        KeyCmd::Revoke { env, id } => {
            let key = a.client.revoke_key(&env, &id).await?;
            a.print(&key, |k| format!("revoked {}", k.id));
        }
    }
    Ok(())
}

pub(super) async fn flag(data: &Path, args: &AdminArgs, cmd: FlagCmd) -> Result<(), Failure> {
    let a = Admin::connect(data, args)?;
    match cmd {
        FlagCmd::Set {
            env,
            flag,
            bool,
            file,
        } => {
            let written = match (bool, file) {
                (Some(b), _) => {
                    let definition = Flag::boolean(flag.clone(), true, b);
                    a.client.put_flag(&env, &flag, &definition).await?
                }
                (None, Some(path)) => a.client.put_flag(&env, &flag, &read_json(&path)?).await?,
                (None, None) => return Err(Failure::usage("pass --bool or --file")),
            };
            a.print_written(&written);
        }
        FlagCmd::Toggle { env, flag, on, off } => {
            debug_assert!(on != off, "clap makes them exclusive and requires one");
            let written = a.client.toggle(&env, &flag, on).await?;
            a.print_written(&written);
        }
        FlagCmd::Get { env, flag } => {
            let definition = a.client.flag(&env, &flag).await?;
            a.print(&definition, |f| {
                serde_json::to_string_pretty(f).unwrap_or_default()
            });
        }
        FlagCmd::List { env } => {
            let list = a.client.flags(&env).await?;
            a.print(&list, |list| {
                let mut out = format!("{:<28} {:<4} {:<40} {}", "KEY", "ON", "SERVES", "VERSION");
                for f in &list.flags {
                    out.push_str(&format!(
                        "\n{:<28} {:<4} {:<40} {}",
                        f.key,
                        if f.on { "on" } else { "off" },
                        serving(f),
                        f.version
                    ));
                }
                out
            });
        }
        FlagCmd::Delete { env, flag } => {
            let written = a.client.delete_flag(&env, &flag).await?;
            a.print_written(&written);
        }
    }
    Ok(())
}

pub(super) async fn segment(data: &Path, args: &AdminArgs, cmd: SegmentCmd) -> Result<(), Failure> {
    let a = Admin::connect(data, args)?;
    match cmd {
        SegmentCmd::Set { env, segment, file } => {
            let written = a
                .client
                .put_segment(&env, &segment, &read_json(&file)?)
                .await?;
            a.print_written(&written);
        }
        SegmentCmd::Get { env, segment } => {
            let definition = a.client.segment(&env, &segment).await?;
            a.print(&definition, |s| {
                serde_json::to_string_pretty(s).unwrap_or_default()
            });
        }
        SegmentCmd::List { env } => {
            let list = a.client.segments(&env).await?;
            a.print(&list, |list| {
                let mut out = format!(
                    "{:<28} {:>8} {:>8} {:>6} {}",
                    "KEY", "INCLUDED", "EXCLUDED", "RULES", "VERSION"
                );
                for s in &list.segments {
                    out.push_str(&format!(
                        "\n{:<28} {:>8} {:>8} {:>6} {}",
                        s.key,
                        s.included.len(),
                        s.excluded.len(),
                        s.rules.len(),
                        s.version
                    ));
                }
                out
            });
        }
        SegmentCmd::Delete { env, segment } => {
            let written = a.client.delete_segment(&env, &segment).await?;
            a.print_written(&written);
        }
    }
    Ok(())
}

pub(super) async fn eval(
    data: &Path,
    args: &AdminArgs,
    env: &str,
    flag: &str,
    context: &str,
) -> Result<(), Failure> {
    let context: Value = serde_json::from_str(context)
        .map_err(|e| Failure::usage(format!("--context is not JSON: {e}")))?;
    let a = Admin::connect(data, args)?;
    let answer = a.client.evaluate(env, flag, context).await?;
    a.print(&answer, explain);
    Ok(())
}

/// `vane eval`'s summary: value, variant, reason, and what decided.
fn explain(e: &Explanation) -> String {
    let value = e.served.value.as_ref().map_or("null".to_owned(), |v| {
        serde_json::to_string(v).unwrap_or_default()
    });
    let reason = serde_json::to_value(e.served.reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut out = format!(
        "value:   {value}\nvariant: {}\nreason:  {reason}",
        e.served.variant.as_deref().unwrap_or("-")
    );
    if let Some(code) = e.served.error_code {
        out.push_str(&format!("\nerror:   {}", code.as_str()));
    }
    if let Some(rule) = &e.rule {
        let id = rule
            .id
            .as_ref()
            .map(|id| format!(" ({id})"))
            .unwrap_or_default();
        out.push_str(&format!("\nrule:    {}{id}", rule.index));
    }
    if let Some(b) = e.bucket {
        out.push_str(&format!("\nbucket:  {b} of 100000"));
    }
    out.push_str(&format!("\nwhy:     {}", e.explanation));
    out
}

/// What a flag serves, in a few words: its value if it is off or has no rules, else its rules
/// and fallthrough.
fn serving(f: &Flag) -> String {
    let value = |variant: &str| {
        f.variants.get(variant).map_or_else(
            || "?".to_owned(),
            |v| serde_json::to_string(v).unwrap_or_default(),
        )
    };
    let fallthrough = match &f.fallthrough {
        Serve::Variant(v) => value(v),
        Serve::Rollout(r) => {
            let parts: Vec<String> = r
                .variants
                .iter()
                .map(|w| format!("{} {}%", w.variant, f64::from(w.weight) / 1000.0))
                .collect();
            format!("rollout {}", parts.join(" / "))
        }
    };
    if !f.on {
        value(&f.off_variant)
    } else if f.rules.is_empty() {
        fallthrough
    } else {
        format!("{} rule(s), else {fallthrough}", f.rules.len())
    }
}

/// Reads a JSON document from a file, or stdin for `-`.
fn read_json(path: &Path) -> Result<Value, Failure> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(path)
    }
    .map_err(|e| Failure::refused(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| Failure::refused(format!("{}: {e}", path.display())))
}
