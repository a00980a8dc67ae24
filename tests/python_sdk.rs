//! The real `openai` Python package against the HTTP ingress, offline against the mock:
//! `responses.create(stream=True)` and `stream=False`, an upstream error as `APIError` with its
//! status, and `models.list()` served by the mock to the account's key.
//!
//! The package comes from the venv `.ci/run` makes (`target/py-openai`), or one made here with
//! `python3 -m venv` + `pip install openai`; if neither works the test skips loudly.

mod support;

use std::path::PathBuf;

use support::*;
use wsgate::mock::{MockConfig, MockUpstream};

fn python_with_openai() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/py-openai");
    let python = venv.join("bin/python");
    let has_openai = |p: &PathBuf| {
        std::process::Command::new(p)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if python.exists() && has_openai(&python) {
        return Some(python);
    }
    eprintln!("creating {} with the openai package", venv.display());
    let made = std::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && std::process::Command::new("timeout")
            .args(["300"])
            .arg(venv.join("bin/pip"))
            .args(["install", "--quiet", "openai"])
            .status()
            .is_ok_and(|s| s.success());
    (made && has_openai(&python)).then_some(python)
}

const SCRIPT: &str = r#"
import json, os, openai
client = openai.OpenAI(base_url=os.environ["BASE_URL"], api_key=os.environ["API_KEY"], max_retries=0)
lane = os.environ["LANE"]
out = {}
events = []
stream = client.responses.create(model="gpt-5.5", input="hello [[mock: deltas=4]]", stream=True, prompt_cache_key=lane)
for ev in stream:
    events.append(ev.type)
out["stream_types"] = events
r = client.responses.create(model="gpt-5.5", input="again", prompt_cache_key=lane)
out["status"] = r.status
out["output_text"] = r.output_text
try:
    client.responses.create(model="gpt-5.5", input="[[mock: error=400:invalid_prompt]]", prompt_cache_key=lane + "-err")
    out["error"] = None
except openai.APIError as e:
    out["error"] = {"status": getattr(e, "status_code", None), "code": getattr(e, "code", None), "is_api_error": True}
out["models"] = [m.id for m in client.models.list().data]
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_package_works_through_the_http_ingress() {
    let Some(python) = python_with_openai() else {
        eprintln!(
            "\n!!!!!!!! SKIPPED the_openai_python_package_works_through_the_http_ingress: the openai Python package could not be installed from PyPI !!!!!!!!\n"
        );
        return;
    };
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let lane = unique("sdk");
    let out = tokio::process::Command::new(python)
        .args(["-c", SCRIPT])
        .env("BASE_URL", format!("http://{}/v1", gw.addr))
        .env("API_KEY", CLIENT_KEY)
        .env("LANE", &lane)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(120), out)
        .await
        .expect("the script finished")
        .expect("python ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python failed:\n{stdout}\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON from the script");
    let types: Vec<&str> = v["stream_types"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert_eq!(types.first(), Some(&"response.created"), "{types:?}");
    assert_eq!(types.last(), Some(&"response.completed"), "{types:?}");
    assert_eq!(
        types
            .iter()
            .filter(|t| **t == "response.output_text.delta")
            .count(),
        4
    );
    assert_eq!(v["status"], "completed");
    assert!(v["output_text"].as_str().unwrap().contains("delta"), "{v}");
    assert_eq!(v["error"]["status"], 400, "{v}");
    assert_eq!(v["error"]["code"], "invalid_prompt");
    assert_eq!(
        v["models"],
        serde_json::json!(["mock-model", "mock-model-mini"])
    );
    let models = mock.http_requests();
    assert_eq!(models.len(), 1);
    assert_eq!(
        models[0].authorization.as_deref(),
        Some(&*account_key("acct-a")),
        "served to the account's key"
    );
    // Both turns of the lane rode one upstream WebSocket.
    assert_eq!(decisions(&lane), ["new miss", "reuse -"]);
    gw.stop().await;
}
