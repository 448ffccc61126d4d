//! DataAsset controller: versions data by content. A refresh lists the
//! source (`object_store`, with the credentials of `spec.source.secretRef`),
//! builds its manifest (key, size, ETag or last-modified per object) and
//! records it with the tracking server, which makes a new version only when
//! the manifest's digest changed and keeps every manifest durably. Status
//! shows the newest `retainVersions` versions; an unreachable source or bad
//! credentials set `SourceReachable=False` with the cause and keep every
//! version.
//!
//! Pure: [`refresh`] (schedule, status). I/O: [`reconcile`].
pub mod reconcile;
pub mod refresh;

pub use reconcile::run;
