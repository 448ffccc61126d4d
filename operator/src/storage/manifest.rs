//! What a location holds, as a manifest, and the manifest's digest: the
//! identity of a DataAsset version.
//!
//! Owns: the manifest format and its digest. Listing is the only I/O here;
//! everything else is pure.
//!
//! A manifest is one entry per object: its key (relative to the location),
//! its size and its tag: the ETag when the store gives one (S3, GCS, Azure,
//! most HTTP servers: it changes when the content does), else
//! `modified:<last-modified, RFC 3339>`. Entries are sorted by key (bytes).
//! The canonical text is the line [`FORMAT`] followed by one JSON array
//! `["<key>",<size>,"<tag>"]` per entry, each line ending in `\n`; JSON
//! escaping makes any key (newlines, tabs, quotes) unambiguous. The digest is
//! `sha256:` and the lower-case hex SHA-256 of that text. Two listings with
//! the same keys, sizes and tags have the same digest wherever they are;
//! any added, removed, resized or rewritten object changes it.
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Cause, Credentials, Location, StorageError};

/// First line of the canonical text (the format's version).
pub const FORMAT: &str = "mlplane-manifest/v1";

/// One object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Entry {
    /// Key relative to the location (for a single object: its file name).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// ETag, or `modified:<RFC 3339>` when the store has none.
    pub tag: String,
}

impl Entry {
    /// The entry of an object whose key relative to the location is `key`.
    pub fn of(key: String, meta: &ObjectMeta) -> Self {
        let tag = match &meta.e_tag {
            Some(e) if !e.is_empty() => e.clone(),
            _ => format!("modified:{}", rfc3339(meta)),
        };
        Self {
            key,
            size: meta.size,
            tag,
        }
    }

    fn line(&self) -> String {
        // serde_json of a (&str, u64, &str) tuple cannot fail.
        let mut line = serde_json::to_string(&(&self.key, self.size, &self.tag)).unwrap_or_default();
        line.push('\n');
        line
    }
}

/// An object's last-modified time in RFC 3339 (UTC, `Z`).
fn rfc3339(meta: &ObjectMeta) -> String {
    let t = &meta.last_modified;
    k8s_openapi::jiff::Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32)
        .map(|ts| ts.to_string())
        .unwrap_or_else(|_| t.timestamp().to_string())
}

/// The objects of a location, sorted by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    entries: Vec<Entry>,
}

impl Manifest {
    /// A manifest of `entries` (sorted here; later duplicates of a key are dropped).
    pub fn new(mut entries: Vec<Entry>) -> Self {
        entries.sort();
        entries.dedup_by(|b, a| a.key == b.key);
        Self { entries }
    }

    /// The manifest of the objects listed under `prefix`.
    pub fn from_listing(prefix: &Path, metas: impl IntoIterator<Item = ObjectMeta>) -> Self {
        let entries = metas
            .into_iter()
            .map(|m| {
                let key = relative(prefix, &m.location);
                Entry::of(key, &m)
            })
            .collect();
        Self::new(entries)
    }

    /// The entries, sorted by key.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Number of objects.
    pub fn files(&self) -> u64 {
        self.entries.len() as u64
    }

    /// Total size in bytes.
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// The canonical text (what is stored and hashed).
    pub fn text(&self) -> String {
        let mut out = String::with_capacity(FORMAT.len() + 1 + self.entries.len() * 64);
        out.push_str(FORMAT);
        out.push('\n');
        for e in &self.entries {
            out.push_str(&e.line());
        }
        out
    }

    /// `sha256:<hex>` of the canonical text, computed without building it.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        h.update(FORMAT.as_bytes());
        h.update(b"\n");
        for e in &self.entries {
            h.update(e.line().as_bytes());
        }
        format!("sha256:{:x}", h.finalize())
    }

    /// Parses a canonical text, checking it is canonical (format line,
    /// sorted unique keys), so that its digest is the digest of `text`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut lines = text.split_inclusive('\n');
        match lines.next() {
            Some(l) if l == format!("{FORMAT}\n") => {}
            _ => return Err(format!("a manifest starts with the line {FORMAT:?}")),
        }
        let mut entries: Vec<Entry> = Vec::new();
        for (i, line) in lines.enumerate() {
            let body = line
                .strip_suffix('\n')
                .ok_or_else(|| format!("line {}: does not end in a newline", i + 2))?;
            let (key, size, tag): (String, u64, String) =
                serde_json::from_str(body).map_err(|e| format!("line {}: {e}", i + 2))?;
            if entries.last().is_some_and(|prev| prev.key.as_str() >= key.as_str()) {
                return Err(format!("line {}: keys must be sorted and unique ({key:?})", i + 2));
            }
            let entry = Entry { key, size, tag };
            if entry.line() != line {
                return Err(format!("line {}: not in canonical form", i + 2));
            }
            entries.push(entry);
        }
        Ok(Self { entries })
    }
}

/// The digest of a canonical manifest text.
pub fn digest_of_text(text: &str) -> String {
    format!("sha256:{:x}", Sha256::digest(text.as_bytes()))
}

/// `location` relative to `prefix` (`a/b` under `a` is `b`).
pub fn relative(prefix: &Path, location: &Path) -> String {
    let p = prefix.as_ref();
    let l = location.as_ref();
    if p.is_empty() {
        return l.to_string();
    }
    l.strip_prefix(p)
        .and_then(|r| r.strip_prefix('/'))
        .unwrap_or(l)
        .to_string()
}

/// What a location is: one object, or every object under a prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// One object (`UriFile`).
    File,
    /// Every object under the prefix (`UriFolder`).
    Folder,
}

/// Lists `loc` into a manifest. `uri` is only used in messages. A folder
/// with no objects is an error (`NotFound`): an empty listing is far more
/// often a wrong prefix than an empty data set.
pub async fn list(
    loc: &Location,
    shape: Shape,
    uri: &str,
    credentials: &Credentials,
) -> Result<Manifest, StorageError> {
    match shape {
        Shape::File => {
            let meta = loc
                .store
                .head(&loc.prefix)
                .await
                .map_err(|e| StorageError::from_store(&e, &format!("reading {uri}"), credentials))?;
            let name = loc.prefix.filename().unwrap_or_default().to_string();
            Ok(Manifest::new(vec![Entry::of(name, &meta)]))
        }
        Shape::Folder => {
            // Each listed object becomes its entry at once: the listing's
            // metadata is never all held (a 100,000-object listing costs the
            // entries only).
            let prefix = Some(&loc.prefix).filter(|p| !p.as_ref().is_empty());
            let mut stream = loc.store.list(prefix);
            let mut entries = Vec::new();
            while let Some(m) = stream
                .try_next()
                .await
                .map_err(|e| StorageError::from_store(&e, &format!("listing {uri}"), credentials))?
            {
                entries.push(Entry::of(relative(&loc.prefix, &m.location), &m));
            }
            if entries.is_empty() {
                return Err(StorageError::new(Cause::NotFound, format!("no objects under {uri}")));
            }
            Ok(Manifest::new(entries))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(key: &str, size: u64, tag: &str) -> Entry {
        Entry {
            key: key.into(),
            size,
            tag: tag.into(),
        }
    }

    #[test]
    fn digest_is_order_independent_and_content_sensitive() {
        let a = Manifest::new(vec![e("b.csv", 2, "\"e2\""), e("a.csv", 1, "\"e1\"")]);
        let b = Manifest::new(vec![e("a.csv", 1, "\"e1\""), e("b.csv", 2, "\"e2\"")]);
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.digest(), digest_of_text(&a.text()));
        assert!(a.digest().starts_with("sha256:") && a.digest().len() == 7 + 64);
        for changed in [
            Manifest::new(vec![e("a.csv", 1, "\"e1\""), e("b.csv", 3, "\"e2\"")]),
            Manifest::new(vec![e("a.csv", 1, "\"e1\""), e("b.csv", 2, "\"e3\"")]),
            Manifest::new(vec![e("a.csv", 1, "\"e1\"")]),
            Manifest::new(vec![e("a.csv", 1, "\"e1\""), e("b.csv", 2, "\"e2\""), e("c", 0, "x")]),
            Manifest::new(vec![e("A.csv", 1, "\"e1\""), e("b.csv", 2, "\"e2\"")]),
        ] {
            assert_ne!(changed.digest(), a.digest(), "{changed:?}");
        }
        assert_eq!((a.files(), a.bytes()), (2, 3));
    }

    #[test]
    fn canonical_text_is_pinned() {
        let m = Manifest::new(vec![e("dir/x\ny", 10, "\"abc\"")]);
        assert_eq!(m.text(), "mlplane-manifest/v1\n[\"dir/x\\ny\",10,\"\\\"abc\\\"\"]\n");
        // The digest of this text never changes between versions of mlplane.
        assert_eq!(Manifest::default().digest(), digest_of_text("mlplane-manifest/v1\n"));
        assert_eq!(Manifest::parse(&m.text()).unwrap(), m);
    }

    #[test]
    fn parse_refuses_non_canonical_text() {
        assert!(Manifest::parse("nope\n").is_err());
        let unsorted = "mlplane-manifest/v1\n[\"b\",1,\"t\"]\n[\"a\",1,\"t\"]\n";
        assert!(Manifest::parse(unsorted).unwrap_err().contains("sorted"));
        let spaced = "mlplane-manifest/v1\n[\"a\", 1, \"t\"]\n";
        assert!(Manifest::parse(spaced).unwrap_err().contains("canonical"));
        let no_newline = "mlplane-manifest/v1\n[\"a\",1,\"t\"]";
        assert!(Manifest::parse(no_newline).is_err());
    }

    #[test]
    fn listing_keys_are_relative_and_last_modified_stands_in_for_etags() {
        let meta = |p: &str, etag: Option<&str>| ObjectMeta {
            location: Path::from(p),
            last_modified: Default::default(),
            size: 4,
            e_tag: etag.map(String::from),
            version: None,
        };
        let m = Manifest::from_listing(
            &Path::from("data/set"),
            [meta("data/set/b/2.txt", Some("\"x\"")), meta("data/set/a.txt", None)],
        );
        let keys: Vec<&str> = m.entries().iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["a.txt", "b/2.txt"]);
        assert_eq!(m.entries()[0].tag, "modified:1970-01-01T00:00:00Z");
        assert_eq!(relative(&Path::default(), &Path::from("x/y")), "x/y");
    }

    #[tokio::test]
    async fn lists_a_local_folder_and_file() {
        let dir = std::env::temp_dir().join(format!("mlplane-manifest-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.txt"), b"hello").unwrap();
        std::fs::write(dir.join("sub/b.txt"), b"hi").unwrap();
        let loc = crate::storage::open(dir.to_str().unwrap(), &Credentials::none()).unwrap();
        let m = list(&loc, Shape::Folder, "dir", &Credentials::none()).await.unwrap();
        assert_eq!(m.files(), 2);
        assert_eq!(m.bytes(), 7);
        let before = m.digest();
        std::fs::write(dir.join("c.txt"), b"new").unwrap();
        let m2 = list(&loc, Shape::Folder, "dir", &Credentials::none()).await.unwrap();
        assert_ne!(m2.digest(), before);
        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let loc = crate::storage::open(empty.to_str().unwrap(), &Credentials::none()).unwrap();
        let err = list(&loc, Shape::Folder, "empty", &Credentials::none())
            .await
            .unwrap_err();
        assert_eq!(err.cause, Cause::NotFound);
        let _ = std::fs::remove_dir_all(dir);
    }
}
