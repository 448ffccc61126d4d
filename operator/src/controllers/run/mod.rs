//! Runs: what Experiment runs, sweep trials and Pipeline steps share. One
//! builder of run Jobs ([`build`]), placeholder substitution
//! ([`substitute`]), the curated environment catalog ([`environment`]),
//! deterministic names ([`names`]), the artifact store layout
//! ([`artifacts`]) and inputs and outputs in the pod ([`inputs`]). Everything here is pure; the Experiment
//! and Pipeline controllers do the I/O.
pub mod artifacts;
pub mod build;
pub mod environment;
pub mod inputs;
pub mod names;
pub mod substitute;
