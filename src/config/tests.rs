use super::*;
use figment::Jail;

#[test]
fn defaults_are_valid_and_match_design() {
    let c = Config::default();
    c.validate().unwrap();
    assert_eq!(c.pool.max_age, Duration::from_secs(3300));
    assert_eq!(c.pool.idle_timeout, Duration::from_secs(600));
    assert_eq!(c.relay.buffer_frames, 64);
    assert_eq!(c.relay.max_message_size, ByteSize::mib(32));
    // One read per 16 KiB of a stream (bench/results/profile-stop38.md); the shipped
    // gateway.yaml says the same.
    assert_eq!(c.relay.read_buffer_size, ByteSize::kib(16));
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.yaml"))
        .expect("gateway.yaml ships with the crate");
    assert!(shipped.contains("read_buffer_size: 16KiB"));
}

#[test]
#[allow(clippy::result_large_err)] // figment's Jail signature
fn yaml_env_layering_and_humantime() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "gateway.yaml",
            "listen: 127.0.0.1:9000\npool:\n  max_age: 30m\n  max_total: 10\nrelay:\n  max_message_size: 1MiB\n",
        )?;
        jail.set_env("WSGATE_POOL__MAX_TOTAL", "12");
        jail.set_env("WSGATE_CLIENT_KEY", "not-a-config-key");
        let c = Config::load(Path::new("gateway.yaml"), true).expect("loads");
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.pool.max_age, Duration::from_secs(1800));
        assert_eq!(c.pool.max_total, 12, "env beats yaml");
        assert_eq!(c.relay.max_message_size, ByteSize::mib(1));
        assert_eq!(c.pool.max_per_account, 8, "defaults fill the rest");
        Ok(())
    });
}

#[test]
fn unknown_key_is_named() {
    let err = Config::from_yaml("pool:\n  max_aeg: 3m\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_aeg"), "{err}");
    assert!(err.contains("pool"), "{err}");
}

#[test]
fn bad_duration_is_named() {
    let err = Config::from_yaml("pool:\n  max_age: soon\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_age"), "{err}");
}

#[test]
fn empty_clients_only_on_loopback() {
    Config::from_yaml("clients: []\n").unwrap();
    let err = Config::from_yaml("listen: 0.0.0.0:8080\nclients: []\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("clients"), "{err}");
}

#[test]
fn handshake_limits_are_checked() {
    let c =
        Config::from_yaml("limits:\n  handshake_timeout: 2s\n  max_header_size: 32KiB\n").unwrap();
    assert_eq!(c.limits.handshake_timeout, Duration::from_secs(2));
    assert_eq!(c.limits.max_header_size, ByteSize::kib(32));
    for (yaml, key) in [
        (
            "limits:\n  handshake_timeout: 0s\n",
            "limits.handshake_timeout",
        ),
        ("limits:\n  max_handshakes: 0\n", "limits.max_handshakes"),
        (
            "limits:\n  max_header_size: 1KiB\n",
            "limits.max_header_size",
        ),
        (
            "limits:\n  max_header_size: 2MiB\n",
            "limits.max_header_size",
        ),
    ] {
        let err = Config::from_yaml(yaml).unwrap_err().to_string();
        assert!(err.contains(key), "{yaml}: {err}");
    }
}

#[test]
fn upstream_http_base_is_derived_or_configured() {
    let mut c = Config::default();
    assert_eq!(c.upstream_http_base().unwrap(), "https://api.openai.com/v1");
    c.upstream.url = "ws://127.0.0.1:9/backend-api/codex/responses".into();
    assert_eq!(
        c.upstream_http_base().unwrap(),
        "http://127.0.0.1:9/backend-api/codex"
    );
    c.upstream.http_url = Some("https://proxy.internal/v1/".into());
    assert_eq!(c.upstream_http_base().unwrap(), "https://proxy.internal/v1");
    c.upstream.http_url = Some("ftp://x".into());
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("upstream.http_url")
    );
}

#[test]
fn upstream_url_and_accounts_are_checked() {
    let err = Config::from_yaml("upstream:\n  url: http://x/v1/responses\n").unwrap_err();
    assert!(err.to_string().contains("upstream.url"), "{err}");
    let err = Config::from_yaml("accounts: []\n").unwrap_err();
    assert!(err.to_string().contains("accounts"), "{err}");
    let err = Config::from_yaml(
        "accounts:\n  - id: a\n    api_key_env: A\n  - id: a\n    api_key_env: B\n",
    )
    .unwrap_err();
    assert!(err.to_string().contains("duplicate"), "{err}");
}

#[test]
fn secrets_resolve_and_redact() {
    let c = Config::from_yaml("accounts:\n  - id: a\n    api_key_env: KEY_A\n").unwrap();
    let s = c
        .resolve_secrets(&|k| match k {
            "KEY_A" => Some("sk-secret".into()),
            "WSGATE_CLIENT_KEY" => Some("client-secret".into()),
            _ => None,
        })
        .unwrap();
    assert_eq!(s.accounts["a"], "sk-secret");
    let dbg = format!("{s:?}");
    assert!(
        !dbg.contains("sk-secret") && !dbg.contains("client-secret"),
        "{dbg}"
    );
    let err = c.resolve_secrets(&|_| None).unwrap_err().to_string();
    assert!(err.contains("WSGATE_CLIENT_KEY"), "{err}");
}
