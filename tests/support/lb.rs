//! Load balancers from Debian's packages (nginx, HAProxy) configured with the blocks of
//! docs/CLUSTER.md as documented (only the addresses replaced), and cluster instances (gateway
//! processes sharing one Redis). Each skips loudly when its part is missing.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wsgate::mock::MockUpstream;

use super::redis_server::RedisServer;
use super::{GatewayProcess, test_yaml};

/// A gateway process in the cluster `ns` (accounts acct-a and acct-b, `cluster.lease_ttl`
/// 3 s), with `extra` YAML sections appended; returns once it is connected to Redis.
pub fn instance(
    mock: &MockUpstream,
    redis: &RedisServer,
    ns: &str,
    id: &str,
    extra: &str,
) -> GatewayProcess {
    let yaml = test_yaml(&mock.url(), &["acct-a", "acct-b"], "")
        + &format!(
            "cluster:\n  redis_url: {}\n  instance_id: {id}\n  namespace: {ns}\n  lease_ttl: 3s\n",
            redis.url
        )
        + extra;
    let p =
        GatewayProcess::start_with_env(&yaml, &[("RUST_LOG", "info"), ("KEY_ACCT_B", "sk-acct-b")]);
    let started = Instant::now();
    while !p.stderr_text().contains("cluster connected") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "instance {id} connected to Redis: {}",
            p.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    p
}

/// The first fenced block of `lang` in docs/CLUSTER.md.
pub fn doc_block(lang: &str) -> String {
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

pub fn free_port() -> u16 {
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

pub struct Proxy {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    pub fn url(&self) -> String {
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

    pub fn nginx(a: SocketAddr, b: SocketAddr) -> Option<Proxy> {
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
        let mut cmd = Command::new(bin);
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .args(["-g", "daemon off;"]);
        Some(Proxy::spawn(cmd, port, dir))
    }

    pub fn haproxy(a: SocketAddr, b: SocketAddr) -> Option<Proxy> {
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
        let mut cmd = Command::new(bin);
        cmd.arg("-f").arg(&path).arg("-db");
        Some(Proxy::spawn(cmd, port, dir))
    }

    /// Runs the load balancer in the foreground and waits until it accepts on `port`.
    fn spawn(mut cmd: Command, port: u16, dir: tempfile::TempDir) -> Proxy {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the load balancer");
        Proxy {
            child,
            port,
            _dir: dir,
        }
        .wait_ready()
    }
}
