//! The `wsgate` binary: parse the command line, load config, init telemetry, bind, serve.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wsgate::config::Config;
use wsgate::mock::{MockConfig, MockUpstream};

/// jemalloc instead of glibc's malloc: about 5% less gateway CPU per relayed turn and ~1 KiB
/// less RSS per idle session pair (README "Performance"; DESIGN-NOTES "Allocator").
#[cfg(all(feature = "jemalloc", unix, not(target_env = "musl")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for invalid configuration (EX_CONFIG-like, as linkerd uses 64).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "wsgate",
    version,
    about = "WebSocket-first gateway for Codex / Responses API WebSocket mode"
)]
struct Cli {
    /// Config file (default ./gateway.yaml; a missing default file means built-in defaults).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Args)]
struct LoadgenArgs {
    /// Target, e.g. ws://127.0.0.1:8080/v1/responses.
    #[arg(long)]
    url: String,
    /// Bearer key for the target.
    #[arg(long, env = "WSGATE_LOADGEN_KEY")]
    key: Option<String>,
    #[arg(long, default_value_t = 8)]
    sessions: usize,
    #[arg(long, default_value_t = 10)]
    turns: usize,
    /// Deltas per turn.
    #[arg(long, default_value_t = 10)]
    deltas: usize,
    /// Bytes per delta (0 = a short sentence).
    #[arg(long, default_value_t = 0)]
    delta_size: usize,
    /// The mock's pause between deltas (whole milliseconds; 0s: none, a turn's events are
    /// written at once). With a pause each delta arrives on its own, as a real upstream's do.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    delta_interval: std::time::Duration,
    /// Pause between turns.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    think: std::time::Duration,
    /// Spread of the think time (0..=1): each pause is uniform in think * [1 - j, 1 + j],
    /// the same schedule for every target; 0 keeps sessions in lockstep.
    #[arg(long, default_value_t = 0.5)]
    think_jitter: f64,
    /// Use the HTTP ingress: every turn a streamed POST on a kept-alive connection to the same
    /// path (`ws://` in --url is read as `http://`).
    #[arg(long)]
    http: bool,
    /// With --http: non-streaming POSTs (`stream: false`), one JSON body per turn.
    #[arg(long, requires = "http")]
    http_json: bool,
    /// Reconnect (new socket, full request) before every turn, like Codex reconnecting.
    #[arg(long)]
    reconnect_every_turn: bool,
    /// Idle mode: one turn per session, then hold them all open this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_hold: Option<std::time::Duration>,
    /// In idle mode, report this process's RSS per held session; otherwise its peak RSS.
    #[arg(long)]
    rss_pid: Option<u32>,
    /// Report this process's CPU time (user + system, with descendants) during the run.
    #[arg(long)]
    cpu_pid: Option<u32>,
    /// The mock upstream's URL, to report its connection count.
    #[arg(long)]
    mock_url: Option<String>,
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    #[arg(long, default_value = "run")]
    label: String,
    /// Write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Offline demo: built-in mock upstream + gateway + scripted client.
    Demo,
    /// Run the mock upstream alone.
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: std::net::SocketAddr,
        /// Benchmark mode: batched writes, send timestamps in deltas.
        #[arg(long)]
        speed: bool,
        /// Simulated cost of a fresh connection's first turn (e.g. 50ms).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
        fresh_cost: std::time::Duration,
    },
    /// Load generator: N concurrent sessions x M turns against a ws:// URL.
    Loadgen(LoadgenArgs),
    /// Validate and print the effective config (secrets are never printed).
    CheckConfig,
}

/// The config file: `--config`, else `./gateway.yaml` (optional).
fn config_path(cli: &Cli) -> (PathBuf, bool) {
    match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("gateway.yaml"), false),
    }
}

fn load(cli: &Cli) -> Result<Config, ExitCode> {
    let (path, required) = config_path(cli);
    Config::load(&path, required).map_err(|e| {
        eprintln!("wsgate: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    wsgate::tls::install_ring_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        None | Some(Command::Run) => {
            let config = match load(&cli) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let (path, _) = config_path(&cli);
            runtime.block_on(run(config, path.exists().then_some(path)))
        }
        Some(Command::CheckConfig) => {
            let config = match load(&cli) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Err(e) = config.resolve_secrets(&|k| std::env::var(k).ok()) {
                eprintln!("wsgate: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            match serde_json::to_string_pretty(&config) {
                Ok(s) => println!("{s}"),
                Err(e) => eprintln!("wsgate: {e}"),
            }
            ExitCode::SUCCESS
        }
        Some(Command::Demo) => {
            wsgate::telemetry::init(&Default::default());
            match runtime.block_on(wsgate::demo::run()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("wsgate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Loadgen(args)) => runtime.block_on(loadgen(args)),
        Some(Command::MockUpstream {
            listen,
            speed,
            fresh_cost,
        }) => {
            wsgate::telemetry::init(&wsgate::config::LogConfig {
                level: "warn".into(),
                ..Default::default()
            });
            runtime.block_on(async move {
                match MockUpstream::start(MockConfig {
                    listen,
                    speed,
                    fresh_cost,
                    ..MockConfig::default()
                })
                .await
                {
                    Ok(mock) => {
                        println!("mock upstream listening on {}", mock.url());
                        let _ = tokio::signal::ctrl_c().await;
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("wsgate: cannot start the mock upstream on {listen}: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

async fn run(config: Config, path: Option<PathBuf>) -> ExitCode {
    wsgate::telemetry::init(&config.log);
    let secrets = match config.resolve_secrets(&|k| std::env::var(k).ok()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wsgate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let listen = config.listen;
    let grace = config.shutdown.grace;
    let gateway = match wsgate::Gateway::new(config, secrets) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("wsgate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let listener = match wsgate::listener::bind(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wsgate: cannot bind {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = path {
        let env: wsgate::reload::EnvLookup = std::sync::Arc::new(|k: &str| std::env::var(k).ok());
        wsgate::reload::spawn(gateway.clone(), path, env);
    }
    match wsgate::serve(gateway, listener, shutdown_signal(), grace).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsgate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT (graceful drain); a second one exits at once.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown signal received; draining (a second signal exits at once)");
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            eprintln!("wsgate: second signal, exiting now");
            std::process::exit(130);
        });
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn loadgen(a: LoadgenArgs) -> ExitCode {
    let run_id = format!(
        "lg{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let cfg = wsgate::loadgen::LoadgenConfig {
        url: a.url,
        key: a.key,
        sessions: a.sessions,
        turns: a.turns,
        deltas: a.deltas,
        delta_size: a.delta_size,
        delta_interval: a.delta_interval,
        think: a.think,
        think_jitter: a.think_jitter,
        reconnect_every_turn: a.reconnect_every_turn,
        idle_hold: a.idle_hold,
        rss_pid: a.rss_pid,
        cpu_pid: a.cpu_pid,
        mock_url: a.mock_url,
        connect_concurrency: a.connect_concurrency,
        label: a.label,
        run_id,
        http: a.http,
        http_json: a.http_json,
    };
    let report = wsgate::loadgen::run(cfg).await;
    print!("{}", wsgate::loadgen::table(&report));
    if let Some(path) = a.json {
        let json = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = std::fs::write(&path, json) {
            eprintln!("wsgate: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if report.errors > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}
