//! `tilewise`: the command-line client. Every command that needs the daemon goes through the one
//! `ipc::client::Client`; `probe` works without it. `--json` prints machine-readable output.
//!
//! Exit codes: 0 ok, 1 error, 3 the daemon is not running.

mod tune;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};
use tilewise::config::Config;
use tilewise::ipc::client::{Client, ClientError};
use tilewise::ipc::protocol::{
    methods, ClientRecord, ClientsListParams, HistoryParams, ModelInfo, PolicyGetParams, PolicySource, CLI_CLIENT_PREFIX, VERSION,
};
use tilewise::paths::Paths;

#[derive(Parser, Debug)]
#[command(name = "tilewise", version, about = "tilewise: a proven-faster matmul policy for MLX-LM on this machine")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Describe this machine as the tuner sees it (works without the daemon).
    Probe(JsonFlag),
    /// What the daemon is doing.
    Status(JsonFlag),
    /// Policies.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// The models the daemon has seen (tuned, or loaded by a process using the plugin): name,
    /// fingerprint, weights, last use, what was run, and the best proven policy.
    Models(JsonFlag),
    /// The processes that fetched a policy and what each was served (live ones first).
    Clients {
        /// Only processes that still run.
        #[arg(long)]
        live: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Write this machine's proven policies, with their evidence, to a bundle another machine can
    /// import (docs/sharing.md).
    Export {
        /// Only this model (name, path or fingerprint).
        #[arg(long)]
        model: Option<String>,
        /// The bundle file (default: standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Import a bundle (a file, or every *.json in a folder): its policies wait, pending, until
    /// this machine has verified them (`tilewise verify`, or the next idle window).
    Import {
        path: PathBuf,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Imported policies and what this machine made of each (pending, verified, rejected, starting
    /// point).
    Imports(JsonFlag),
    /// Verify pending imported policies now: measure them here against stock (correctness gate,
    /// confirmed A/B); only a verified one is served.
    Verify {
        /// The model whose imports to verify (name, path or fingerprint); default: the first model
        /// with pending imports that this machine can load.
        #[arg(long)]
        model: Option<String>,
        /// Print the final session as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Past promotions of proven policies, newest first.
    History {
        /// Only this model fingerprint.
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Tune: start or attach to a session and follow it (generation, evaluations, best speedup).
    Tune(tune::TuneArgs),
    /// What the daemon did: the newest stored events (promotions, sessions, automatic starts...).
    Events {
        /// How many of the newest events to show.
        #[arg(long, default_value_t = 30)]
        limit: u32,
        /// Only events of this session.
        #[arg(long)]
        session: Option<i64>,
        /// Keep printing new events as they happen (Ctrl-C ends).
        #[arg(long, short)]
        follow: bool,
        /// Include `client.hello` (one per MLX process start), left out by default.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Stop the running tuning session (the daemon does not start another by itself until you
    /// have been away again; `tilewise tune` starts one now).
    Stop {
        /// Only if this session is the one running.
        #[arg(long)]
        session: Option<i64>,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Start or stop the background daemon.
    #[command(subcommand)]
    Daemon(DaemonCmd),
    /// Run the daemon at login (launchd / systemd --user), restarted with backoff; opt-in.
    #[command(subcommand)]
    Service(tilewise::service::ServiceCmd),
}

#[derive(Args, Debug, Clone, Copy)]
struct JsonFlag {
    /// Print JSON for programs instead of text for people.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// The policy the daemon serves for a model (the proven best, or native and why).
    Get {
        /// The model: its fingerprint, or a name or path as it was loaded (`tilewise models`
        /// lists them).
        #[arg(long)]
        model: String,
        /// MLX version; default: the one the configured Python has installed.
        #[arg(long)]
        mlx: Option<String>,
        /// MLX backend (metal, cuda, cpu); default: this machine's.
        #[arg(long)]
        backend: Option<String>,
        /// Device fingerprint; default: this machine's.
        #[arg(long)]
        device: Option<String>,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Subcommand, Debug)]
enum DaemonCmd {
    /// Start `tilewised` in the background and wait until it answers.
    Start(JsonFlag),
    /// Ask the daemon to stop and wait until its socket is gone (nothing to do when none runs).
    Stop(JsonFlag),
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`tilewise probe | head`) like other command-line tools.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tilewise: {e}");
            match e.downcast_ref::<ClientError>() {
                Some(ClientError::DaemonNotRunning { .. }) => ExitCode::from(3),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let paths = Paths::from_env()?;
    match cli.command {
        Cmd::Probe(f) => {
            let device = tilewise::probe::detect();
            if f.json {
                print_json(&serde_json::json!({"device": device, "fingerprint": device.fingerprint()}))
            } else {
                println!("{}", tilewise::probe::render_human(&device).trim_end());
                Ok(())
            }
        }
        Cmd::Status(f) => {
            let s = connect(&paths).await?.status().await?;
            if f.json {
                return print_json(&s);
            }
            println!("tilewised {} (pid {}), up {:.0} s, {} client(s)", s.version, s.pid, s.uptime_s, s.clients);
            println!("socket:   {}", s.socket.display());
            println!("database: {} (schema v{})", s.db.path.display(), s.db.schema_version);
            println!(
                "device:   {} [{}] backend {}",
                s.device.chip.as_deref().unwrap_or("unknown chip"),
                s.device_fingerprint,
                s.device.backend.as_str()
            );
            println!("tuning:   {}", tuning_line(&s.tuning));
            println!("using:    {}", processes_line(&s.processes));
            for p in &s.processes {
                println!("          {}", client_line(p));
            }
            Ok(())
        }
        Cmd::Policy(PolicyCmd::Get { model, mlx, backend, device, json }) => {
            let mut c = connect(&paths).await?;
            let seen = c.models_list().await?.models;
            let model = match tilewise::usage::resolve_model(&seen, &model) {
                Ok(m) => m.fingerprint.clone(),
                // A fingerprint the daemon has not seen is still a fair question (the answer is native).
                Err(_) if tilewise::usage::is_model_fingerprint(&model) => model,
                Err(e) => anyhow::bail!("--model: {e}"),
            };
            let mlx = match mlx {
                Some(v) => v,
                None => installed_mlx_version(&paths)?,
            };
            let asked = model.clone();
            let r = c.policy_get(&PolicyGetParams { model, mlx, backend, device, model_name: None, dtype: None }).await?;
            if json.json {
                return print_json(&r);
            }
            let source = match r.source {
                PolicySource::Best => "best",
                PolicySource::Native => "native",
            };
            println!("{source} policy {} for model {asked}", r.hash);
            if let Some(summary) = r.evidence.as_ref().and_then(|e| e.summary.as_ref()) {
                println!("what: {}", summary.text);
                let measured = summary.measured_text();
                if !measured.is_empty() {
                    println!("measured: {measured}");
                }
            }
            if let Some(origin) = r.evidence.as_ref().and_then(|e| e.origin.as_ref()) {
                println!("origin: {origin}");
            }
            println!("why: {}", r.reason);
            println!("{}", serde_json::to_string_pretty(&r.policy.to_value())?);
            Ok(())
        }
        Cmd::Models(f) => {
            let listed = connect(&paths).await?.models_list().await?;
            if f.json {
                return print_json(&listed);
            }
            print!("{}", render_models(&listed.models));
            Ok(())
        }
        Cmd::Export { model, output } => {
            let mut c = connect(&paths).await?;
            let model = match model {
                Some(m) => Some(resolve_model_arg(&mut c, &m).await?),
                None => None,
            };
            let bundle = c.call(methods::POLICY_EXPORT, Some(serde_json::json!({"model": model}))).await?;
            let text = serde_json::to_string_pretty(&bundle)?;
            let n = bundle["entries"].as_array().map_or(0, Vec::len);
            match output {
                Some(path) => {
                    std::fs::write(&path, text + "\n").map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    eprintln!("tilewise: wrote {n} proven polic{} to {}", if n == 1 { "y" } else { "ies" }, path.display());
                }
                None => println!("{text}"),
            }
            if n == 0 {
                eprintln!(
                    "tilewise: note: this machine has no proven policy{} yet: the bundle is empty",
                    if model.is_some() { " for that model" } else { "" }
                );
            }
            Ok(())
        }
        Cmd::Import { path, json } => {
            let mut c = connect(&paths).await?;
            let files: Vec<PathBuf> = if path.is_dir() {
                let mut v: Vec<PathBuf> =
                    std::fs::read_dir(&path)?.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "json")).collect();
                v.sort();
                v
            } else {
                vec![path.clone()]
            };
            let mut all = vec![];
            let mut refused = 0;
            for f in files {
                let abs = std::fs::canonicalize(&f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
                match c.call(methods::POLICY_IMPORT, Some(serde_json::json!({"path": abs}))).await {
                    Ok(r) => {
                        for o in r["imported"].as_array().cloned().unwrap_or_default() {
                            if !json.json {
                                println!(
                                    "{}  {}  {}{}: {}",
                                    o["state"].as_str().unwrap_or("?"),
                                    o["hash"].as_str().unwrap_or("").get(..19).unwrap_or(""),
                                    o["model_name"].as_str().map(short_name).unwrap_or(o["model"].as_str().unwrap_or("?")),
                                    if o["new"] == true { "" } else { " (imported before)" },
                                    o["reason"].as_str().unwrap_or("")
                                );
                            }
                            all.push(o);
                        }
                    }
                    Err(e) => {
                        refused += 1;
                        eprintln!("tilewise: {e}");
                    }
                }
            }
            if json.json {
                print_json(&serde_json::json!({"imported": all}))?;
            } else if all.iter().any(|o| o["state"] == "pending") {
                println!("pending policies are served only after this machine verifies them: `tilewise verify` (or the next idle window)");
            }
            if refused > 0 {
                anyhow::bail!("{refused} bundle(s) refused; nothing of them was imported");
            }
            Ok(())
        }
        Cmd::Imports(f) => {
            let r = connect(&paths).await?.call(methods::IMPORTS_LIST, Some(serde_json::json!({}))).await?;
            if f.json {
                return print_json(&r);
            }
            let list = r["imports"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("nothing imported yet (`tilewise import FILE`)");
            }
            for i in list {
                println!(
                    "{:<14} {}  model {}  mlx {} {}  from {}\n    {}",
                    i["state"].as_str().unwrap_or("?"),
                    i["hash"].as_str().unwrap_or("").get(..19).unwrap_or(""),
                    i["model"].as_str().unwrap_or("?"),
                    i["mlx"].as_str().unwrap_or("?"),
                    i["backend"].as_str().unwrap_or("?"),
                    i["from_chip"].as_str().unwrap_or(i["from_device"].as_str().unwrap_or("?")),
                    i["reason"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        Cmd::Verify { model, json } => {
            let mut c = connect(&paths).await?;
            let pending = c.call(methods::IMPORTS_LIST, Some(serde_json::json!({"state": "pending"}))).await?;
            let pending: Vec<Value> = pending["imports"].as_array().cloned().unwrap_or_default();
            let seen = c.models_list().await?.models;
            let name = match model {
                Some(m) => {
                    tilewise::usage::resolve_model(&seen, &m).map_err(|e| anyhow::anyhow!("--model: {e}"))?.name.clone().unwrap_or(m)
                }
                None => {
                    let wanted: Vec<&str> = pending.iter().filter_map(|i| i["model"].as_str()).collect();
                    let Some(m) = seen.iter().find(|m| wanted.contains(&m.fingerprint.as_str()) && m.name.is_some()) else {
                        anyhow::bail!(if pending.is_empty() {
                            "nothing to verify: no imported policy is pending (`tilewise imports`)".to_string()
                        } else {
                            format!(
                                "{} pending import(s), but for models this machine cannot name; verify with --model <path or name>",
                                pending.len()
                            )
                        });
                    };
                    m.name.clone().unwrap_or_default()
                }
            };
            let args = tune::TuneArgs { model: Some(name), verify: true, json, ..tune::TuneArgs::default() };
            tune::run(args, c, connect(&paths).await?).await
        }
        Cmd::Clients { live, json } => {
            let listed = connect(&paths).await?.clients_list(&ClientsListParams { live_only: live, limit: None }).await?;
            if json.json {
                return print_json(&listed);
            }
            if listed.clients.is_empty() {
                println!("no process has fetched a policy{}", if live { " and still runs" } else { "" });
            }
            for c in &listed.clients {
                println!("{}", client_line(c));
            }
            Ok(())
        }
        Cmd::History { model, limit, json } => {
            let h = connect(&paths).await?.history(&HistoryParams { model, limit: Some(limit) }).await?;
            if json.json {
                return print_json(&h);
            }
            if h.promotions.is_empty() {
                println!("no policy has been promoted yet");
            }
            for p in &h.promotions {
                let what = match p.kind.as_str() {
                    "remeasure" => "re-measured",
                    "demotion" => "DEMOTED",
                    _ => "promoted",
                };
                let served = match (p.kind.as_str(), p.replaced_hash.as_deref()) {
                    ("demotion", Some(demoted)) => format!("{demoted}; now serving {}", p.hash),
                    _ => p.hash.clone(),
                };
                println!(
                    "{}  {what:<11} {:.3}x [{:.3}-{:.3}]  model {}  mlx {} {}  {served}{}",
                    p.at,
                    p.ratio,
                    p.lo,
                    p.hi,
                    p.model,
                    p.mlx,
                    p.backend,
                    p.session_id.map(|s| format!("  session {s}")).unwrap_or_default()
                );
                if let Some(reason) = &p.reason {
                    println!("    {reason}");
                }
                if let Some(origin) = &p.origin {
                    println!("    {origin}");
                }
                if let Some(summary) = &p.summary {
                    let measured = summary.measured_text();
                    println!("    {}{}", summary.text, if measured.is_empty() { String::new() } else { format!("; {measured}") });
                }
            }
            Ok(())
        }
        Cmd::Tune(args) => tune::run(args, connect(&paths).await?, connect(&paths).await?).await,
        Cmd::Events { limit, session, follow, all, json } => {
            let mut c = connect(&paths).await?;
            let hidden: Vec<String> = if all { vec![] } else { vec![tilewise::events::kind::CLIENT_HELLO.to_string()] };
            let listed = c
                .events_list(&tilewise::ipc::protocol::EventsListParams {
                    limit: Some(limit),
                    session_id: session,
                    kinds: None,
                    exclude_kinds: (!hidden.is_empty()).then(|| hidden.clone()),
                })
                .await?;
            let print = |e: &tilewise::store::Event| -> anyhow::Result<()> {
                if json.json {
                    println!("{}", serde_json::to_string(e)?);
                } else {
                    println!("{}", event_line(e));
                }
                Ok(())
            };
            for e in &listed.events {
                print(e)?;
            }
            if !follow {
                return Ok(());
            }
            // Continue from the last one shown: the daemon replays anything in between.
            let since = listed.events.last().map(|e| e.id).unwrap_or(0);
            let mut rx = connect(&paths).await?.subscribe_events_since(None, Some(since)).await?;
            while let Some(e) = rx.recv().await {
                if session.is_none_or(|s| e.session_id == Some(s)) && !hidden.contains(&e.kind) {
                    print(&e)?;
                }
            }
            anyhow::bail!("the daemon closed the connection")
        }
        Cmd::Stop { session, json } => {
            let mut c = connect(&paths).await?;
            let before = c.status().await?.tuning;
            let r = c.call(tilewise::ipc::protocol::methods::TUNING_STOP, Some(serde_json::json!({"session_id": session}))).await?;
            if json.json {
                return print_json(&r);
            }
            match (r["stopped"].as_bool(), before.session_id) {
                (Some(true), Some(id)) => println!("stopped session {id}"),
                (Some(true), None) => println!("stopped"),
                _ => match (session, before.session_id) {
                    (Some(want), Some(running)) => println!("session {want} is not running (session {running} is); nothing stopped"),
                    _ => println!("no tuning session is running"),
                },
            }
            Ok(())
        }
        Cmd::Daemon(DaemonCmd::Start(f)) => daemon_start(&paths, f.json).await,
        Cmd::Daemon(DaemonCmd::Stop(f)) => daemon_stop(&paths, f.json).await,
        Cmd::Service(c) => tilewise::service::run_cli(c, paths.logs_dir.clone()),
    }
}

/// The fingerprint a `--model` argument names (a fingerprint, a name or a path the daemon has seen).
async fn resolve_model_arg(c: &mut Client, wanted: &str) -> anyhow::Result<String> {
    let seen = c.models_list().await?.models;
    match tilewise::usage::resolve_model(&seen, wanted) {
        Ok(m) => Ok(m.fingerprint.clone()),
        Err(_) if tilewise::usage::is_model_fingerprint(wanted) => Ok(wanted.to_string()),
        Err(e) => anyhow::bail!("--model: {e}"),
    }
}

/// "3 processes, 2 models" (or "no process is using a policy now").
fn processes_line(processes: &[ClientRecord]) -> String {
    if processes.is_empty() {
        return "no process using the plugin runs now".into();
    }
    let pids: std::collections::BTreeSet<Option<u32>> = processes.iter().map(|p| p.pid).collect();
    let models: std::collections::BTreeSet<&str> = processes.iter().map(|p| p.model.as_str()).collect();
    let plural = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    format!("{}, {}", plural(pids.len(), "process", "processes"), plural(models.len(), "model", "models"))
}

/// "pid 4121 tilewise-py/0.1.0  Qwen2.5-0.5B-Instruct → best +28.0 % (sha256:…), 3 fetches, last …".
fn client_line(c: &ClientRecord) -> String {
    let model = c.model_name.as_deref().map(short_name).unwrap_or(&c.model);
    let served = match (c.source.as_str(), c.ratio) {
        ("best", Some(r)) => format!("best policy, proven {:+.1} %", (r - 1.0) * 100.0),
        ("best", None) => "a best policy since replaced".into(),
        _ => "native, not tuned yet".into(),
    };
    format!(
        "{} {}  {model} → {served}  ({} fetch{}, last {}){}",
        c.pid.map(|p| format!("pid {p}")).unwrap_or_else(|| "pid ?".into()),
        c.client,
        c.fetches,
        if c.fetches == 1 { "" } else { "es" },
        c.last_at,
        if c.live { "" } else { "  [exited]" }
    )
}

/// The last path component of a model name (`/models/Qwen2.5-0.5B` → `Qwen2.5-0.5B`).
fn short_name(name: &str) -> &str {
    name.trim_end_matches('/').rsplit('/').next().filter(|s| !s.is_empty()).unwrap_or(name)
}

/// The `tilewise models` table.
fn render_models(models: &[ModelInfo]) -> String {
    if models.is_empty() {
        return "no model seen yet: a model is seen when a session tunes it or a process using the plugin loads it\n".into();
    }
    let mut out = String::new();
    for m in models {
        out.push_str(&format!(
            "{}  {}{}\n",
            m.name.as_deref().map(short_name).unwrap_or("(unnamed)"),
            m.fingerprint,
            m.dtype.as_deref().map(|d| format!("  {d}")).unwrap_or_default()
        ));
        if let Some(n) = m.name.as_deref().filter(|n| short_name(n) != *n) {
            out.push_str(&format!("    loaded as {n}\n"));
        }
        let u = &m.usage;
        let used = if u.reports == 0 {
            "no usage reported".to_string()
        } else {
            format!(
                "{} generations, {} tokens generated{}",
                u.generations,
                u.generated_tokens,
                u.main_batch.map(|b| format!(", mostly at batch {b}")).unwrap_or_default()
            )
        };
        out.push_str(&format!("    last used {}; {used}\n", m.last_used));
        match &m.best {
            Some(b) => out.push_str(&format!(
                "    best: {:.3}x [{:.3}, {:.3}] {} (mlx {} {}){}\n",
                b.ratio,
                b.lo,
                b.hi,
                b.hash,
                b.mlx,
                b.backend,
                b.summary.as_deref().map(|s| format!(": {s}")).unwrap_or_default()
            )),
            None => out.push_str("    best: native (nothing proven yet)\n"),
        }
    }
    out
}

/// "tuning (session 4): generation 7, 2m 10s of a 4m budget, model synthetic:tiny" or "idle: …".
fn tuning_line(t: &tilewise::ipc::protocol::TuningStatus) -> String {
    let mut line = t.state.clone();
    if let Some(id) = t.session_id {
        line.push_str(&format!(" (session {id})"));
    }
    if let Some(reason) = &t.reason {
        line.push_str(&format!(": {reason}"));
    }
    let Some(d) = &t.detail else { return line };
    let mut parts = vec![];
    if let Some(g) = d["generation"].as_u64() {
        parts.push(format!("generation {g}"));
    }
    let spent = d["elapsed_s"].as_f64().map(|s| humantime::format_duration(Duration::from_secs(s as u64)).to_string());
    match (spent, d["budget"]["seconds"].as_u64(), d["budget"]["evaluations"].as_u64()) {
        (Some(spent), Some(b), _) => parts.push(format!("{spent} of a {} budget", humantime::format_duration(Duration::from_secs(b)))),
        (Some(spent), None, Some(n)) => parts.push(format!("{spent} so far, budget {n} evaluations")),
        (Some(spent), None, None) => parts.push(format!("{spent} so far")),
        _ => {}
    }
    if let Some(m) = d["model"].as_str() {
        parts.push(format!("model {m}"));
    }
    if !parts.is_empty() {
        line.push_str(if t.reason.is_some() { "; " } else { ": " });
        line.push_str(&parts.join(", "));
    }
    line
}

/// One event for a person: time, kind, session, and the data in one line.
fn event_line(e: &tilewise::store::Event) -> String {
    let d = &e.data;
    let summary = match (d["ratio"].as_f64(), d["lo"].as_f64(), d["hi"].as_f64()) {
        (Some(r), Some(lo), Some(hi)) => {
            format!("{r:.3}x [{lo:.3}, {hi:.3}]{}", d["hash"].as_str().map(|h| format!(" {}", &h[..h.len().min(19)])).unwrap_or_default())
        }
        _ => {
            let s = if d.as_object().is_some_and(|o| o.is_empty()) { String::new() } else { d.to_string() };
            if s.chars().count() > 140 {
                format!("{}…", s.chars().take(140).collect::<String>())
            } else {
                s
            }
        }
    };
    let session = e.session_id.map(|s| format!("session {s}  ")).unwrap_or_default();
    format!("{}  {:<24} {session}{summary}", e.at, e.kind)
}

async fn connect(paths: &Paths) -> Result<Client, ClientError> {
    let mut c = Client::connect(paths).await?.with_name(format!("{CLI_CLIENT_PREFIX}{VERSION}"));
    c.hello().await?;
    Ok(c)
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// The MLX version installed for the configured Python (what the plugin will report).
/// The MLX version of the Python the worker would run (`tilewise::python::find`).
fn installed_mlx_version(paths: &Paths) -> anyhow::Result<String> {
    let config = Config::load(&paths.config_file).unwrap_or_default();
    let python = tilewise::python::find(&config, &paths.config_file).map_err(|why| anyhow::anyhow!("{why}; or pass --mlx VERSION"))?.path;
    let out = Command::new(&python).args(["-c", "import mlx.core as mx; print(mx.__version__)"]).stderr(Stdio::null()).output();
    match out {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        _ => anyhow::bail!("cannot tell which MLX version {} has installed; pass --mlx VERSION", python.display()),
    }
}

/// `tilewised` next to this executable, else from PATH.
fn daemon_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("tilewised")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("tilewised"))
}

/// What `daemon start` / `daemon stop` did, for `--json`.
#[derive(Serialize)]
struct DaemonOutcome {
    /// `started`, `already_running`, `stopped` or `not_running`.
    outcome: &'static str,
    pid: Option<u32>,
    socket: PathBuf,
    logs: PathBuf,
}

impl DaemonOutcome {
    fn print(&self, json: bool) -> anyhow::Result<()> {
        if json {
            return print_json(self);
        }
        let pid = self.pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
        match self.outcome {
            "started" => println!("tilewised started{pid} on {}; logs in {}", self.socket.display(), self.logs.display()),
            "already_running" => println!("tilewised is already running{pid} on {}", self.socket.display()),
            "stopped" => println!("tilewised{pid} stopped"),
            _ => println!("tilewised is not running (no daemon answers on {})", self.socket.display()),
        }
        Ok(())
    }
}

async fn daemon_start(paths: &Paths, json: bool) -> anyhow::Result<()> {
    let outcome = |outcome, pid, socket| DaemonOutcome { outcome, pid: Some(pid), socket, logs: paths.logs_dir.clone() };
    if let Ok(mut c) = connect(paths).await {
        let s = c.status().await?;
        return outcome("already_running", s.pid, s.socket).print(json);
    }
    paths.ensure_dirs()?;
    let stderr_path = paths.logs_dir.join("tilewised.stderr.log");
    let stderr = std::fs::File::create(&stderr_path)?;
    let mut cmd = Command::new(daemon_binary());
    cmd.arg("--foreground").stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
    // Detach: a new session, so closing this terminal does not signal the daemon.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| anyhow::anyhow!("cannot start {}: {e}", daemon_binary().display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            let why = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            anyhow::bail!("tilewised exited at start ({status}): {}", why.trim());
        }
        if let Ok(mut c) = connect(paths).await {
            let s = c.status().await?;
            return outcome("started", s.pid, s.socket).print(json);
        }
        if Instant::now() > deadline {
            anyhow::bail!("tilewised (pid {}) did not answer within 30 s; see {}", child.id(), paths.logs_dir.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn daemon_stop(paths: &Paths, json: bool) -> anyhow::Result<()> {
    let socket = paths.client_socket();
    let mut c = match connect(paths).await {
        Ok(c) => c,
        // Stopping what is not running is done already, not an error.
        Err(ClientError::DaemonNotRunning { .. }) => {
            return DaemonOutcome { outcome: "not_running", pid: None, socket, logs: paths.logs_dir.clone() }.print(json);
        }
        Err(e) => return Err(e.into()),
    };
    let pid = c.status().await?.pid;
    c.shutdown().await?;
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(30);
    while socket_exists(&socket) {
        if Instant::now() > deadline {
            anyhow::bail!("tilewised (pid {pid}) was asked to stop but its socket is still there after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    DaemonOutcome { outcome: "stopped", pid: Some(pid), socket, logs: paths.logs_dir.clone() }.print(json)
}

fn socket_exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}
