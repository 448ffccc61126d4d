//! Sweep sampling: which parameters trial N gets, and how many trials to
//! start now.
//!
//! Owns: Grid enumeration, seeded Random sampling and the trial budget. Must
//! not touch the API server or the tracking store. Trial N's parameters are a
//! pure function of the spec, the seed and N, so a restarted operator
//! recomputes them without any stored RNG state; trials are numbered from 0.
//!
//! Grid: the cartesian product of every `choice` (values in the order
//! written) and `randint` (every integer of `[min, max)`, ascending).
//! Parameters are taken in name order and the last name varies fastest (like
//! nested loops), so `{lr: [0.1, 0.01], wd: [0, 1]}` gives `(0.1, 0)`,
//! `(0.1, 1)`, `(0.01, 0)`, `(0.01, 1)`. `maxTrials` cuts the grid.
//!
//! Random: for trial N, a PCG-64 generator (`rand_pcg::Pcg64`, a fixed,
//! documented algorithm) is seeded with SHA-256 of (`mlplane-sweep/v1`, seed,
//! N), and each parameter, in name order, draws: `choice` a uniform index,
//! `uniform` `min + (max-min)·u`, `logUniform` `exp(ln min + (ln max - ln min)·u)`,
//! `randint` a uniform integer of `[min, max)`; `u` is the top 53 bits of a
//! 64-bit output over 2^53, integers use rejection sampling. These mappings
//! are written here rather than taken from `rand`'s distributions, whose
//! output may change between releases: an operator upgrade must not change
//! the parameters of a running sweep's trials. The seed is `spec.sweep.seed`,
//! or one derived from the Experiment's UID ([`seed`]).
use std::collections::BTreeMap;

use rand_core::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::api::experiment::{SearchDistribution, Sweep, SweepAlgorithm, SweepLimits};
use crate::api::shared::{ParamValue, Params};

/// Most trials of one sweep (the schema's maximum of `maxTrials`).
pub const MAX_TRIALS: u64 = 10_000;
/// Trials running at once when `maxConcurrentTrials` is not set. Not "all of
/// them": thousands of Jobs created at once only load the API server while
/// quota and capacity admit a few.
pub const DEFAULT_MAX_CONCURRENT_TRIALS: u64 = 16;

/// A search space that cannot be sampled (the API server's CEL rules
/// normally prevent these).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SweepError {
    /// Grid over a continuous distribution.
    #[error("spec.sweep.searchSpace.{0}: Grid needs choice or randint")]
    NotDiscrete(String),
    /// A distribution with no values.
    #[error("spec.sweep.searchSpace.{0}: no values to choose from")]
    Empty(String),
    /// None of choice, uniform, logUniform, randint.
    #[error("spec.sweep.searchSpace.{0}: set exactly one of choice, uniform, logUniform, randint")]
    NoDistribution(String),
    /// A range that is empty, not finite or (logUniform) not positive.
    #[error("spec.sweep.searchSpace.{0}: invalid range")]
    BadRange(String),
}

/// How many trials a sweep has in all, and how many may run at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrialLimits {
    /// Trials in all: Grid: grid size cut at `maxTrials`; Random:
    /// `maxTrials`. Never more than [`MAX_TRIALS`].
    pub total: u64,
    /// Trials running at once (`maxConcurrentTrials`, default
    /// [`DEFAULT_MAX_CONCURRENT_TRIALS`]), at least 1.
    pub max_concurrent: u64,
}

/// The seed of Random sampling: `spec.sweep.seed`, else the first 8 bytes of
/// SHA-256 of the Experiment's UID (stable for the object's lifetime).
pub fn seed(sweep: &Sweep, uid: &str) -> u64 {
    match sweep.seed {
        Some(s) => s as u64,
        None => {
            let d = Sha256::digest(uid.as_bytes());
            u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
        }
    }
}

/// The discrete values of one parameter on the grid, lazily.
enum Axis<'a> {
    Choice(&'a [ParamValue]),
    Range { min: i64, len: u64 },
}

impl Axis<'_> {
    fn len(&self) -> u64 {
        match self {
            Self::Choice(c) => c.len() as u64,
            Self::Range { len, .. } => *len,
        }
    }

    fn value(&self, i: u64) -> ParamValue {
        match self {
            Self::Choice(c) => c[i as usize].clone(),
            Self::Range { min, .. } => ParamValue(json!(min.wrapping_add(i as i64))),
        }
    }
}

fn span(min: i64, max: i64) -> Option<u64> {
    (min < max).then(|| (i128::from(max) - i128::from(min)) as u64)
}

fn axes(space: &BTreeMap<String, SearchDistribution>) -> Result<Vec<(&str, Axis<'_>)>, SweepError> {
    space
        .iter()
        .map(|(name, d)| {
            let axis = match (&d.choice, &d.randint) {
                (Some(c), _) if c.is_empty() => return Err(SweepError::Empty(name.clone())),
                (Some(c), _) => Axis::Choice(c),
                (None, Some(r)) => Axis::Range {
                    min: r.min,
                    len: span(r.min, r.max).ok_or_else(|| SweepError::BadRange(name.clone()))?,
                },
                (None, None) if d.uniform.is_some() || d.log_uniform.is_some() => {
                    return Err(SweepError::NotDiscrete(name.clone()));
                }
                (None, None) => return Err(SweepError::NoDistribution(name.clone())),
            };
            Ok((name.as_str(), axis))
        })
        .collect()
}

/// Number of grid points (saturating at `u64::MAX`).
pub fn grid_size(space: &BTreeMap<String, SearchDistribution>) -> Result<u64, SweepError> {
    Ok(axes(space)?
        .iter()
        .fold(1u64, |acc, (_, a)| acc.saturating_mul(a.len())))
}

/// Grid point `n` (0-based), or `None` past the end of the grid.
pub fn grid_trial(space: &BTreeMap<String, SearchDistribution>, n: u64) -> Result<Option<Params>, SweepError> {
    let axes = axes(space)?;
    let size = axes.iter().fold(1u64, |acc, (_, a)| acc.saturating_mul(a.len()));
    if n >= size {
        return Ok(None);
    }
    // Mixed radix, last axis least significant.
    let mut rest = n;
    let mut params = Params::new();
    for (name, axis) in axes.iter().rev() {
        params.insert(name.to_string(), axis.value(rest % axis.len()));
        rest /= axis.len();
    }
    Ok(Some(params))
}

/// A uniform float in `[0, 1)` from the top 53 bits.
fn unit(rng: &mut Pcg64) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A uniform integer in `[0, n)`, `n > 0`, by rejection (no modulo bias).
fn below(rng: &mut Pcg64, n: u64) -> u64 {
    let limit = u64::MAX - u64::MAX % n;
    loop {
        let x = rng.next_u64();
        if x < limit {
            return x % n;
        }
    }
}

fn trial_rng(seed: u64, n: u64) -> Pcg64 {
    let mut h = Sha256::new();
    h.update(b"mlplane-sweep/v1");
    h.update(seed.to_le_bytes());
    h.update(n.to_le_bytes());
    Pcg64::from_seed(h.finalize().into())
}

/// Parameters of Random trial `n` (0-based) with `seed`.
pub fn random_trial(space: &BTreeMap<String, SearchDistribution>, seed: u64, n: u64) -> Result<Params, SweepError> {
    let mut rng = trial_rng(seed, n);
    let mut params = Params::new();
    for (name, d) in space {
        let bad = || SweepError::BadRange(name.clone());
        let value = if let Some(c) = &d.choice {
            if c.is_empty() {
                return Err(SweepError::Empty(name.clone()));
            }
            c[below(&mut rng, c.len() as u64) as usize].clone()
        } else if let Some(r) = &d.uniform {
            if !(r.min.is_finite() && r.max.is_finite() && r.min < r.max) {
                return Err(bad());
            }
            let x = r.min + (r.max - r.min) * unit(&mut rng);
            ParamValue(json!(if x < r.max { x } else { r.min }))
        } else if let Some(r) = &d.log_uniform {
            if !(r.min.is_finite() && r.max.is_finite() && r.min > 0.0 && r.min < r.max) {
                return Err(bad());
            }
            let (lo, hi) = (r.min.ln(), r.max.ln());
            let x = (lo + (hi - lo) * unit(&mut rng)).exp();
            ParamValue(json!(x.clamp(r.min, r.max)))
        } else if let Some(r) = &d.randint {
            let len = span(r.min, r.max).ok_or_else(bad)?;
            ParamValue(json!(r.min.wrapping_add(below(&mut rng, len) as i64)))
        } else {
            return Err(SweepError::NoDistribution(name.clone()));
        };
        params.insert(name.clone(), value);
    }
    Ok(params)
}

/// Total and concurrent trials of a sweep.
pub fn trial_limits(sweep: &Sweep) -> Result<TrialLimits, SweepError> {
    let limits = sweep.limits.clone().unwrap_or_default();
    let max_trials = limits.max_trials.map(|m| m.max(0) as u64);
    let total = match sweep.algorithm {
        SweepAlgorithm::Grid => {
            let size = grid_size(&sweep.search_space)?;
            max_trials.map_or(size, |m| size.min(m))
        }
        // CEL requires maxTrials for Random.
        SweepAlgorithm::Random => max_trials.unwrap_or(MAX_TRIALS),
    }
    .min(MAX_TRIALS);
    Ok(TrialLimits {
        total,
        max_concurrent: concurrency(&limits),
    })
}

fn concurrency(limits: &SweepLimits) -> u64 {
    limits
        .max_concurrent_trials
        .map_or(DEFAULT_MAX_CONCURRENT_TRIALS, |c| c.max(1) as u64)
}

/// The sampled parameters of trial `n`, or `None` when `n` is past the
/// sweep's total. `seed` comes from [`seed`] (ignored by Grid).
pub fn trial_params(sweep: &Sweep, seed: u64, n: u64) -> Result<Option<Params>, SweepError> {
    if n >= trial_limits(sweep)?.total {
        return Ok(None);
    }
    match sweep.algorithm {
        SweepAlgorithm::Grid => grid_trial(&sweep.search_space, n),
        SweepAlgorithm::Random => random_trial(&sweep.search_space, seed, n).map(Some),
    }
}

/// The parameters a trial runs with: `spec.params` overridden by the sampled
/// ones.
pub fn merge_params(base: &Params, sampled: &Params) -> Params {
    let mut p = base.clone();
    p.extend(sampled.iter().map(|(k, v)| (k.clone(), v.clone())));
    p
}

/// How many trials to start now, given how many were ever started (trials
/// 0..total_started exist) and how many of them are still active. Never lets
/// active trials exceed `max_concurrent`, nor started ones exceed `total`.
/// The controller counts both from the sweep's Jobs (not from the bounded
/// status history) and starts trials `total_started..total_started + k`.
pub fn next_trials(total_started: u64, active: u64, limits: &TrialLimits) -> u64 {
    let by_total = limits.total.saturating_sub(total_started);
    let by_concurrency = limits.max_concurrent.saturating_sub(active);
    by_total.min(by_concurrency)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::experiment::{FloatRange, IntRange, Objective};

    fn choice(values: serde_json::Value) -> SearchDistribution {
        SearchDistribution {
            choice: Some(serde_json::from_value(values).unwrap()),
            ..Default::default()
        }
    }

    fn randint(min: i64, max: i64) -> SearchDistribution {
        SearchDistribution {
            randint: Some(IntRange { min, max }),
            ..Default::default()
        }
    }

    fn uniform(min: f64, max: f64) -> SearchDistribution {
        SearchDistribution {
            uniform: Some(FloatRange { min, max }),
            ..Default::default()
        }
    }

    fn log_uniform(min: f64, max: f64) -> SearchDistribution {
        SearchDistribution {
            log_uniform: Some(FloatRange { min, max }),
            ..Default::default()
        }
    }

    fn sweep(algorithm: SweepAlgorithm, space: &[(&str, SearchDistribution)], max_trials: Option<i32>) -> Sweep {
        Sweep {
            algorithm,
            seed: None,
            search_space: space.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            objective: Objective {
                metric: "val_accuracy".into(),
                goal: Default::default(),
            },
            limits: Some(SweepLimits {
                max_trials,
                max_concurrent_trials: Some(2),
                trial_timeout: None,
            }),
            early_termination: None,
        }
    }

    fn render(p: &Params) -> String {
        p.iter()
            .map(|(k, v)| format!("{k}={}", v.render()))
            .collect::<Vec<_>>()
            .join(",")
    }

    #[test]
    fn grid_order_is_name_order_last_fastest() {
        let s = sweep(
            SweepAlgorithm::Grid,
            &[
                ("wd", randint(0, 2)),
                ("lr", choice(json!([0.1, 0.01]))),
                ("opt", choice(json!(["adam", "sgd"]))),
            ],
            None,
        );
        assert_eq!(grid_size(&s.search_space).unwrap(), 8);
        let all: Vec<String> = (0..8)
            .map(|n| render(&trial_params(&s, 0, n).unwrap().unwrap()))
            .collect();
        assert_eq!(
            all,
            [
                "lr=0.1,opt=adam,wd=0",
                "lr=0.1,opt=adam,wd=1",
                "lr=0.1,opt=sgd,wd=0",
                "lr=0.1,opt=sgd,wd=1",
                "lr=0.01,opt=adam,wd=0",
                "lr=0.01,opt=adam,wd=1",
                "lr=0.01,opt=sgd,wd=0",
                "lr=0.01,opt=sgd,wd=1",
            ]
        );
        assert_eq!(trial_params(&s, 0, 8).unwrap(), None);
        // Integers stay integers.
        assert_eq!(grid_trial(&s.search_space, 1).unwrap().unwrap()["wd"].0, json!(1));
    }

    #[test]
    fn max_trials_cuts_the_grid() {
        let s = sweep(SweepAlgorithm::Grid, &[("lr", choice(json!([1, 2, 3, 4, 5])))], Some(3));
        let limits = trial_limits(&s).unwrap();
        assert_eq!(
            limits,
            TrialLimits {
                total: 3,
                max_concurrent: 2
            }
        );
        assert!(trial_params(&s, 0, 2).unwrap().is_some());
        assert_eq!(trial_params(&s, 0, 3).unwrap(), None);
        // A larger maxTrials does not extend it.
        let s = sweep(SweepAlgorithm::Grid, &[("lr", choice(json!([1, 2])))], Some(10));
        assert_eq!(trial_limits(&s).unwrap().total, 2);
    }

    #[test]
    fn huge_grids_saturate_and_cap() {
        let s = sweep(
            SweepAlgorithm::Grid,
            &[("a", randint(i64::MIN, i64::MAX)), ("b", randint(0, 1 << 40))],
            None,
        );
        assert_eq!(grid_size(&s.search_space).unwrap(), u64::MAX);
        assert_eq!(trial_limits(&s).unwrap().total, MAX_TRIALS);
        let p = grid_trial(&s.search_space, 1).unwrap().unwrap();
        assert_eq!(p["a"].0, json!(i64::MIN));
        assert_eq!(p["b"].0, json!(1));
    }

    #[test]
    fn grid_refuses_continuous_and_empty() {
        let s = sweep(SweepAlgorithm::Grid, &[("lr", uniform(0.0, 1.0))], None);
        assert_eq!(
            trial_limits(&s).unwrap_err().to_string(),
            "spec.sweep.searchSpace.lr: Grid needs choice or randint"
        );
        let s = sweep(SweepAlgorithm::Grid, &[("lr", choice(json!([])))], None);
        assert_eq!(trial_limits(&s).unwrap_err(), SweepError::Empty("lr".into()));
        let s = sweep(SweepAlgorithm::Grid, &[("n", randint(3, 3))], None);
        assert_eq!(trial_limits(&s).unwrap_err(), SweepError::BadRange("n".into()));
        let s = sweep(SweepAlgorithm::Grid, &[("n", SearchDistribution::default())], None);
        assert_eq!(trial_limits(&s).unwrap_err(), SweepError::NoDistribution("n".into()));
    }

    fn random_space() -> Sweep {
        sweep(
            SweepAlgorithm::Random,
            &[
                ("lr", log_uniform(1e-5, 1e-1)),
                ("wd", uniform(0.0, 0.1)),
                ("layers", randint(2, 9)),
                ("opt", choice(json!(["adam", "sgd", "lamb"]))),
            ],
            Some(200),
        )
    }

    #[test]
    fn random_is_reproducible_from_seed_and_trial_alone() {
        let s = random_space();
        let a: Vec<Params> = (0..50).map(|n| trial_params(&s, 42, n).unwrap().unwrap()).collect();
        // Recomputed in any order (as after a restart), same values.
        for n in (0..50).rev() {
            assert_eq!(trial_params(&s, 42, n).unwrap().unwrap(), a[n as usize]);
        }
        // Another seed gives other values; trials differ from each other.
        assert_ne!(trial_params(&s, 43, 0).unwrap().unwrap(), a[0]);
        assert_ne!(a[0], a[1]);
        assert_eq!(trial_params(&s, 42, 200).unwrap(), None);
    }

    #[test]
    fn random_values_stay_in_range_and_cover_it() {
        let s = random_space();
        let mut opts = std::collections::BTreeSet::new();
        let mut layers = std::collections::BTreeSet::new();
        let (mut small_lr, mut large_lr) = (0, 0);
        for n in 0..200 {
            let p = random_trial(&s.search_space, 7, n).unwrap();
            let lr = p["lr"].0.as_f64().unwrap();
            assert!((1e-5..1e-1).contains(&lr), "{lr}");
            if lr < 1e-3 {
                small_lr += 1;
            } else {
                large_lr += 1;
            }
            let wd = p["wd"].0.as_f64().unwrap();
            assert!((0.0..0.1).contains(&wd), "{wd}");
            let l = p["layers"].0.as_i64().expect("randint is an integer");
            assert!((2..9).contains(&l), "{l}");
            layers.insert(l);
            opts.insert(p["opt"].render());
        }
        assert_eq!(opts.len(), 3);
        assert_eq!(layers, (2..9).collect());
        // Log-uniform: about half the mass below the geometric midpoint 1e-3.
        assert!((60..140).contains(&small_lr) && large_lr > 60, "{small_lr} {large_lr}");
    }

    /// Pins the algorithm: if this changes, running sweeps would get other
    /// parameters after an operator upgrade.
    #[test]
    fn random_values_are_pinned() {
        let s = random_space();
        let p = random_trial(&s.search_space, 42, 0).unwrap();
        let q = random_trial(&s.search_space, 42, 1).unwrap();
        assert_eq!(render(&p), PINNED_0);
        assert_eq!(render(&q), PINNED_1);
    }

    const PINNED_0: &str = "layers=3,lr=0.0006295245315853128,opt=sgd,wd=0.021382680462278716";
    const PINNED_1: &str = "layers=8,lr=0.000010361131419634757,opt=lamb,wd=0.09362846945984565";

    #[test]
    fn seed_from_spec_or_uid() {
        let mut s = random_space();
        assert_eq!(seed(&s, "uid-a"), seed(&s, "uid-a"));
        assert_ne!(seed(&s, "uid-a"), seed(&s, "uid-b"));
        s.seed = Some(-1);
        assert_eq!(seed(&s, "uid-a"), u64::MAX);
        assert_eq!(seed(&s, "uid-b"), u64::MAX);
    }

    #[test]
    fn sampled_params_override_base() {
        let base: Params = serde_json::from_value(json!({"lr": 0.01, "epochs": 10})).unwrap();
        let sampled: Params = serde_json::from_value(json!({"lr": 0.1})).unwrap();
        let m = merge_params(&base, &sampled);
        assert_eq!(render(&m), "epochs=10,lr=0.1");
    }

    #[test]
    fn next_trials_respects_both_limits() {
        let l = TrialLimits {
            total: 4,
            max_concurrent: 2,
        };
        assert_eq!(next_trials(0, 0, &l), 2);
        assert_eq!(next_trials(2, 2, &l), 0);
        assert_eq!(next_trials(2, 1, &l), 1);
        assert_eq!(next_trials(3, 0, &l), 1);
        assert_eq!(next_trials(4, 0, &l), 0);
        // Inconsistent counts (more active than allowed, after a spec change) never underflow.
        assert_eq!(next_trials(5, 3, &l), 0);
        // Simulate a sweep: never more than 2 active, exactly 4 started.
        let (mut started, mut active, mut peak) = (0, 0, 0);
        while started < 4 || active > 0 {
            let k = next_trials(started, active, &l);
            started += k;
            active += k;
            peak = peak.max(active);
            active -= 1; // one finishes per tick
        }
        assert_eq!((started, peak), (4, 2));
        // Default concurrency.
        let s = sweep(SweepAlgorithm::Random, &[("x", uniform(0.0, 1.0))], Some(100));
        let s = Sweep {
            limits: Some(SweepLimits {
                max_trials: Some(100),
                ..Default::default()
            }),
            ..s
        };
        assert_eq!(trial_limits(&s).unwrap().max_concurrent, DEFAULT_MAX_CONCURRENT_TRIALS);
    }
}
