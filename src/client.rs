//! A small Responses-WebSocket client, shaped like Codex's traffic: used by `wsgate demo` and
//! by the tests to drive the gateway.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::event;

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("handshake refused with HTTP {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("connection closed by the gateway: {0:?}")]
    Closed(Option<CloseFrame>),
    #[error("websocket error: {0}")]
    Ws(#[from] tungstenite::Error),
    #[error("frame is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("timed out waiting for the gateway")]
    Timeout,
    #[error("turn did not complete: {0}")]
    TurnFailed(String),
}

impl ClientError {
    /// The close code, if the gateway closed the connection.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            ClientError::Closed(Some(f)) => Some(f.code.into()),
            _ => None,
        }
    }
}

/// The events of one turn, up to and including its terminal event.
#[derive(Debug, Clone)]
pub struct TurnOutcome {
    pub events: Vec<Value>,
}

impl TurnOutcome {
    pub fn terminal(&self) -> &Value {
        self.events.last().unwrap_or(&Value::Null)
    }

    pub fn terminal_type(&self) -> &str {
        self.terminal()["type"].as_str().unwrap_or("")
    }

    pub fn is_completed(&self) -> bool {
        self.terminal_type() == "response.completed"
    }

    /// `response.id` of the terminal event.
    pub fn response_id(&self) -> Option<&str> {
        self.terminal()["response"]["id"].as_str()
    }

    pub fn cached_tokens(&self) -> Option<u64> {
        self.terminal()["response"]["usage"]["input_tokens_details"]["cached_tokens"].as_u64()
    }

    /// How many `response.output_text.delta` events the turn had.
    pub fn delta_count(&self) -> usize {
        self.events
            .iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .count()
    }

    /// Concatenated `response.output_text.delta` text.
    pub fn text(&self) -> String {
        self.events
            .iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .filter_map(|e| e["delta"].as_str())
            .collect()
    }
}

/// A `response.create` shaped like Codex's (store=false, stream=true, prompt_cache_key).
pub fn create_body(
    conversation: Option<&str>,
    text: &str,
    previous_response_id: Option<&str>,
) -> Value {
    let mut body = json!({
        "type": "response.create",
        "model": "gpt-5.5",
        "instructions": "You are a test client.",
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}],
        "tools": [],
        "tool_choice": "auto",
        "parallel_tool_calls": false,
        "store": false,
        "stream": true,
    });
    if let Some(c) = conversation {
        body["prompt_cache_key"] = json!(c);
    }
    if let Some(p) = previous_response_id {
        body["previous_response_id"] = json!(p);
    }
    body
}

/// [`create_body`] already serialized, `type` first as Codex writes it (its request is an
/// internally tagged enum), without building a `Value`: the load generator sends one per turn.
pub fn create_text(
    conversation: Option<&str>,
    text: &str,
    previous_response_id: Option<&str>,
) -> String {
    let quoted = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut body = format!(
        concat!(
            r#"{{"type":"response.create","model":"gpt-5.5","instructions":"You are a test client.","#,
            r#""input":[{{"type":"message","role":"user","content":[{{"type":"input_text","text":{}}}]}}],"#,
            r#""tools":[],"tool_choice":"auto","parallel_tool_calls":false,"store":false,"stream":true"#
        ),
        quoted(text)
    );
    if let Some(c) = conversation {
        body.push_str(&format!(r#","prompt_cache_key":{}"#, quoted(c)));
    }
    if let Some(p) = previous_response_id {
        body.push_str(&format!(r#","previous_response_id":{}"#, quoted(p)));
    }
    body.push('}');
    body
}

/// The client's socket settings: tungstenite's defaults except 16 KiB reads and write
/// batches (its default 128 KiB read buffer is zero-filled before every read, and large
/// per-write buffers churn the allocator: page faults per turn for a load generator holding
/// thousands of sessions).
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(16 << 10)
        .write_buffer_size(16 << 10)
}

/// What tokio-tungstenite's connect functions return.
type ConnectResult = Result<
    (
        WebSocketStream<MaybeTlsStream<TcpStream>>,
        http::Response<Option<Vec<u8>>>,
    ),
    tungstenite::Error,
>;

/// The upgrade request for `url` with extra headers.
fn request(url: &str, headers: &[(&str, &str)]) -> Result<http::Request<()>, ClientError> {
    let mut req = url.into_client_request()?;
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            req.headers_mut().insert(k, v);
        }
    }
    Ok(req)
}

/// One client WebSocket.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Headers of the gateway's 101.
    pub response_headers: http::HeaderMap,
    timeout: Duration,
}

impl Client {
    /// Connects to `url` with extra upgrade headers (`authorization`, `session-id`, ...).
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> Result<Client, ClientError> {
        Self::finish(
            tokio_tungstenite::connect_async_with_config(
                request(url, headers)?,
                Some(ws_config()),
                false,
            )
            .await,
        )
    }

    /// Connects over wss:// trusting `tls` (tests, private CAs).
    pub async fn connect_tls(
        url: &str,
        headers: &[(&str, &str)],
        tls: std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<Client, ClientError> {
        let connector = tokio_tungstenite::Connector::Rustls(tls);
        let req = request(url, headers)?;
        Self::finish(
            tokio_tungstenite::connect_async_tls_with_config(
                req,
                Some(ws_config()),
                true,
                Some(connector),
            )
            .await,
        )
    }

    fn finish(result: ConnectResult) -> Result<Client, ClientError> {
        match result {
            Ok((ws, resp)) => Ok(Client {
                ws,
                response_headers: resp.headers().clone(),
                timeout: Duration::from_secs(20),
            }),
            Err(tungstenite::Error::Http(resp)) => Err(ClientError::Refused {
                status: resp.status().as_u16(),
                body: resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Sets how long [`Client::recv`] waits for one frame.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub async fn send_json(&mut self, v: &Value) -> Result<(), ClientError> {
        self.send_text(&v.to_string()).await
    }

    pub async fn send_text(&mut self, text: &str) -> Result<(), ClientError> {
        Ok(self.ws.send(Message::text(text)).await?)
    }

    pub async fn send_message(&mut self, m: Message) -> Result<(), ClientError> {
        Ok(self.ws.send(m).await?)
    }

    /// The next event (text frame as JSON). A close from the gateway is an error carrying it.
    pub async fn recv(&mut self) -> Result<Value, ClientError> {
        loop {
            let msg = tokio::time::timeout(self.timeout, self.ws.next())
                .await
                .map_err(|_| ClientError::Timeout)?;
            match msg {
                Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t)?),
                Some(Ok(Message::Close(f))) => return Err(ClientError::Closed(f)),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(ClientError::Closed(None)),
            }
        }
    }

    /// The next text frame, unparsed (the load generator's hot path).
    pub async fn recv_text(&mut self) -> Result<tungstenite::Utf8Bytes, ClientError> {
        loop {
            let msg = tokio::time::timeout(self.timeout, self.ws.next())
                .await
                .map_err(|_| ClientError::Timeout)?;
            match msg {
                Some(Ok(Message::Text(t))) => return Ok(t),
                Some(Ok(Message::Close(f))) => return Err(ClientError::Closed(f)),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(ClientError::Closed(None)),
            }
        }
    }

    /// Reads events until a terminal one.
    pub async fn read_turn(&mut self) -> Result<TurnOutcome, ClientError> {
        let mut events = Vec::new();
        loop {
            let ev = self.recv().await?;
            let terminal = event::is_terminal(ev["type"].as_str().unwrap_or(""));
            events.push(ev);
            if terminal {
                return Ok(TurnOutcome { events });
            }
        }
    }

    /// Sends `body` and reads its turn.
    pub async fn turn(&mut self, body: &Value) -> Result<TurnOutcome, ClientError> {
        self.send_json(body).await?;
        self.read_turn().await
    }

    /// Closes the connection cleanly.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }

    /// Drops the TCP connection without a close handshake (what Codex does on exit).
    pub fn abort(self) {
        drop(self.ws);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The load generator's hand-written create is the `Value`'s JSON, `type` first, with and
    /// without the optional keys, and with text that needs escaping.
    #[test]
    fn create_text_is_create_body_serialized() {
        for (conv, text, prev) in [
            (
                Some("conv-1"),
                "load [[mock: deltas=5, size=8]]",
                Some("resp_1"),
            ),
            (None, "plain", None),
            (Some("c\"2"), "line\nbreak \\ \"quoted\" \u{1}", None),
            (None, "", Some("resp_\u{e9}")),
        ] {
            let written = create_text(conv, text, prev);
            assert!(
                written.starts_with(r#"{"type":"response.create","#),
                "{written}"
            );
            let parsed: Value = serde_json::from_str(&written).expect("valid JSON");
            assert_eq!(parsed, create_body(conv, text, prev));
        }
    }
}
