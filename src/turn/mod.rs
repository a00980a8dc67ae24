//! The turn: what a client request becomes on an upstream connection, independent of the
//! ingress that carried it.
//!
//! - `engine`: one conversation's turns over a pooled upstream connection, for any ingress.
//! - [`ledger`]: which upstream event answers which client event (turn integrity).

pub(crate) mod engine;
pub mod ledger;

pub use crate::ids::Ingress;
pub use ledger::{Attribution, Ledger, Sent};
