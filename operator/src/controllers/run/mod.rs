//! Runs: what Experiment runs, sweep trials and Pipeline steps share. One
//! builder of run Jobs ([`build`]), placeholder substitution
//! ([`substitute`]), the curated environment catalog ([`environment`]) and
//! deterministic names ([`names`]). Everything here is pure; the Experiment
//! and Pipeline controllers do the I/O.
pub mod build;
pub mod environment;
pub mod names;
pub mod substitute;
