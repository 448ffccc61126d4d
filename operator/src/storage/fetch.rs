//! `mlplane fetch`: copies one object, or every object under a prefix, into
//! a local directory. Init containers run it with the operator's own image
//! (DataAsset inputs in `mode: Download`, models of ModelDeployments), so any
//! training or serving image works without an object-store client.
//!
//! Owns: the copy. Credentials come from the environment (the names of
//! [`super::credentials`]; the pod gets the source's Secret as `envFrom`).
//!
//! - `--source` is any URI [`super::open`] takes, or `pvc://<claim>/<path>`,
//!   read from where the claim is mounted (`--pvc-root`, default
//!   [`PVC_MOUNT_ROOT`]: `<root>/<claim>/<path>`).
//! - A source ending in `/` is a prefix; otherwise it is one object if one
//!   exists there, else a prefix. One object lands as `<dest>/<its name>`;
//!   a prefix's objects as `<dest>/<key relative to the prefix>`.
//! - `--digest sha256:...`: the listing's manifest digest must equal it
//!   (the pinned DataAsset version), and each object must still have the
//!   ETag the manifest lists while it is copied; otherwise nothing is
//!   trusted and the command fails, naming what changed.
//! - Objects are written to `<file>.part` and renamed when complete, 8 at a
//!   time. Keys with `.`/`..` segments are refused.
use std::path::{Path as FsPath, PathBuf};

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use tokio::io::AsyncWriteExt;

use super::manifest::{self, Entry, Manifest, Shape};
use super::{Cause, Credentials, Location, StorageError};
use crate::controllers::run::artifacts::{PVC_MOUNT_ROOT, pvc_location};

/// Objects copied at once.
const PARALLEL: usize = 8;

/// Flags of `mlplane fetch`.
#[derive(clap::Args, Debug, Clone)]
pub struct FetchArgs {
    /// What to copy: `s3://`, `gs://`, `az://`, `http(s)://`, `file://`, a
    /// path, or `pvc://<claim>/<path>`.
    #[arg(long)]
    pub source: String,
    /// Directory to copy into (created if missing).
    #[arg(long)]
    pub dest: PathBuf,
    /// Expected manifest digest (`sha256:...`) of the source.
    #[arg(long)]
    pub digest: Option<String>,
    /// Where `pvc://<claim>` locations are mounted (`<root>/<claim>`).
    #[arg(long, env = "MLPLANE_PVC_ROOT", default_value = PVC_MOUNT_ROOT)]
    pub pvc_root: PathBuf,
}

/// What was copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// Objects copied.
    pub files: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// Digest of the source's manifest.
    pub digest: String,
}

/// A `pvc://<claim>/<path>` source as the local path it is mounted at.
pub fn local_source(source: &str, pvc_root: &FsPath) -> String {
    match pvc_location(source) {
        Some((claim, path)) => pvc_root.join(claim).join(path).to_string_lossy().into_owned(),
        None => source.to_string(),
    }
}

/// The destination file of manifest key `key`, refusing traversal.
pub fn dest_path(dest: &FsPath, key: &str) -> Result<PathBuf, StorageError> {
    let mut out = dest.to_path_buf();
    for seg in key.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." || seg.contains('\\') {
            return Err(StorageError::new(
                Cause::InvalidUri,
                format!("refusing to copy the object {key:?}: its key has an empty, '.' or '..' segment"),
            ));
        }
        out.push(seg);
    }
    Ok(out)
}

/// Copies `args.source` into `args.dest`.
pub async fn fetch(args: &FetchArgs) -> Result<Fetched, StorageError> {
    let credentials = Credentials::from_env();
    let source = local_source(&args.source, &args.pvc_root);
    let loc = super::open(&source, &credentials)?;
    let shape = shape_of(&loc, &source).await;
    let manifest = manifest::list(&loc, shape, &args.source, &credentials).await?;
    let digest = manifest.digest();
    if let Some(want) = &args.digest
        && want != &digest
    {
        return Err(StorageError::new(
            Cause::Failed,
            format!(
                "{} changed since the pinned version was recorded: its manifest digest is {digest}, not {want} \
                 (a new DataAsset version will pick the change up)",
                args.source
            ),
        ));
    }
    tokio::fs::create_dir_all(&args.dest)
        .await
        .map_err(|e| io_error(&args.dest, e))?;
    let verify = args.digest.is_some();
    futures::stream::iter(manifest.entries().iter().cloned())
        .map(|entry| copy_one(&loc, shape, entry, &args.dest, verify, &credentials, &args.source))
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(Fetched {
        files: manifest.files(),
        bytes: manifest.bytes(),
        digest,
    })
}

/// One object if one exists at the location (and it does not end in `/`),
/// else a prefix.
async fn shape_of(loc: &Location, source: &str) -> Shape {
    if source.ends_with('/') || loc.prefix.as_ref().is_empty() {
        return Shape::Folder;
    }
    match loc.store.head(&loc.prefix).await {
        Ok(_) => Shape::File,
        Err(_) => Shape::Folder,
    }
}

fn io_error(path: &FsPath, e: std::io::Error) -> StorageError {
    StorageError::new(Cause::Failed, format!("writing {}: {e}", path.display()))
}

async fn copy_one(
    loc: &Location,
    shape: Shape,
    entry: Entry,
    dest: &FsPath,
    verify: bool,
    credentials: &Credentials,
    source: &str,
) -> Result<(), StorageError> {
    let object = match shape {
        Shape::File => loc.prefix.clone(),
        Shape::Folder => {
            let mut p = loc.prefix.clone();
            for seg in entry.key.split('/') {
                p = p.join(seg);
            }
            p
        }
    };
    let target = dest_path(dest, &entry.key)?;
    if let Some(parent) = target.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| io_error(parent, e))?;
    }
    let got = loc
        .store
        .get(&object)
        .await
        .map_err(|e| StorageError::from_store(&e, &format!("reading {source} ({})", entry.key), credentials))?;
    if verify && !entry.tag.starts_with("modified:") && got.meta.e_tag.as_deref() != Some(entry.tag.as_str()) {
        return Err(changed(source, &entry));
    }
    let part = target.with_extension(match target.extension() {
        Some(ext) => format!("{}.part", ext.to_string_lossy()),
        None => "part".to_string(),
    });
    let mut file = tokio::fs::File::create(&part).await.map_err(|e| io_error(&part, e))?;
    let mut stream = got.into_stream();
    let mut written = 0u64;
    while let Some(chunk) = stream
        .try_next()
        .await
        .map_err(|e| StorageError::from_store(&e, &format!("reading {source} ({})", entry.key), credentials))?
    {
        written += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(|e| io_error(&part, e))?;
    }
    file.flush().await.map_err(|e| io_error(&part, e))?;
    drop(file);
    if verify && written != entry.size {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(changed(source, &entry));
    }
    tokio::fs::rename(&part, &target)
        .await
        .map_err(|e| io_error(&target, e))?;
    Ok(())
}

fn changed(source: &str, entry: &Entry) -> StorageError {
    StorageError::new(
        Cause::Failed,
        format!(
            "{source}: the object {:?} changed while it was copied (expected {} bytes, tag {})",
            entry.key, entry.size, entry.tag
        ),
    )
}

/// The manifest of a local directory (for tests of what was copied).
pub async fn local_manifest(dir: &FsPath) -> Result<Manifest, StorageError> {
    let loc = super::open(&dir.to_string_lossy(), &Credentials::none())?;
    manifest::list(&loc, Shape::Folder, &dir.to_string_lossy(), &Credentials::none()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mlplane-fetch-{name}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn keys_cannot_escape_the_destination() {
        let d = FsPath::new("/dest");
        assert_eq!(dest_path(d, "a/b.txt").unwrap(), PathBuf::from("/dest/a/b.txt"));
        for bad in ["../x", "a/../../x", "a//b", "./a", ""] {
            assert!(dest_path(d, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pvc_sources_are_read_where_the_claim_is_mounted() {
        assert_eq!(
            local_source("pvc://mlplane-artifacts/cache/k1/clean", FsPath::new("/mnt/pvc")),
            "/mnt/pvc/mlplane-artifacts/cache/k1/clean"
        );
        assert_eq!(local_source("s3://b/x", FsPath::new("/mnt/pvc")), "s3://b/x");
    }

    #[tokio::test]
    async fn copies_a_folder_a_file_and_checks_the_digest() {
        let src = temp("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("a.csv"), b"1,2\n").unwrap();
        std::fs::write(src.join("sub/b.csv"), b"3,4\n").unwrap();
        let want = local_manifest(&src).await.unwrap();

        let dest = temp("dest");
        let args = FetchArgs {
            source: format!("file://{}/", src.display()),
            dest: dest.clone(),
            digest: Some(want.digest()),
            pvc_root: PathBuf::from(PVC_MOUNT_ROOT),
        };
        let got = fetch(&args).await.unwrap();
        assert_eq!((got.files, got.bytes), (2, 8));
        assert_eq!(std::fs::read(dest.join("sub/b.csv")).unwrap(), b"3,4\n");

        // One object: lands under its own name.
        let one = temp("one");
        let args = FetchArgs {
            source: src.join("a.csv").to_string_lossy().into_owned(),
            dest: one.clone(),
            digest: None,
            pvc_root: PathBuf::from(PVC_MOUNT_ROOT),
        };
        assert_eq!(fetch(&args).await.unwrap().files, 1);
        assert_eq!(std::fs::read(one.join("a.csv")).unwrap(), b"1,2\n");

        // A pvc:// source through a mount root.
        let root = temp("pvcroot");
        std::fs::create_dir_all(root.join("claim/data")).unwrap();
        std::fs::write(root.join("claim/data/x.bin"), b"x").unwrap();
        let out = temp("pvcout");
        let args = FetchArgs {
            source: "pvc://claim/data".into(),
            dest: out.clone(),
            digest: None,
            pvc_root: root.clone(),
        };
        assert_eq!(fetch(&args).await.unwrap().files, 1);
        assert!(out.join("x.bin").exists());

        // The source changed since the digest was pinned.
        std::fs::write(src.join("c.csv"), b"new").unwrap();
        let args = FetchArgs {
            source: format!("{}/", src.display()),
            dest: temp("again"),
            digest: Some(want.digest()),
            pvc_root: PathBuf::from(PVC_MOUNT_ROOT),
        };
        let err = fetch(&args).await.unwrap_err();
        assert!(err.message.contains("changed since the pinned version"), "{err}");
        for d in [src, dest, one, root, out] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
