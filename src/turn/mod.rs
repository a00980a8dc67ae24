//! The turn: what a client request becomes on an upstream connection, independent of the
//! ingress that carried it.
//!
//! - [`ledger`]: which upstream event answers which client event (turn integrity).

pub mod ledger;

pub use ledger::{Attribution, Ledger, Sent};
