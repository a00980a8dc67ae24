//! Shared helpers for integration tests: a gateway on 127.0.0.1:0 in front of the mock
//! upstream, log capture, unique ids, and polling.
#![allow(dead_code)]

pub mod lb;
pub mod redis_server;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use wsgate::client::Client;
use wsgate::config::{Config, Secrets};
use wsgate::mock::MockUpstream;
use wsgate::{Gateway, serve};

pub const CLIENT_KEY: &str = "test-client-key";

static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

struct Capture;
impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::env::var_os("WSGATE_TEST_LOG").is_some() {
            let _ = std::io::stderr().write_all(buf);
        }
        LOGS.get_or_init(Default::default)
            .lock()
            .unwrap()
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the log capture (once per test binary) and the ring TLS provider.
pub fn init() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        wsgate::tls::install_ring_provider();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("wsgate=debug")
            .with_ansi(false)
            .with_writer(|| Capture)
            .try_init();
    });
}

/// Captured log lines that contain every one of `needles`.
pub fn log_lines(needles: &[&str]) -> Vec<String> {
    let logs = LOGS.get_or_init(Default::default).lock().unwrap();
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

/// The `pool decision` lines of one conversation, as `decision reason` pairs, in order.
pub fn decisions(conversation: &str) -> Vec<String> {
    log_lines(&["pool decision", &format!("conversation={conversation} ")])
        .iter()
        .map(|l| {
            let field = |name: &str| {
                l.split(&format!(" {name}="))
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .unwrap_or("?")
                    .to_string()
            };
            format!("{} {}", field("decision"), field("reason"))
        })
        .collect()
}

/// The `pool evict` reasons logged for one conversation.
pub fn evictions(conversation: &str) -> Vec<String> {
    log_lines(&["pool evict", &format!("conversation={conversation} ")])
        .iter()
        .filter_map(|l| {
            l.split(" reason=")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .map(str::to_string)
        })
        .collect()
}

/// A unique id for this test run (conversation ids must not collide across tests).
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A mock upstream that writes each turn's events at once (`speed`): many frames per read at
/// the gateway, so its relay takes raw runs.
pub async fn speed_mock() -> MockUpstream {
    MockUpstream::start(wsgate::mock::MockConfig {
        speed: true,
        ..wsgate::mock::MockConfig::default()
    })
    .await
    .unwrap()
}

/// The test config as YAML: the mock as upstream, one client key (`TEST_CLIENT_KEY`),
/// `accounts` (keys from `KEY_<ACCOUNT>`), then the top-level sections in `extra`.
pub fn test_yaml(upstream_url: &str, accounts: &[&str], extra: &str) -> String {
    let mut yaml = format!(
        "listen: 127.0.0.1:0\nclients:\n  - name: test\n    key_env: TEST_CLIENT_KEY\nupstream:\n  url: {upstream_url}\n  connect_timeout: 5s\naccounts:\n"
    );
    for a in accounts {
        yaml.push_str(&format!(
            "  - id: {a}\n    api_key_env: KEY_{}\n",
            a.to_uppercase().replace('-', "_")
        ));
    }
    yaml.push_str(extra);
    yaml
}

/// Test config: the mock as upstream, one client key, accounts `acct-a`, `acct-b`, ...
pub fn config(upstream_url: &str, accounts: &[&str]) -> (Config, Secrets) {
    let config = Config::from_yaml(&test_yaml(upstream_url, accounts, "")).expect("test config");
    let secrets = config
        .resolve_secrets(&|k| match k {
            "TEST_CLIENT_KEY" => Some(CLIENT_KEY.into()),
            k => k
                .strip_prefix("KEY_")
                .map(|a| format!("sk-{}", a.to_lowercase().replace('_', "-"))),
        })
        .expect("test secrets");
    (config, secrets)
}

/// The credential the test config gives `account`.
pub fn account_key(account: &str) -> String {
    format!("Bearer sk-{account}")
}

pub struct TestGateway {
    pub addr: SocketAddr,
    pub gateway: Gateway,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestGateway {
    pub fn url(&self) -> String {
        format!("ws://{}/v1/responses", self.addr)
    }

    /// Connects as Codex does for `conversation` (session-id header) with the client key.
    pub async fn connect(&self, conversation: &str) -> Client {
        Client::connect(&self.url(), &self.codex_headers(conversation))
            .await
            .expect("connect to gateway")
    }

    pub fn codex_headers<'a>(&self, conversation: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            ("authorization", "Bearer test-client-key"),
            ("session-id", conversation),
            ("thread-id", conversation),
            ("x-client-request-id", conversation),
            ("openai-beta", "responses_websockets=2026-02-06"),
            ("originator", "codex_exec"),
        ]
    }

    /// One session of `conversation` with one completed turn, closed cleanly; returns once no
    /// connection is checked out and at least one idles in the pool.
    pub async fn warm(&self, conversation: &str) {
        let mut c = self.connect(conversation).await;
        let t = c
            .turn(&wsgate::client::create_body(Some(conversation), "hi", None))
            .await
            .unwrap();
        assert!(t.is_completed(), "{:?}", t.terminal());
        c.close().await;
        let pooled = || {
            let s = self.gateway.pool_stats();
            s.busy == 0 && s.idle >= 1
        };
        assert!(
            wait_until(Duration::from_secs(5), pooled).await,
            "the connection went back to the pool"
        );
    }

    /// Waits (up to 5 s) until nothing but idle pooled connections is left: no session,
    /// session task, HTTP connection, checkout or dial; one pump per pooled connection; the
    /// cap counters agree. `what` names the case in the failure message.
    pub async fn assert_quiescent(&self, what: &str) {
        self.assert_settled(0, what).await;
    }

    /// As [`assert_quiescent`](Self::assert_quiescent), with exactly `sessions` sessions
    /// between turns still connected (bystanders): a task and a checked-out upstream each.
    pub async fn assert_settled(&self, sessions: usize, what: &str) {
        let settled = || {
            let r = self.gateway.resources();
            if sessions == 0 {
                return r.quiescent();
            }
            r.sessions == sessions
                && r.session_tasks == sessions
                && r.pool_busy == sessions
                && wsgate::gateway::Resources {
                    sessions: 0,
                    session_tasks: 0,
                    pool_busy: 0,
                    pool_idle: r.pool_idle + r.pool_busy,
                    ..r
                }
                .quiescent()
        };
        assert!(
            wait_until(Duration::from_secs(5), settled).await,
            "{what}: resources not back to zero (besides {sessions} sessions): {:?}",
            self.gateway.resources()
        );
    }

    /// A session without a conversation id header (the id comes from the first request).
    pub async fn connect_without_conversation(&self) -> Client {
        Client::connect(&self.url(), &[("authorization", "Bearer test-client-key")])
            .await
            .expect("connect to gateway")
    }

    /// A session on its own conversation, to show that a fault elsewhere leaves it alone.
    pub async fn bystander(&self) -> Bystander {
        let conversation = unique("bystander");
        let client = self.connect(&conversation).await;
        Bystander {
            conversation,
            client,
        }
    }

    /// Which account the gateway assigns to `conversation`.
    pub fn account_of(&self, conversation: &str) -> String {
        self.gateway
            .assigned_account("test", conversation)
            .expect("a usable account")
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

/// A session streaming a slow turn while something else goes wrong.
pub struct Bystander {
    conversation: String,
    client: Client,
}

impl Bystander {
    const DELTAS: usize = 20;

    /// Starts a turn of 20 deltas, 10 ms apart.
    pub async fn start(&mut self) {
        let body = wsgate::client::create_body(
            Some(&self.conversation),
            "[[mock: deltas=20, interval=10]]",
            None,
        );
        self.client.send_json(&body).await.expect("bystander send");
    }

    /// Reads the turn to its end: it must be complete, every delta in order.
    pub async fn finish(&mut self, what: &str) {
        let t = self
            .client
            .read_turn()
            .await
            .unwrap_or_else(|e| panic!("{what}: bystander failed: {e}"));
        assert!(t.is_completed(), "{what}: bystander {:?}", t.terminal());
        assert_eq!(t.delta_count(), Self::DELTAS, "{what}: bystander deltas");
        let deltas: Vec<&str> = t
            .events
            .iter()
            .filter_map(|e| e["delta"].as_str())
            .collect();
        for (i, d) in deltas.iter().enumerate() {
            assert!(
                d.contains(&format!("delta {i}.")),
                "{what}: bystander delta {i} out of order: {d}"
            );
        }
    }

    pub async fn close(self) {
        self.client.close().await;
    }
}

/// Starts a gateway for `mock` with `accounts`, after `tweak` edits the config.
pub async fn start_gateway(
    mock: &MockUpstream,
    accounts: &[&str],
    tweak: impl FnOnce(&mut Config),
) -> TestGateway {
    init();
    let (mut config, secrets) = config(&mock.url(), accounts);
    tweak(&mut config);
    start_with(config, secrets).await
}

pub async fn start_with(config: Config, secrets: Secrets) -> TestGateway {
    init();
    let gateway = Gateway::new(config, secrets).expect("gateway");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        gateway.clone(),
        listener,
        async {
            let _ = rx.await;
        },
        Duration::from_secs(5),
    ));
    TestGateway {
        addr,
        gateway,
        stop: Some(tx),
        task: Some(task),
    }
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// Runs `turns` turns on `client`, each continuing the one before (`previous_response_id`),
/// asserting that every one completes; returns their response ids.
pub async fn run_chain(client: &mut Client, conversation: &str, turns: usize) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for i in 0..turns {
        let previous = ids.last().map(String::as_str);
        let body = wsgate::client::create_body(Some(conversation), &format!("turn {i}"), previous);
        let t = client.turn(&body).await.unwrap();
        assert!(t.is_completed(), "turn {i}: {:?}", t.terminal());
        ids.push(
            t.response_id()
                .expect("a completed turn has an id")
                .to_string(),
        );
    }
    ids
}

/// The gateway binary running as its own process (so its memory can be measured).
pub struct GatewayProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub stderr: std::sync::Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl GatewayProcess {
    /// Starts `wsgate run --config <yaml>` with the test secrets in its environment.
    pub fn start(yaml: &str) -> GatewayProcess {
        Self::start_with_env(yaml, &[("RUST_LOG", "info")])
    }

    pub fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> GatewayProcess {
        Self::start_wrapped(yaml, env, &[])
    }

    /// Starts the gateway under `wrapper` (e.g. `prlimit --as=...`), with `env`.
    pub fn start_wrapped(yaml: &str, env: &[(&str, &str)], wrapper: &[&str]) -> GatewayProcess {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, yaml).unwrap();
        let bin = env!("CARGO_BIN_EXE_wsgate");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = std::process::Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => std::process::Command::new(bin),
        };
        let mut child = cmd
            .args(["--config", path.to_str().unwrap(), "run"])
            .env("TEST_CLIENT_KEY", CLIENT_KEY)
            .env("KEY_ACCT_A", "sk-acct-a")
            .envs(env.iter().copied())
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn wsgate");
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("wsgate listening") {
                    let addr = match serde_json::from_str::<serde_json::Value>(&line) {
                        Ok(v) => v["addr"]
                            .as_str()
                            .and_then(|a| a.parse::<SocketAddr>().ok()),
                        Err(_) => line
                            .split("addr=")
                            .nth(1)
                            .and_then(|a| a.trim().parse::<SocketAddr>().ok()),
                    };
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .ok()
            .flatten()
            .unwrap_or_else(|| {
                panic!(
                    "gateway did not report its address: {}",
                    log.lock().unwrap()
                )
            });
        GatewayProcess {
            child,
            addr,
            stderr: log,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/v1/responses", self.addr)
    }

    /// `/status.json`.
    pub async fn status(&self) -> serde_json::Value {
        serde_json::from_str(&http_get(self.addr, "/status.json", None).await.1)
            .expect("status.json")
    }

    /// Waits (up to 10 s) until `/status.json` shows nothing but idle pooled connections: no
    /// session or session task, no busy or dialing slot, one pump per pooled connection, and
    /// no HTTP connection but the status request's own. Returns that status.
    pub async fn settle(&self) -> serde_json::Value {
        let mut s = self.status().await;
        for _ in 0..200 {
            let pooled_idle = s["pool"]["idle"].as_u64();
            if s["sessions_active"] == 0
                && s["tasks"]["sessions"] == 0
                && s["pool"]["busy"] == 0
                && s["pool"]["dialing"] == 0
                && s["tasks"]["upstream_pumps"].as_u64() == pooled_idle
                && s["tasks"]["http_connections"] == 1
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            s = self.status().await;
        }
        panic!("the gateway did not settle back to zero: {s}");
    }

    /// Connects for `conversation` and starts a 60-delta turn paced 25 ms apart (1.5 s in
    /// flight); returns once its first event arrived.
    pub async fn start_long_turn(&self, conversation: &str) -> wsgate::client::Client {
        let mut c = self.connect(conversation).await;
        c.send_json(&wsgate::client::create_body(
            Some(conversation),
            "[[mock: deltas=60, interval=25]]",
            None,
        ))
        .await
        .unwrap();
        c.recv().await.unwrap();
        c
    }

    /// Connects with the test client key for `conversation` (session-id header).
    pub async fn connect(&self, conversation: &str) -> wsgate::client::Client {
        let headers = [
            ("authorization", "Bearer test-client-key"),
            ("session-id", conversation),
        ];
        wsgate::client::Client::connect(&self.url(), &headers)
            .await
            .expect("connect to the gateway process")
    }

    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("gateway.yaml")
    }

    /// Sends a signal (`TERM`, `HUP`, ...) to the gateway process.
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args(["-s", sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the process to exit, at most `timeout`.
    /// Async, so in-process peers (the mock) keep running meanwhile.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Resident set size of the gateway process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WebSocket upgrade request for `conversation` as raw bytes (for clients that leave during
/// their own handshake).
pub fn raw_upgrade(conversation: &str) -> String {
    format!(
        "GET /v1/responses HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer test-client-key\r\nsession-id: {conversation}\r\n\r\n"
    )
}

/// Reads until the peer closes (EOF or reset); returns how long that took, or `None` if the
/// stream was still open after `max`.
pub async fn closed_within<S>(s: &mut S, max: Duration) -> Option<Duration>
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(started + max, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// A plain HTTP/1.1 GET on `addr` (with an optional bearer key): `(status, body)`.
pub async fn http_get(addr: SocketAddr, path: &str, bearer: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let auth = bearer
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // Chunked bodies: keep it simple for our small responses.
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&body)
    } else {
        body
    };
    (status, body)
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value of a Prometheus sample `name{labels}` with exactly these labels.
pub fn prom_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((head, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, label_text) = match head.split_once('{') {
            Some((m, l)) => (m, l.trim_end_matches('}')),
            None => (head, ""),
        };
        if metric != name {
            continue;
        }
        let mut found: Vec<(String, String)> = label_text
            .split(',')
            .filter(|p| !p.is_empty())
            .filter_map(|p| {
                p.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            })
            .collect();
        let mut want: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        found.sort();
        want.sort();
        if found == want {
            return value.parse().ok();
        }
    }
    None
}

/// An HTTP answer as the client saw it, body chunks with their arrival times.
pub struct HttpReply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub chunks: Vec<(tokio::time::Instant, bytes::Bytes)>,
    /// When the body ended.
    pub ended: tokio::time::Instant,
}

impl HttpReply {
    pub fn body(&self) -> Vec<u8> {
        self.chunks
            .iter()
            .flat_map(|(_, c)| c.iter().copied())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body()).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `data:` payloads of an event stream, parsed.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.text()
            .split("\n\n")
            .filter_map(|block| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .and_then(|d| serde_json::from_str(d).ok())
            })
            .collect()
    }
}

/// One HTTP/1.1 request to `addr` (the test client key unless `headers` has an
/// `authorization`), read to the end of its body (at most 60 s).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> HttpReply {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("HTTP handshake");
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "test");
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
    {
        req = req.header("authorization", format!("Bearer {CLIENT_KEY}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let read = async {
        let resp = sender.send_request(req).await.expect("response");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let mut body = resp.into_body();
        let mut chunks = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("body frame").into_data() {
                chunks.push((tokio::time::Instant::now(), data));
            }
        }
        HttpReply {
            status,
            headers,
            chunks,
            ended: tokio::time::Instant::now(),
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the HTTP answer ended in time")
}

/// A Responses create body for the HTTP ingress.
pub fn http_body(text: &str, stream: bool, extra: serde_json::Value) -> Vec<u8> {
    let mut v = serde_json::json!({
        "model": "gpt-5.5",
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}],
        "store": false,
        "stream": stream,
    });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    serde_json::to_vec(&v).unwrap()
}
