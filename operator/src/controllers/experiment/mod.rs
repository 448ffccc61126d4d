//! The pure parts of the Experiment controller: checking a spec and resolving
//! one run's [`RunSpec`](crate::controllers::run::build::RunSpec)
//! ([`validate`]), sweep sampling ([`sweep`]), early termination of trials
//! ([`early_termination`]) and run status from Jobs and pods ([`status`]).
//! Run Jobs are built by [`crate::controllers::run::build`]; the I/O driver
//! is [`reconcile`].
pub mod early_termination;
pub mod observe;
pub mod reconcile;
pub mod status;
pub mod sweep;
pub mod validate;

pub use reconcile::run;
