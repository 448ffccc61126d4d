//! The curated environment catalog: `environment: {name: pytorch-2-5-cuda12}`
//! resolves to an image through it.
//!
//! Owns: the catalog format, its built-in default and resolution of an
//! [`Environment`] to an image. Must not touch the API server. The chart
//! ships the catalog as values and mounts it as a file; the operator reads it
//! at start-up with [`Catalog::from_yaml`]. A catalog file replaces the
//! built-in set entirely (so an administrator can withdraw an image).
//!
//! Names are DNS labels, as `spec.environment.name` is (so no dots:
//! `pytorch-2-5-cuda12`, not `pytorch-2.5-cuda12`).
//!
//! Format:
//! ```yaml
//! environments:
//!   pytorch-2-5-cuda12: pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
//!   python-3-12: python:3.12-slim
//! ```
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::names::is_dns_label;
use crate::api::shared::Environment;

/// The built-in catalog, used when no catalog file is given. Tags are pinned:
/// a curated name must mean the same image tomorrow.
pub const BUILTIN: &[(&str, &str)] = &[
    ("pytorch-2-5-cuda12", "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"),
    ("tensorflow-2-18-cpu", "tensorflow/tensorflow:2.18.0"),
    ("tensorflow-2-18-cuda12", "tensorflow/tensorflow:2.18.0-gpu"),
    ("python-3-12", "python:3.12-slim"),
];

/// Curated environment name -> image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Name (a DNS label) -> image reference.
    pub environments: BTreeMap<String, String>,
}

impl Default for Catalog {
    fn default() -> Self {
        Self::builtin()
    }
}

/// A catalog file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Not YAML of the expected shape.
    #[error("environment catalog: {0}")]
    Parse(#[from] serde_yaml::Error),
    /// A name that `spec.environment.name` could never match.
    #[error("environment catalog: {0:?} is not a DNS label (a-z, 0-9, '-', at most 63)")]
    BadName(String),
    /// An empty image.
    #[error("environment catalog: {0:?} has an empty image")]
    EmptyImage(String),
}

/// An environment that does not resolve to an image.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvironmentError {
    /// A curated name that is not in the catalog.
    #[error("{field}.name: curated environment {name:?} is not in the catalog (known: {known})")]
    UnknownName {
        /// The field, e.g. `spec.environment`.
        field: String,
        /// The name asked for.
        name: String,
        /// Known names, comma-separated.
        known: String,
    },
    /// Neither image nor name (the API server's CEL rule normally prevents it).
    #[error("{field}: set exactly one of image or name")]
    Empty {
        /// The field, e.g. `spec.environment`.
        field: String,
    },
}

impl Catalog {
    /// The built-in catalog ([`BUILTIN`]).
    pub fn builtin() -> Self {
        Self {
            environments: BUILTIN.iter().map(|(n, i)| (n.to_string(), i.to_string())).collect(),
        }
    }

    /// Parses and checks a catalog file.
    pub fn from_yaml(yaml: &str) -> Result<Self, CatalogError> {
        let catalog: Self = serde_yaml::from_str(yaml)?;
        for (name, image) in &catalog.environments {
            if !is_dns_label(name) {
                return Err(CatalogError::BadName(name.clone()));
            }
            if image.trim().is_empty() {
                return Err(CatalogError::EmptyImage(name.clone()));
            }
        }
        Ok(catalog)
    }

    /// The image of `env`: its `image`, or its curated `name` looked up here.
    /// `field` is where `env` is in the spec (`spec.environment`,
    /// `spec.steps[1].environment`) and is used in errors. An image wins if
    /// both are set (the CEL rule forbids that).
    pub fn resolve(&self, env: &Environment, field: &str) -> Result<String, EnvironmentError> {
        if let Some(image) = &env.image {
            return Ok(image.clone());
        }
        let Some(name) = &env.name else {
            return Err(EnvironmentError::Empty {
                field: field.to_string(),
            });
        };
        self.environments
            .get(name)
            .cloned()
            .ok_or_else(|| EnvironmentError::UnknownName {
                field: field.to_string(),
                name: name.clone(),
                known: self.environments.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(n: &str) -> Environment {
        Environment {
            image: None,
            name: Some(n.into()),
        }
    }

    #[test]
    fn builtin_resolves_curated_names() {
        let c = Catalog::default();
        assert_eq!(c.environments.len(), BUILTIN.len());
        assert_eq!(
            c.resolve(&named("pytorch-2-5-cuda12"), "spec.environment").unwrap(),
            "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"
        );
        for (name, image) in BUILTIN {
            assert!(is_dns_label(name));
            assert!(image.contains(':'), "{image} must pin a tag");
        }
    }

    #[test]
    fn image_is_used_verbatim() {
        let env = Environment {
            image: Some("ghcr.io/me/train:1".into()),
            name: None,
        };
        assert_eq!(
            Catalog::builtin().resolve(&env, "spec.environment").unwrap(),
            "ghcr.io/me/train:1"
        );
    }

    #[test]
    fn unknown_name_names_the_field() {
        let e = Catalog::builtin()
            .resolve(&named("jax"), "spec.environment")
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("spec.environment.name: curated environment \"jax\" is not in the catalog (known: "),
            "{msg}"
        );
        assert!(msg.contains("python-3-12"), "{msg}");
        let e = Catalog::builtin()
            .resolve(&named("jax"), "spec.steps[1].environment")
            .unwrap_err();
        assert!(e.to_string().starts_with("spec.steps[1].environment.name:"));
        let e = Catalog::builtin()
            .resolve(&Environment::default(), "spec.environment")
            .unwrap_err();
        assert_eq!(e.to_string(), "spec.environment: set exactly one of image or name");
    }

    #[test]
    fn catalog_file_replaces_builtin() {
        let c = Catalog::from_yaml(
            "environments:\n  pytorch-2-5-cuda12: pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime\n  \
             jax-0-4: ghcr.io/nvidia/jax:jax-2024-10-01\n",
        )
        .unwrap();
        assert_eq!(c.environments.len(), 2);
        assert_eq!(
            c.resolve(&named("jax-0-4"), "spec.environment").unwrap(),
            "ghcr.io/nvidia/jax:jax-2024-10-01"
        );
        assert!(c.resolve(&named("python-3-12"), "spec.environment").is_err());
    }

    #[test]
    fn bad_catalogs_are_refused() {
        assert!(matches!(
            Catalog::from_yaml("environments:\n  Py_3: python:3\n"),
            Err(CatalogError::BadName(n)) if n == "Py_3"
        ));
        assert!(matches!(
            Catalog::from_yaml("environments:\n  py: \"\"\n"),
            Err(CatalogError::EmptyImage(_))
        ));
        assert!(matches!(
            Catalog::from_yaml("images: {}\n"),
            Err(CatalogError::Parse(_))
        ));
        assert!(matches!(
            Catalog::from_yaml("environments: [a]\n"),
            Err(CatalogError::Parse(_))
        ));
    }
}
