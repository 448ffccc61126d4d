//! Deterministic, always-valid names and label values of run children.
//!
//! Owns: how a run (an Experiment run, a sweep trial or a Pipeline step) is
//! named, and how arbitrary object names become label values. Must not touch
//! the API server. Names are pure functions of their inputs, so a restarted
//! operator computes the same names and finds, never duplicates, its Jobs.
//!
//! Limits:
//! - A run name is also its Job name, the `batch.kubernetes.io/job-name`
//!   label value and, for Indexed Jobs, the prefix of each pod's hostname
//!   `<job>-<index>` (a DNS label, at most 63 characters). With up to 1024
//!   nodes the index takes at most 4 digits, so run names are at most
//!   [`MAX_RUN_NAME_LEN`] = 58 characters.
//! - Names that are too long, or that are not DNS labels (Experiment names
//!   are DNS subdomains and may contain dots), are cut and given an 8-hex-digit
//!   hash of the original, so two different experiments never share a run name.
use sha2::{Digest, Sha256};

/// Longest run (and Job) name: 63 minus `-<index>` of an Indexed Job pod's
/// hostname with at most 4 index digits (nodes <= 1024).
pub const MAX_RUN_NAME_LEN: usize = 58;
/// Longest label value.
pub const MAX_LABEL_VALUE_LEN: usize = 63;
/// Longest DNS label (Service names, hostnames).
pub const MAX_DNS_LABEL_LEN: usize = 63;

/// First 8 hex digits of the SHA-256 of `s`.
pub fn short_hash(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `s` is a DNS-1123 label: 1 to 63 of `a-z`, `0-9`, `-`, starting
/// and ending alphanumeric.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_DNS_LABEL_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `s` is a valid label value: empty, or at most 63 of
/// `A-Za-z0-9-_.`, starting and ending alphanumeric.
pub fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= MAX_LABEL_VALUE_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric())
}

/// `base` + `suffix` as a DNS label of at most `max` characters. When `base`
/// is already a DNS label and the result fits, it is `base + suffix`
/// verbatim; otherwise `base` is lowercased, every other character becomes
/// `-`, it is cut to fit and `-<hash of base>` is inserted before `suffix`.
/// `suffix` must be DNS-label characters and leave room for the hash
/// (`suffix.len() + 9 < max`).
pub fn dns_label_with_suffix(base: &str, suffix: &str, max: usize) -> String {
    if is_dns_label(base) && base.len() + suffix.len() <= max {
        return format!("{base}{suffix}");
    }
    let hash = short_hash(base);
    let keep = max.saturating_sub(suffix.len() + hash.len() + 1);
    let sanitized: String = base
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let cut = sanitized
        .get(..keep.min(sanitized.len()))
        .unwrap_or_default()
        .trim_matches('-');
    if cut.is_empty() {
        format!("{hash}{suffix}")
    } else {
        format!("{cut}-{hash}{suffix}")
    }
}

/// Name of the run `index` of an Experiment (and of its Job): `<exp>-<index>`.
pub fn run_name(experiment: &str, index: u64) -> String {
    dns_label_with_suffix(experiment, &format!("-{index}"), MAX_RUN_NAME_LEN)
}

/// Name of trial `trial` of sweep run `index`: `<exp>-<index>-t<trial>`.
pub fn trial_name(experiment: &str, index: u64, trial: u32) -> String {
    dns_label_with_suffix(experiment, &format!("-{index}-t{trial}"), MAX_RUN_NAME_LEN)
}

/// Name of the Job of a pipeline step: `<pipeline>-<runIndex>-<step>-<hash>`,
/// cut to fit. `<pipeline>-<index>-<step>` alone would be ambiguous (pipeline
/// `a-1`, run 2, step `x` and pipeline `a`, run 1, step `2-x` give the same
/// text, and step `2` of pipeline `a` run 1 would be Experiment `a-1`'s run
/// 2), so the hash of the three parts, joined by `/`, is always appended.
pub fn step_name(pipeline: &str, index: u64, step: &str) -> String {
    let hash = short_hash(&format!("{pipeline}/{index}/{step}"));
    let readable: String = format!("{pipeline}-{index}-{step}")
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let keep = MAX_RUN_NAME_LEN - hash.len() - 1;
    let cut = readable
        .get(..keep.min(readable.len()))
        .unwrap_or_default()
        .trim_matches('-');
    if cut.is_empty() { hash } else { format!("{cut}-{hash}") }
}

/// Name of the headless Service of a distributed run. Services must be
/// DNS-1035 labels (start with a letter): the run name itself when it does,
/// else `r<run name>`.
pub fn service_name(run: &str) -> String {
    if run.starts_with(|c: char| c.is_ascii_lowercase()) {
        run.to_string()
    } else {
        format!("r{run}")
    }
}

/// An object name as a label value: verbatim when valid, else cut to fit with
/// `-<hash>` appended. Used for `mlplane.io/experiment`, `mlplane.io/pipeline`
/// and `mlplane.io/compute-cluster` (names may be up to 253 characters).
/// Anything that selects by these labels, or labels and taints pool nodes,
/// must use this same function.
pub fn label_value(name: &str) -> String {
    if is_label_value(name) {
        return name.to_string();
    }
    let hash = short_hash(name);
    let keep = MAX_LABEL_VALUE_LEN - hash.len() - 1;
    let sanitized: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let cut = sanitized
        .get(..keep.min(sanitized.len()))
        .unwrap_or_default()
        .trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if cut.is_empty() { hash } else { format!("{cut}-{hash}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_verbatim() {
        assert_eq!(run_name("resnet", 3), "resnet-3");
        assert_eq!(trial_name("resnet", 3, 12), "resnet-3-t12");
        let step = step_name("sales", 2, "prep");
        assert!(
            step.starts_with("sales-2-prep-") && step.len() == "sales-2-prep-".len() + 8,
            "{step}"
        );
        assert_eq!(service_name("resnet-3"), "resnet-3");
        assert_eq!(service_name("1exp-3"), "r1exp-3");
        assert_eq!(label_value("resnet"), "resnet");
        assert_eq!(label_value("gpu.a100"), "gpu.a100");
    }

    #[test]
    fn long_names_are_cut_hashed_and_fit() {
        let long = "a".repeat(253);
        let other = format!("{}b", "a".repeat(252));
        for (a, b) in [
            (run_name(&long, 1), run_name(&other, 1)),
            (trial_name(&long, 1_000_000, 9999), trial_name(&other, 1_000_000, 9999)),
            (step_name(&long, 7, "train"), step_name(&other, 7, "train")),
            (label_value(&long), label_value(&other)),
        ] {
            // Run names fit in 58, label values in 63.
            assert!(a.len() <= MAX_LABEL_VALUE_LEN, "{a}");
            assert_ne!(a, b, "different inputs must not collide");
        }
        let n = trial_name(&long, 1_000_000, 9999);
        assert!(n.len() <= MAX_RUN_NAME_LEN && is_dns_label(&n), "{n}");
        assert!(n.ends_with("-1000000-t9999"), "{n}");
        assert!(is_label_value(&label_value(&long)));
        assert_eq!(label_value(&long).len(), MAX_LABEL_VALUE_LEN);
        // The indexed pod hostname of the longest run name still fits.
        let host = format!("{}-1023", run_name(&long, 42));
        assert!(host.len() <= MAX_DNS_LABEL_LEN && is_dns_label(&host), "{host}");
        // Deterministic.
        assert_eq!(run_name(&long, 1), run_name(&long, 1));
    }

    #[test]
    fn dotted_names_become_dns_labels_without_collisions() {
        let a = run_name("team.resnet", 1);
        let b = run_name("team-resnet", 1);
        assert!(is_dns_label(&a), "{a}");
        assert_eq!(b, "team-resnet-1");
        assert_ne!(a, b);
        assert!(a.starts_with("team-resnet-") && a.ends_with("-1"), "{a}");
        // Dots are fine in label values.
        assert_eq!(label_value("team.resnet"), "team.resnet");
    }

    #[test]
    fn step_names_are_unambiguous() {
        let p = "p".repeat(60);
        let a = step_name(&p, 1, "prep");
        let b = step_name(&p, 1, "train");
        assert_ne!(a, b);
        assert!(a.len() <= MAX_RUN_NAME_LEN && is_dns_label(&a), "{a}");
        // Same text, different parts.
        assert_ne!(step_name("a-1", 2, "x"), step_name("a", 1, "2-x"));
        // Never an Experiment's run name.
        assert_ne!(step_name("a", 1, "2"), run_name("a-1", 2));
        assert_eq!(step_name("a", 1, "2"), step_name("a", 1, "2"));
    }

    #[test]
    fn validity_checks() {
        assert!(is_dns_label("a-1"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("a.b"));
        assert!(!is_dns_label(""));
        assert!(is_label_value(""));
        assert!(is_label_value("A_b.c-1"));
        assert!(!is_label_value("a/b"));
        assert!(!is_label_value("_a"));
        assert_eq!(short_hash("x").len(), 8);
    }
}
