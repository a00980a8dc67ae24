//! How client requests enter: each ingress is an adapter that turns its transport into turns
//! for the turn `Engine` (`turn::engine`) and encodes what the engine yields.
//!
//! - `admit`: the checks every client request passes first (key, Origin, limits).
//! - `upgrade`: the WebSocket opening handshake, with the upstream acquired before the 101.
//! - `fast`: that handshake read and answered on the raw socket, without the HTTP stack (the
//!   usual case; anything unusual goes on to hyper).
//! - `client_io`: the client's socket under a session, whichever path its handshake took.
//! - `ws`: a client WebSocket session (Responses API WebSocket mode).
//! - `wake`: which of a session's sockets woke it (its loop polls only that one).
//! - `http`: `POST` on the same paths: one turn per request, as SSE or one JSON body.
//! - `body`: HTTP request bodies: bounded reading and `Content-Encoding` decoding.
//! - `passthrough`: `GET .../models` and `POST .../responses/compact`, relayed over HTTP.

pub(crate) mod admit;
pub(crate) mod body;
pub(crate) mod client_io;
pub(crate) mod fast;
pub(crate) mod http;
pub(crate) mod passthrough;
pub(crate) mod upgrade;
pub(crate) mod wake;
pub(crate) mod ws;
