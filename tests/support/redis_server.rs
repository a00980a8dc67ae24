//! A real Redis for the cluster tests: Debian's `redis-server` (installed by `.ci/run`).
//!
//! `.ci/run` starts one on a private unix socket and exports `WSGATE_TEST_REDIS_URL`; tests
//! that only need *a* Redis share it, each under its own key namespace. Tests that stop and
//! restart Redis, or count its commands, start their own with [`RedisServer::own`]. Without
//! `redis-server` the tests print why and skip.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct RedisServer {
    pub url: String,
    /// The socket (own servers only).
    socket: Option<PathBuf>,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

/// `redis-server` on the PATH (or in /usr/bin), if installed.
fn binary() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
}

fn skip(why: &str) {
    eprintln!(
        "\n!!! SKIPPED: {why}. The cluster tests need a real Redis: install Debian's \
         redis-server (.ci/run does) or set WSGATE_TEST_REDIS_URL. !!!\n"
    );
}

impl RedisServer {
    /// The shared server from `.ci/run`, else an own one; `None` (with a loud message) when
    /// there is neither.
    pub fn any() -> Option<RedisServer> {
        if let Ok(url) = std::env::var("WSGATE_TEST_REDIS_URL")
            && !url.is_empty()
        {
            return Some(RedisServer {
                url,
                socket: None,
                child: None,
                _dir: None,
            });
        }
        Self::own()
    }

    /// A private `redis-server` on a unix socket in a temp dir, stopped on drop.
    pub fn own() -> Option<RedisServer> {
        let Some(bin) = binary() else {
            skip("redis-server is not installed");
            return None;
        };
        let dir = tempfile::tempdir().ok()?;
        let socket = dir.path().join("redis.sock");
        let mut server = RedisServer {
            url: format!("redis+unix://{}", socket.display()),
            socket: Some(socket),
            child: None,
            _dir: Some(dir),
        };
        server.child = Some(server.spawn(&bin)?);
        Some(server)
    }

    fn spawn(&self, bin: &PathBuf) -> Option<Child> {
        let socket = self.socket.as_ref()?;
        let dir = socket.parent()?;
        let _ = std::fs::remove_file(socket);
        let child = Command::new(bin)
            .args(["--port", "0", "--unixsocket"])
            .arg(socket)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        for _ in 0..200 {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Some(child);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        skip("redis-server did not start");
        None
    }

    /// Stops an own server (SIGKILL: as abrupt as a crash or a network loss).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts an own server again on the same socket (empty: it saves nothing).
    pub fn restart(&mut self) {
        self.stop();
        let bin = binary().expect("redis-server");
        self.child = Some(self.spawn(&bin).expect("redis-server restarts"));
    }

    /// A connection for the test's own checks.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test Redis")
    }

    /// Total commands the server has run (`INFO commandstats`), minus the INFO itself.
    pub async fn commands(&self) -> u64 {
        let mut c = self.conn().await;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut c)
            .await
            .unwrap();
        info.lines()
            .filter(|l| l.starts_with("cmdstat_"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
