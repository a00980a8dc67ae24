//! The load-balancer recipes of docs/CLUSTER.md, run exactly as documented (only the
//! addresses replaced) in front of two instances sharing a real Redis: Debian nginx, and
//! HAProxy when installed. Skipped loudly when a part is missing.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::redis_server::RedisServer;
use support::*;
use wsgate::client::{Client, create_body};
use wsgate::mock::{MockConfig, MockUpstream};

/// The first fenced block of `lang` in docs/CLUSTER.md.
fn doc_block(lang: &str) -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/CLUSTER.md"))
        .expect("docs/CLUSTER.md");
    let start = doc
        .find(&format!("```{lang}\n"))
        .unwrap_or_else(|| panic!("a ```{lang} block in docs/CLUSTER.md"))
        + lang.len()
        + 4;
    let len = doc[start..].find("```").expect("block end");
    doc[start..start + len].to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn installed(bin: &str) -> Option<String> {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin"]
        .iter()
        .map(|d| format!("{d}/{bin}"))
        .find(|p| std::path::Path::new(p).is_file())
}

struct Proxy {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/responses", self.port)
    }

    fn wait_ready(self) -> Proxy {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "the load balancer did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        self
    }

    fn nginx(a: SocketAddr, b: SocketAddr) -> Option<Proxy> {
        let Some(bin) = installed("nginx") else {
            eprintln!("\n!!! SKIPPED: nginx is not installed (.ci/run installs Debian's) !!!\n");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let port = free_port();
        let block = doc_block("nginx")
            .replace("10.0.0.11:8080", &a.to_string())
            .replace("10.0.0.12:8080", &b.to_string())
            .replace("listen 8080;", &format!("listen 127.0.0.1:{port};"));
        let conf = format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}; proxy_temp_path {d};\n\
             fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n{block}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx");
        Some(
            Proxy {
                child,
                port,
                _dir: dir,
            }
            .wait_ready(),
        )
    }

    fn haproxy(a: SocketAddr, b: SocketAddr) -> Option<Proxy> {
        let Some(bin) = installed("haproxy") else {
            eprintln!("\n!!! SKIPPED: haproxy is not installed (.ci/run installs Debian's) !!!\n");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let block = doc_block("haproxy")
            .replace("10.0.0.11:8080", &a.to_string())
            .replace("10.0.0.12:8080", &b.to_string())
            .replace("bind :8080", &format!("bind 127.0.0.1:{port}"));
        let conf = format!(
            "global\n    maxconn 256\ndefaults\n    mode http\n    timeout connect 5s\n    \
             timeout client 1h\n    timeout server 1h\n\n{block}"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new(bin)
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start haproxy");
        Some(
            Proxy {
                child,
                port,
                _dir: dir,
            }
            .wait_ready(),
        )
    }
}

fn instance(mock: &MockUpstream, redis: &RedisServer, ns: &str, id: &str) -> GatewayProcess {
    let yaml = test_yaml(&mock.url(), &["acct-a", "acct-b"], "")
        + &format!(
            "cluster:\n  redis_url: {}\n  instance_id: {id}\n  namespace: {ns}\nshutdown:\n  grace: 10s\n",
            redis.url
        );
    let p =
        GatewayProcess::start_with_env(&yaml, &[("RUST_LOG", "info"), ("KEY_ACCT_B", "sk-acct-b")]);
    let connected = std::time::Instant::now();
    while !p.stderr_text().contains("cluster connected") {
        assert!(
            connected.elapsed() < Duration::from_secs(10),
            "{}",
            p.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    p
}

/// Pool decisions `p` logged for session `s` (as lane or as affinity).
fn served(p: &GatewayProcess, s: &str) -> usize {
    p.stderr_text()
        .lines()
        .filter(|l| {
            l.contains("pool decision")
                && (l.contains(&format!("conversation={s} "))
                    || l.contains(&format!("affinity={s} ")))
        })
        .count()
}

/// A Codex process tree's headers: the root (no thread id) and two sub-agents, all with one
/// session id in the given spelling.
fn tree(session: &str, spelling: &'static str) -> Vec<Vec<(&'static str, String)>> {
    (0..3)
        .map(|k| {
            let mut h = vec![
                ("authorization", format!("Bearer {CLIENT_KEY}")),
                (spelling, session.to_string()),
            ];
            if k > 0 {
                h.push(("thread-id", format!("{session}-agent{k}")));
            }
            h
        })
        .collect()
}

async fn connect(url: &str, h: &[(&'static str, String)]) -> Client {
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Client::connect(url, &h)
        .await
        .expect("connect through the load balancer")
}

/// A turn without `prompt_cache_key`: the gateway can only key it by the headers that
/// crossed the load balancer (a dropped `session_id` would leave it without a lane).
async fn turn(c: &mut Client) {
    let t = c
        .turn(&create_body(None, "hello from a tree", None))
        .await
        .expect("turn");
    assert!(t.is_completed(), "{:?}", t.terminal());
}

/// Runs 10 process trees (alternating `session-id` / `session_id`) through `lb`; asserts each
/// tree reached exactly one instance, and that the trees were spread over both (the hash
/// key is the session, not only the client key). Returns the trees' roots, still connected.
async fn trees_stick(
    lb: &Proxy,
    a: &GatewayProcess,
    b: &GatewayProcess,
) -> Vec<(String, Vec<(&'static str, String)>, Client)> {
    let mut roots = Vec::new();
    for i in 0..10 {
        let session = unique(&format!("tree{i}"));
        let spelling = if i % 2 == 0 {
            "session-id"
        } else {
            "session_id"
        };
        let mut members = tree(&session, spelling).into_iter();
        let root_headers = members.next().unwrap();
        let mut root = connect(&lb.url(), &root_headers).await;
        turn(&mut root).await;
        for h in members {
            let mut agent = connect(&lb.url(), &h).await;
            turn(&mut agent).await;
            agent.close().await;
        }
        let (on_a, on_b) = (served(a, &session), served(b, &session));
        assert!(
            (on_a, on_b) == (3, 0) || (on_a, on_b) == (0, 3),
            "tree {i} ({spelling}) on one instance: A {on_a}, B {on_b}"
        );
        roots.push((session, root_headers, root));
    }
    let on_a = roots.iter().filter(|(s, _, _)| served(a, s) > 0).count();
    assert!(
        on_a > 0 && on_a < roots.len(),
        "10 sessions hashed onto both instances (all on one has odds 1/512): {on_a} on A"
    );
    roots
}

async fn setup(ns: &str) -> Option<(RedisServer, MockUpstream, GatewayProcess, GatewayProcess)> {
    let redis = RedisServer::any()?;
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let a = instance(&mock, &redis, ns, "A");
    let b = instance(&mock, &redis, ns, "B");
    Some((redis, mock, a, b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_keeps_a_codex_process_tree_on_one_instance_and_drains_to_the_other() {
    let Some((_redis, _mock, a, b)) = setup(&unique("nginx")).await else {
        return;
    };
    let Some(lb) = Proxy::nginx(a.addr, b.addr) else {
        return;
    };
    let mut roots = trees_stick(&lb, &a, &b).await;

    // Drain the instance that serves tree 0: its idle root gets 1012 and reconnects through
    // nginx, which now sends it to the other instance; the next turn completes there, on
    // the same account (the affinity is shared).
    let (session, headers, mut root) = roots.remove(0);
    let (mut draining, other) = if served(&a, &session) > 0 {
        (a, b)
    } else {
        (b, a)
    };
    let account_before = draining
        .stderr_text()
        .lines()
        .find(|l| l.contains("pool decision") && l.contains(&format!("conversation={session} ")))
        .and_then(|l| {
            l.split(" account=")
                .nth(1)?
                .split(' ')
                .next()
                .map(str::to_string)
        })
        .unwrap();
    draining.signal("TERM");
    let closed = tokio::time::timeout(Duration::from_secs(5), root.recv())
        .await
        .expect("the idle root is closed at once")
        .expect_err("closed, not a frame");
    assert_eq!(closed.close_code(), Some(1012), "{closed}");
    let mut again = connect(&lb.url(), &headers).await;
    turn(&mut again).await;
    let on_other: Vec<String> = other
        .stderr_text()
        .lines()
        .filter(|l| l.contains("pool decision") && l.contains(&format!("conversation={session} ")))
        .map(str::to_string)
        .collect();
    assert_eq!(on_other.len(), 1, "the next turn ran on the other instance");
    assert!(
        on_other[0].contains(&format!(" account={account_before} ")),
        "on the same account: {}",
        on_other[0]
    );
    again.close().await;
    drop(roots);
    let status = draining
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("the drained instance exits");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_keeps_a_codex_process_tree_on_one_instance() {
    let Some((_redis, _mock, a, b)) = setup(&unique("haproxy")).await else {
        return;
    };
    let Some(lb) = Proxy::haproxy(a.addr, b.addr) else {
        return;
    };
    let roots = trees_stick(&lb, &a, &b).await;
    assert_eq!(roots.len(), 10);
}
