//! Object-store credentials, defined once for every place that opens a
//! store: the DataAsset controller (from the Secret `source.secretRef`
//! names), `mlplane fetch` in init containers (the same Secret as `envFrom`)
//! and the tracking server's artifact root (its own environment).
//!
//! Owns: the key names and turning them into `object_store` options. Values
//! are [`SecretString`]s: they are never printed (`Debug` shows key names
//! only) and [`Credentials::redact`] scrubs them from error messages before
//! those reach status, events or logs.
//!
//! Keys (a Secret's data keys, or environment variables):
//!
//! | Key | Store |
//! |---|---|
//! | `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` | S3 (and S3-compatible) |
//! | `AWS_SESSION_TOKEN` | S3, temporary credentials |
//! | `AWS_ENDPOINT_URL` | S3-compatible endpoint, e.g. `http://minio.storage:9000` |
//! | `AWS_REGION` | S3 region (default `us-east-1`) |
//! | `AWS_ALLOW_HTTP` | `true` to allow a plain-HTTP endpoint (implied by an `http://` `AWS_ENDPOINT_URL`) |
//! | `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY` | Azure Blob |
//! | `GOOGLE_SERVICE_ACCOUNT_KEY` | GCS: the service account's JSON key |
//!
//! Any other `AWS_*`, `AZURE_*` or `GOOGLE_*` key is passed on as the
//! `object_store` option of the same (lower-cased) name; unknown ones are
//! ignored. The same names are what AWS, Azure and Google SDKs read, so a
//! Secret with them works unchanged as `envFrom` of a training pod.
use std::collections::BTreeMap;

use secrecy::{ExposeSecret, SecretString};

/// S3 access key id.
pub const AWS_ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
/// S3 secret access key.
pub const AWS_SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
/// S3 session token (temporary credentials).
pub const AWS_SESSION_TOKEN: &str = "AWS_SESSION_TOKEN";
/// S3-compatible endpoint URL.
pub const AWS_ENDPOINT_URL: &str = "AWS_ENDPOINT_URL";
/// S3 region.
pub const AWS_REGION: &str = "AWS_REGION";
/// `true` to allow plain HTTP to the S3 endpoint.
pub const AWS_ALLOW_HTTP: &str = "AWS_ALLOW_HTTP";
/// Azure storage account name.
pub const AZURE_STORAGE_ACCOUNT_NAME: &str = "AZURE_STORAGE_ACCOUNT_NAME";
/// Azure storage account key.
pub const AZURE_STORAGE_ACCOUNT_KEY: &str = "AZURE_STORAGE_ACCOUNT_KEY";
/// GCS service account key (JSON).
pub const GOOGLE_SERVICE_ACCOUNT_KEY: &str = "GOOGLE_SERVICE_ACCOUNT_KEY";

/// The documented keys, for messages and docs.
pub const KEYS: [&str; 9] = [
    AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY,
    AWS_SESSION_TOKEN,
    AWS_ENDPOINT_URL,
    AWS_REGION,
    AWS_ALLOW_HTTP,
    AZURE_STORAGE_ACCOUNT_NAME,
    AZURE_STORAGE_ACCOUNT_KEY,
    GOOGLE_SERVICE_ACCOUNT_KEY,
];

const PREFIXES: [&str; 3] = ["AWS_", "AZURE_", "GOOGLE_"];

/// Keys that are settings, not secrets (kept in messages).
const SETTINGS: [&str; 4] = [AWS_ENDPOINT_URL, AWS_REGION, AWS_ALLOW_HTTP, "AWS_DEFAULT_REGION"];

/// Credentials for one store, by upper-case key.
#[derive(Clone, Default)]
pub struct Credentials {
    values: BTreeMap<String, SecretString>,
    /// Where they came from (`Secret "s3-creds"`, `the environment`), for messages.
    origin: Option<String>,
    /// Whether the process's own identity (instance metadata, workload
    /// identity) may be used when no key is set: true only for
    /// [`Credentials::from_env`], i.e. a process acting for itself.
    ambient: bool,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .field("origin", &self.origin)
            .field("ambient", &self.ambient)
            .finish()
    }
}

/// A credential that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("key {key} of {origin} is not UTF-8 text")]
pub struct CredentialError {
    /// The key.
    pub key: String,
    /// Where it came from.
    pub origin: String,
}

fn is_credential_key(key: &str) -> bool {
    let upper = key.to_ascii_uppercase();
    PREFIXES.iter().any(|p| upper.starts_with(p))
}

impl Credentials {
    /// No credentials: anonymous access.
    pub fn none() -> Self {
        Self::default()
    }

    /// The `AWS_*`, `AZURE_*` and `GOOGLE_*` variables of this process, which
    /// acts for itself: without them its ambient identity (instance
    /// metadata, workload identity) is used.
    pub fn from_env() -> Self {
        Self {
            ambient: true,
            ..Self::from_pairs(std::env::vars(), "the environment")
        }
    }

    /// From key/value pairs (keys matched case-insensitively).
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>, origin: &str) -> Self {
        let values = pairs
            .into_iter()
            .filter(|(k, _)| is_credential_key(k))
            .map(|(k, v)| (k.to_ascii_uppercase(), SecretString::from(v)))
            .collect();
        Self {
            values,
            origin: Some(origin.to_string()),
            ambient: false,
        }
    }

    /// From a Secret's `data` (`origin` names the Secret in messages).
    pub fn from_secret_data(
        data: &BTreeMap<String, k8s_openapi::ByteString>,
        origin: &str,
    ) -> Result<Self, CredentialError> {
        let mut values = BTreeMap::new();
        for (k, v) in data.iter().filter(|(k, _)| is_credential_key(k)) {
            let text = String::from_utf8(v.0.clone()).map_err(|_| CredentialError {
                key: k.clone(),
                origin: origin.to_string(),
            })?;
            values.insert(
                k.to_ascii_uppercase(),
                SecretString::from(text.trim_end_matches('\n').to_string()),
            );
        }
        Ok(Self {
            values,
            origin: Some(origin.to_string()),
            ambient: false,
        })
    }

    /// Whether any credential is set.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Whether requests must go unsigned: no key is set and the process's
    /// ambient identity must not stand in (the operator reading a user's
    /// source must not lend it its own cloud identity).
    pub fn anonymous(&self) -> bool {
        self.values.is_empty() && !self.ambient
    }

    /// Whether `key` is set.
    pub fn has(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    /// The keys that are set (never the values).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    /// The value of a non-secret key (endpoint, region, allow-http).
    pub(crate) fn setting(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(|v| v.expose_secret())
    }

    /// `object_store` options: lower-cased key, value.
    pub(crate) fn options(&self) -> impl Iterator<Item = (String, String)> + '_ {
        self.values
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.expose_secret().to_string()))
    }

    /// `text` with every credential value (of 4 or more characters; not the
    /// endpoint, region or allow-http settings) replaced by `<redacted>`: for
    /// error messages that quote a server's answer.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        // Longest first, so a value containing another is replaced whole.
        let mut secrets: Vec<&str> = self
            .values
            .iter()
            .filter(|(k, _)| !SETTINGS.contains(&k.as_str()))
            .map(|(_, v)| v.expose_secret())
            .filter(|v| v.len() >= 4)
            .collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        for s in secrets {
            out = out.replace(s, "<redacted>");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    #[test]
    fn secret_data_keeps_store_keys_only_and_never_prints_values() {
        let data = BTreeMap::from([
            (AWS_ACCESS_KEY_ID.to_string(), ByteString(b"AKIAEXAMPLE".to_vec())),
            (
                AWS_SECRET_ACCESS_KEY.to_string(),
                ByteString(b"s3cr3t-value\n".to_vec()),
            ),
            ("password".to_string(), ByteString(b"unrelated".to_vec())),
        ]);
        let c = Credentials::from_secret_data(&data, "Secret \"s3\"").unwrap();
        assert_eq!(c.keys().collect::<Vec<_>>(), [AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY]);
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr3t") && !shown.contains("AKIAEXAMPLE"), "{shown}");
        let opts: BTreeMap<String, String> = c.options().collect();
        assert_eq!(
            opts["aws_secret_access_key"], "s3cr3t-value",
            "trailing newline trimmed"
        );
        assert_eq!(
            c.redact("denied for AKIAEXAMPLE with s3cr3t-value"),
            "denied for <redacted> with <redacted>"
        );
        let c = Credentials::from_pairs([(AWS_ENDPOINT_URL.to_string(), "http://minio:9000".to_string())], "t");
        assert_eq!(c.redact("GET http://minio:9000/b"), "GET http://minio:9000/b");
    }

    #[test]
    fn non_utf8_values_are_refused_naming_the_key() {
        let data = BTreeMap::from([(AWS_SECRET_ACCESS_KEY.to_string(), ByteString(vec![0xff, 0xfe]))]);
        let e = Credentials::from_secret_data(&data, "Secret \"s3\"").unwrap_err();
        assert_eq!(
            e.to_string(),
            "key AWS_SECRET_ACCESS_KEY of Secret \"s3\" is not UTF-8 text"
        );
    }

    #[test]
    fn pairs_match_case_insensitively() {
        let c = Credentials::from_pairs(
            [
                ("aws_region".to_string(), "eu-west-1".to_string()),
                ("HOME".to_string(), "/root".to_string()),
            ],
            "test",
        );
        assert_eq!(c.setting(AWS_REGION), Some("eu-west-1"));
        assert!(!c.has("HOME"));
    }
}
