//! Integration tests against real SoftHSM2 tokens: a fresh token per test, real SQLite,
//! the real binary where the test is about the process (exit codes, logs, restarts).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

mod api_doc;
mod attest;
mod audit;
mod auth;
mod badinput;
mod certificates;
mod cli;
mod cli_full;
mod connections;
mod deploy;
mod ecosystem;
mod enroll;
mod faults;
mod hostile;
mod hsm;
mod http;
mod keyproof;
mod keyproof_wire;
mod machines;
mod network;
mod process;
mod redeem;
mod replicas;
mod revocation;
mod revocation_details;
mod rotation;
mod standards;
mod stream;
mod tls;
mod tpm;
