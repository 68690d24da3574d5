//! keygate: a hardware-backed signing service for provisioning tokens.
//!
//! With default features this is the whole service. With `default-features = false` only
//! [`token`] is built: the offline verifier an instance links, with no HSM code.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::await_holding_lock
)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod token;

#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "server")]
pub mod attest;
#[cfg(feature = "server")]
pub mod audit;
#[cfg(feature = "server")]
pub mod authority;
#[cfg(feature = "server")]
pub mod cli;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod keys;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod x509;
