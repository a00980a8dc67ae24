//! Hot reload: SIGHUP, or a change to the config file (its folder is watched, so editors that
//! replace the file by rename are seen), re-reads the config. A valid new config is applied
//! through [`Gateway::reload`]; an invalid one is rejected with a log line and the config in
//! force stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{error, warn};

use crate::config::Config;
use crate::error::ConfigError;
use crate::gateway::{Gateway, ReloadSummary};

/// Looks up an environment variable (secrets named by `*_env`).
pub type EnvLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Re-reads `path` and applies it. Errors are returned (and the old config stays in force).
pub fn reload_from(
    gateway: &Gateway,
    path: &Path,
    env: &EnvLookup,
) -> Result<ReloadSummary, ConfigError> {
    let config = Config::load(path, true)?;
    let secrets = config.resolve_secrets(env.as_ref())?;
    gateway.reload(config, secrets)
}

/// Watches `path` and SIGHUP until the gateway shuts down.
pub fn spawn(gateway: Gateway, path: PathBuf, env: EnvLookup) -> JoinHandle<()> {
    tokio::spawn(async move {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let file_name = path.file_name().map(|f| f.to_os_string());
        let watch_tx = tx.clone();
        let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev
                && (ev.kind.is_modify() || ev.kind.is_create() || ev.kind.is_remove())
                && ev
                    .paths
                    .iter()
                    .any(|p| p.file_name().map(|f| f.to_os_string()) == file_name)
            {
                // A full channel already holds a pending reload.
                let _ = watch_tx.try_send(());
            }
        });
        let _watcher = match watcher {
            Ok(mut w) => {
                let dir = path
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                if let Err(e) = w.watch(dir, RecursiveMode::NonRecursive) {
                    warn!(error = %e, dir = %dir.display(), "cannot watch the config folder; reload on SIGHUP only");
                }
                Some(w)
            }
            Err(e) => {
                warn!(error = %e, "cannot watch the config file; reload on SIGHUP only");
                None
            }
        };
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let shutdown = gateway.shared.shutdown.clone();
        loop {
            #[cfg(unix)]
            let hup_recv = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup_recv = std::future::pending::<Option<()>>();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = rx.recv() => {}
                _ = hup_recv => {}
            }
            // Editors write in several steps: let them finish, then read once.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while rx.try_recv().is_ok() {}
            if let Err(e) = reload_from(&gateway, &path, &env) {
                error!(error = %e, "config reload rejected; the config in force stays");
            }
        }
    })
}
