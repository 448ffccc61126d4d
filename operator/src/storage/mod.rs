//! Object stores opened from URIs, with the `object_store` crate: S3 and
//! S3-compatible servers (`s3://`), GCS (`gs://`), Azure Blob (`az://`,
//! `azure://`, `abfs[s]://` and `https://*.blob.core.windows.net/...`),
//! HTTP(S) (`http[s]://`) and local directories (`file://`, plain paths).
//! Used by the DataAsset controller (listing sources), `mlplane fetch`
//! (copying data into pods) and the tracking server's artifact proxy.
//!
//! Owns: turning a URI plus [`Credentials`] into a store and a prefix, the
//! client settings (timeouts, bounded retries) and the classification of
//! store errors into a few causes ([`Cause`]). Must not touch Kubernetes.
//! The manifest of what a location holds is [`manifest`]; copying it is
//! [`fetch`].
pub mod credentials;
pub mod fetch;
pub mod manifest;

use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path;
use object_store::{BackoffConfig, ClientConfigKey, ClientOptions, ObjectStore, ObjectStoreScheme, RetryConfig};

pub use credentials::Credentials;

/// A store and the prefix of a location in it.
#[derive(Clone, Debug)]
pub struct Location {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The path the URI points at (no leading or trailing `/`).
    pub prefix: Path,
    /// What kind of store.
    pub scheme: Scheme,
}

/// The kinds of store a URI can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// S3 or an S3-compatible server.
    S3,
    /// Google Cloud Storage.
    Gcs,
    /// Azure Blob Storage.
    Azure,
    /// Plain HTTP(S): objects by GET/HEAD, folders by WebDAV PROPFIND.
    Http,
    /// A directory of the local filesystem.
    Local,
}

impl Scheme {
    /// Remote object stores (what a DataAsset may name).
    pub fn is_remote(self) -> bool {
        !matches!(self, Scheme::Local)
    }
}

/// Why a store operation failed, in the few categories users act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cause {
    /// The URI cannot be used (scheme, shape).
    InvalidUri,
    /// No object or prefix at the location.
    NotFound,
    /// Credentials missing, wrong, or not allowed to read.
    AccessDenied,
    /// The server did not answer (connection refused, DNS, timeout).
    Unreachable,
    /// Anything else the server or client reported.
    Failed,
}

impl Cause {
    /// The CamelCase condition reason of the cause.
    pub fn reason(self) -> &'static str {
        match self {
            Cause::InvalidUri => "InvalidSource",
            Cause::NotFound => "SourceNotFound",
            Cause::AccessDenied => "AccessDenied",
            Cause::Unreachable => "SourceUnreachable",
            Cause::Failed => "ListFailed",
        }
    }
}

/// A failed store operation: its cause and a message safe to show (no
/// credential values).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StorageError {
    /// The category.
    pub cause: Cause,
    /// What happened.
    pub message: String,
}

impl StorageError {
    /// An error of the given cause.
    pub fn new(cause: Cause, message: impl Into<String>) -> Self {
        Self {
            cause,
            message: message.into(),
        }
    }

    /// Classifies an `object_store` error; `what` says what was attempted
    /// (`listing s3://bucket/x`), credential values are scrubbed.
    pub fn from_store(e: &object_store::Error, what: &str, credentials: &Credentials) -> Self {
        use object_store::Error as E;
        let cause = match e {
            E::NotFound { .. } => Cause::NotFound,
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => Cause::AccessDenied,
            E::InvalidPath { .. } | E::NotSupported { .. } | E::NotImplemented { .. } => Cause::InvalidUri,
            other => classify_text(&format!("{other:?}")),
        };
        Self::new(
            cause,
            credentials.redact(&format!("{what}: {}", one_line(&e.to_string()))),
        )
    }
}

/// Causes the client only reports as text (a status deep in a retry error,
/// a connect error): the server's answer first, then the transport.
fn classify_text(debug: &str) -> Cause {
    let d = debug.to_ascii_lowercase();
    let any = |words: &[&str]| words.iter().any(|w| d.contains(w));
    if any(&[
        "status code: 401",
        "status code: 403",
        "accessdenied",
        "invalidaccesskeyid",
        "signaturedoesnotmatch",
        "authorizationfailure",
        "authenticationfailed",
    ]) {
        Cause::AccessDenied
    } else if any(&["status code: 404", "nosuchbucket", "nosuchkey", "containernotfound"]) {
        Cause::NotFound
    } else if any(&[
        "connect",
        "dns error",
        "timed out",
        "timeout",
        "unreachable",
        "broken pipe",
        "reset by peer",
    ]) {
        Cause::Unreachable
    } else {
        Cause::Failed
    }
}

/// An error message on one line, at most 1,024 characters.
fn one_line(s: &str) -> String {
    let flat = s.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(1024) {
        Some((i, _)) => format!("{}...", &flat[..i]),
        None => flat,
    }
}

/// Client settings of every store: answers within 30 s, connections within
/// 5 s, at most 3 retries within 15 s (an unreachable source is reported in
/// seconds, not after the crate's default 3 minutes).
fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_timeout(Duration::from_secs(30))
        .with_connect_timeout(Duration::from_secs(5))
}

fn retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(3),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: Duration::from_secs(15),
    }
}

/// The scheme of a URI (`None` for a plain path, which is local).
pub fn scheme_of(uri: &str) -> Result<Scheme, StorageError> {
    let url = match url::Url::parse(uri) {
        Ok(u) if u.scheme().len() > 1 => u,
        _ => return Ok(Scheme::Local),
    };
    let (scheme, _) = ObjectStoreScheme::parse(&url).map_err(|_| unsupported(uri))?;
    Ok(match scheme {
        ObjectStoreScheme::AmazonS3 => Scheme::S3,
        ObjectStoreScheme::GoogleCloudStorage => Scheme::Gcs,
        ObjectStoreScheme::MicrosoftAzure => Scheme::Azure,
        ObjectStoreScheme::Http => Scheme::Http,
        ObjectStoreScheme::Local => Scheme::Local,
        _ => return Err(unsupported(uri)),
    })
}

fn unsupported(uri: &str) -> StorageError {
    let scheme = uri.split_once("://").map_or(uri, |(s, _)| s);
    StorageError::new(
        Cause::InvalidUri,
        format!("unsupported URI scheme {scheme:?} (use s3://, gs://, az://, http:// or https://)"),
    )
}

fn invalid(uri: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::new(Cause::InvalidUri, format!("cannot use {uri}: {e}"))
}

/// Opens the store `uri` names. Local paths must exist. Remote stores get
/// `credentials`; when they are [`Credentials::anonymous`] the requests are
/// unsigned (public data), so the process's own cloud identity is never
/// used on someone else's behalf.
pub fn open(uri: &str, credentials: &Credentials) -> Result<Location, StorageError> {
    let scheme = scheme_of(uri)?;
    if scheme == Scheme::Local {
        let dir = match url::Url::parse(uri) {
            Ok(u) if u.scheme() == "file" => u.to_file_path().map_err(|_| invalid(uri, "not a local path"))?,
            _ => std::path::PathBuf::from(uri),
        };
        // A single file: the store is its directory, the prefix its name.
        let (dir, prefix) = match (dir.is_file(), dir.parent(), dir.file_name()) {
            (true, Some(parent), Some(name)) => (parent.to_path_buf(), Path::from(name.to_string_lossy().as_ref())),
            _ => (dir, Path::default()),
        };
        let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| invalid(uri, e))?
            .with_automatic_cleanup(true);
        return Ok(Location {
            store: Arc::new(store),
            prefix,
            scheme,
        });
    }
    let url = url::Url::parse(uri).map_err(|e| invalid(uri, e))?;
    let (_, prefix) = ObjectStoreScheme::parse(&url).map_err(|e| invalid(uri, e))?;
    let anonymous = credentials.anonymous();
    let store: Arc<dyn ObjectStore> = match scheme {
        Scheme::S3 => {
            use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
            let mut b = AmazonS3Builder::new()
                .with_url(uri)
                .with_client_options(client_options())
                .with_retry(retry());
            for (k, v) in credentials.options() {
                if let Ok(key) = k.parse::<AmazonS3ConfigKey>() {
                    b = b.with_config(key, v);
                }
            }
            if let Some(endpoint) = credentials.setting(credentials::AWS_ENDPOINT_URL) {
                // An explicit http:// endpoint is a request for plain HTTP.
                if endpoint.starts_with("http://") && !credentials.has(credentials::AWS_ALLOW_HTTP) {
                    b = b.with_allow_http(true);
                }
                // S3-compatible servers are addressed by path (bucket in the path).
                b = b.with_virtual_hosted_style_request(false);
            }
            if anonymous {
                b = b.with_skip_signature(true);
            }
            Arc::new(b.build().map_err(|e| invalid(uri, e))?)
        }
        Scheme::Gcs => {
            use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
            let mut b = GoogleCloudStorageBuilder::new()
                .with_url(uri)
                .with_client_options(client_options())
                .with_retry(retry());
            for (k, v) in credentials.options() {
                if let Ok(key) = k.parse::<GoogleConfigKey>() {
                    b = b.with_config(key, v);
                }
            }
            if anonymous {
                b = b.with_skip_signature(true);
            }
            Arc::new(b.build().map_err(|e| invalid(uri, e))?)
        }
        Scheme::Azure => {
            use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
            let mut b = MicrosoftAzureBuilder::new()
                .with_url(uri)
                .with_client_options(client_options())
                .with_retry(retry());
            for (k, v) in credentials.options() {
                if let Ok(key) = k.parse::<AzureConfigKey>() {
                    b = b.with_config(key, v);
                }
            }
            if anonymous {
                b = b.with_skip_signature(true);
            }
            Arc::new(b.build().map_err(|e| invalid(uri, e))?)
        }
        Scheme::Http => {
            let base = &url[..url::Position::BeforePath];
            let mut b = object_store::http::HttpBuilder::new()
                .with_url(base)
                .with_client_options(client_options())
                .with_retry(retry());
            if url.scheme() == "http" {
                b = b.with_config(ClientConfigKey::AllowHttp, "true");
            }
            Arc::new(b.build().map_err(|e| invalid(uri, e))?)
        }
        Scheme::Local => unreachable!("handled above"),
    };
    Ok(Location { store, prefix, scheme })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        assert_eq!(scheme_of("s3://b/x/").unwrap(), Scheme::S3);
        assert_eq!(scheme_of("gs://b/x").unwrap(), Scheme::Gcs);
        assert_eq!(scheme_of("az://c/x").unwrap(), Scheme::Azure);
        assert_eq!(
            scheme_of("https://acct.blob.core.windows.net/c/x").unwrap(),
            Scheme::Azure
        );
        assert_eq!(scheme_of("https://example.com/data.csv").unwrap(), Scheme::Http);
        assert_eq!(scheme_of("file:///tmp/x").unwrap(), Scheme::Local);
        assert_eq!(scheme_of("relative/dir").unwrap(), Scheme::Local);
        let e = scheme_of("ftp://host/x").unwrap_err();
        assert_eq!(e.cause, Cause::InvalidUri);
        assert!(e.message.contains("\"ftp\""), "{e}");
    }

    #[test]
    fn prefixes_drop_slashes() {
        let creds = Credentials::from_pairs(
            [
                ("AWS_ACCESS_KEY_ID".into(), "k".into()),
                ("AWS_SECRET_ACCESS_KEY".into(), "s".into()),
                ("AWS_ENDPOINT_URL".into(), "http://127.0.0.1:9000".into()),
            ],
            "test",
        );
        let loc = open("s3://bucket/data/set/", &creds).unwrap();
        assert_eq!(loc.prefix.as_ref(), "data/set");
        assert_eq!(loc.scheme, Scheme::S3);
        let loc = open("https://example.com/a/b.csv", &Credentials::none()).unwrap();
        assert_eq!(loc.prefix.as_ref(), "a/b.csv");
    }

    #[test]
    fn errors_are_classified_and_redacted() {
        let creds = Credentials::from_pairs([("AWS_SECRET_ACCESS_KEY".into(), "topsecret".into())], "t");
        let e = object_store::Error::PermissionDenied {
            path: "x".into(),
            source: "signature topsecret rejected".into(),
        };
        let s = StorageError::from_store(&e, "listing s3://b/x", &creds);
        assert_eq!(s.cause, Cause::AccessDenied);
        assert!(!s.message.contains("topsecret"), "{}", s.message);
        assert!(s.message.starts_with("listing s3://b/x: "), "{}", s.message);
        assert_eq!(
            classify_text(
                "Generic { source: reqwest::Error { kind: Request, source: ConnectError(\"tcp connect error\", Connection refused) } }"
            ),
            Cause::Unreachable
        );
        assert_eq!(classify_text("something else"), Cause::Failed);
        assert_eq!(
            classify_text(
                "Error performing GET http://127.0.0.1:9/b?list-type=2 - Server returned non-2xx status code: 403 Forbidden: <Code>SignatureDoesNotMatch</Code>"
            ),
            Cause::AccessDenied
        );
    }
}
