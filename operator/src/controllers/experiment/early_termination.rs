//! Early termination of sweep trials from their intermediate metrics.
//!
//! Owns: the MedianStopping and Bandit decisions. Must not touch the API
//! server or the tracking store: the controller reads each trial's history of
//! the objective metric and passes it in; it stops (cancels) the trials this
//! returns and marks them early-terminated.
//!
//! Exact semantics (Azure ML's policies, with Katib's median rule):
//! - A trial's history is its reports of the objective metric in step order
//!   (one value per step; the tracking store's latest value for a step).
//!   "Report k" is the k-th entry (1-based). A NaN report counts as the worst
//!   possible value, so a diverged trial is stopped.
//! - An active trial with n reports is evaluated at k = the largest report
//!   number <= n with k >= delayEvaluation and k a multiple of
//!   evaluationInterval (k >= 1). No such k: not evaluated yet. Only that
//!   latest evaluation point is checked, so the decision is a function of the
//!   current histories alone (restart-safe, no stored state).
//! - "Best by k" is the best of a trial's first k reports (max for
//!   Maximize, min for Minimize); its "running average at k" is the mean of
//!   its first k reports.
//! - MedianStopping: compare with every other trial (active or finished)
//!   that has at least k reports. Stop when there is at least one and the
//!   trial's best by k is strictly worse than the median of their running
//!   averages at k.
//! - Bandit: compare with every trial, itself included, that has at least k
//!   reports; the reference is the best of their bests by k. Stop when the
//!   trial's best by k is strictly worse than the reference allows:
//!   slackAmount a: Maximize `ref - a`, Minimize `ref + a`; slackFactor f:
//!   Maximize `ref - |ref|·f/(1+f)` (= `ref/(1+f)` for positive metrics, as
//!   Azure ML), Minimize `ref + |ref|·f` (= `ref·(1+f)`). The absolute values
//!   keep the rule sensible for negative metrics. The best trial is never
//!   stopped.
//! - "Strictly worse" allows a relative tolerance of 1e-9, so rounding
//!   (`0.8 - 0.2` vs `0.6`) never stops a trial that sits on the limit.
use std::collections::BTreeMap;

use crate::api::experiment::{EarlyTermination, EarlyTerminationPolicy, Goal};

/// `RunStatus.reason` of an early-terminated trial.
pub const EARLY_TERMINATED: &str = "EarlyTerminated";

/// One trial's objective metric history.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrialCurve {
    /// Run name of the trial.
    pub name: String,
    /// Step -> value of the objective metric.
    pub history: BTreeMap<i64, f64>,
    /// Whether the trial is still running (only those can be stopped).
    pub active: bool,
}

/// A trial to stop, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopDecision {
    /// Run name of the trial.
    pub trial: String,
    /// Human-readable reason (for the run's message and the event).
    pub reason: String,
}

fn worse(goal: Goal, a: f64, b: f64) -> bool {
    match goal {
        Goal::Maximize => a < b,
        Goal::Minimize => a > b,
    }
}

/// `a` worse than the limit `b`, with a relative tolerance so that
/// `0.8 - 0.2` is not "worse" than `0.6`.
fn worse_than(goal: Goal, a: f64, b: f64) -> bool {
    let tol = 1e-9 * b.abs().max(1.0);
    match goal {
        Goal::Maximize => a < b - tol,
        Goal::Minimize => a > b + tol,
    }
}

/// A number for a message: at most 6 decimals, trailing zeros trimmed.
fn num(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    let s = format!("{x:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

fn worst(goal: Goal) -> f64 {
    match goal {
        Goal::Maximize => f64::NEG_INFINITY,
        Goal::Minimize => f64::INFINITY,
    }
}

/// Reports in step order, NaN as the worst value.
fn reports(curve: &TrialCurve, goal: Goal) -> Vec<f64> {
    curve
        .history
        .values()
        .map(|v| if v.is_nan() { worst(goal) } else { *v })
        .collect()
}

fn best(goal: Goal, values: &[f64]) -> f64 {
    values
        .iter()
        .copied()
        .fold(worst(goal), |b, v| if worse(goal, b, v) { v } else { b })
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The report number an active trial with `n` reports is evaluated at.
pub fn evaluation_point(policy: &EarlyTermination, n: usize) -> Option<usize> {
    let interval = policy.evaluation_interval.max(1) as usize;
    let first = (policy.delay_evaluation.max(0) as usize).max(1);
    let k = n - n % interval;
    (k >= first && k >= 1).then_some(k)
}

/// The trials to stop now.
pub fn decide(policy: &EarlyTermination, goal: Goal, metric: &str, trials: &[TrialCurve]) -> Vec<StopDecision> {
    let series: Vec<Vec<f64>> = trials.iter().map(|t| reports(t, goal)).collect();
    let mut stops = Vec::new();
    for (i, t) in trials.iter().enumerate() {
        if !t.active {
            continue;
        }
        let Some(k) = evaluation_point(policy, series[i].len()) else {
            continue;
        };
        let own = best(goal, &series[i][..k]);
        let reason = match policy.policy {
            EarlyTerminationPolicy::MedianStopping => {
                let averages: Vec<f64> = series
                    .iter()
                    .enumerate()
                    .filter(|(j, s)| *j != i && s.len() >= k)
                    .map(|(_, s)| mean(&s[..k]))
                    .collect();
                if averages.is_empty() {
                    continue;
                }
                let count = averages.len();
                let m = median(averages);
                worse_than(goal, own, m).then(|| {
                    format!(
                        "MedianStopping at report {k}: best {metric} {} is worse than {}, the median of the \
                         running averages of {count} other trial(s)",
                        num(own),
                        num(m)
                    )
                })
            }
            EarlyTerminationPolicy::Bandit => {
                let Some((leader, reference)) = series
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.len() >= k)
                    .map(|(j, s)| (j, best(goal, &s[..k])))
                    .reduce(|a, b| if worse(goal, a.1, b.1) { b } else { a })
                else {
                    continue;
                };
                let (threshold, slack) = match (policy.slack_amount, policy.slack_factor) {
                    (Some(a), _) => (
                        match goal {
                            Goal::Maximize => reference - a,
                            Goal::Minimize => reference + a,
                        },
                        format!("slackAmount {a}"),
                    ),
                    (None, Some(f)) => (
                        match goal {
                            Goal::Maximize => reference - reference.abs() * f / (1.0 + f),
                            Goal::Minimize => reference + reference.abs() * f,
                        },
                        format!("slackFactor {f}"),
                    ),
                    (None, None) => continue,
                };
                worse_than(goal, own, threshold).then(|| {
                    format!(
                        "Bandit at report {k}: best {metric} {} is worse than {}, the limit of {slack} from the \
                         best trial {} ({})",
                        num(own),
                        num(threshold),
                        trials[leader].name,
                        num(reference)
                    )
                })
            }
        };
        if let Some(reason) = reason {
            stops.push(StopDecision {
                trial: t.name.clone(),
                reason,
            });
        }
    }
    stops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(name: &str, values: &[f64], active: bool) -> TrialCurve {
        TrialCurve {
            name: name.into(),
            history: values.iter().enumerate().map(|(i, v)| (i as i64, *v)).collect(),
            active,
        }
    }

    fn median_policy(interval: i32, delay: i32) -> EarlyTermination {
        EarlyTermination {
            policy: EarlyTerminationPolicy::MedianStopping,
            evaluation_interval: interval,
            delay_evaluation: delay,
            slack_factor: None,
            slack_amount: None,
        }
    }

    fn bandit(factor: Option<f64>, amount: Option<f64>) -> EarlyTermination {
        EarlyTermination {
            policy: EarlyTerminationPolicy::Bandit,
            evaluation_interval: 1,
            delay_evaluation: 0,
            slack_factor: factor,
            slack_amount: amount,
        }
    }

    fn stopped(d: &[StopDecision]) -> Vec<&str> {
        d.iter().map(|s| s.trial.as_str()).collect()
    }

    #[test]
    fn evaluation_points() {
        let p = median_policy(1, 5);
        assert_eq!(evaluation_point(&p, 4), None);
        assert_eq!(evaluation_point(&p, 5), Some(5));
        assert_eq!(evaluation_point(&p, 9), Some(9));
        let p = median_policy(2, 5);
        assert_eq!(evaluation_point(&p, 5), None);
        assert_eq!(evaluation_point(&p, 6), Some(6));
        assert_eq!(evaluation_point(&p, 7), Some(6));
        let p = median_policy(1, 0);
        assert_eq!(evaluation_point(&p, 0), None);
        assert_eq!(evaluation_point(&p, 1), Some(1));
    }

    #[test]
    fn median_stops_a_curve_below_the_median() {
        // Accuracy curves; the bad trial's best by report 5 (0.40) is below the
        // median of the others' running averages at 5 (0.58 and 0.66 -> 0.62).
        let trials = [
            curve("t0", &[0.5, 0.55, 0.6, 0.62, 0.63, 0.64], false),
            curve("t1", &[0.6, 0.64, 0.66, 0.69, 0.71], true),
            curve("t2", &[0.2, 0.3, 0.35, 0.38, 0.40], true),
        ];
        let d = decide(&median_policy(1, 5), Goal::Maximize, "val_accuracy", &trials);
        assert_eq!(stopped(&d), ["t2"]);
        assert_eq!(
            d[0].reason,
            "MedianStopping at report 5: best val_accuracy 0.4 is worse than 0.62, the median of the running \
             averages of 2 other trial(s)"
        );
    }

    #[test]
    fn median_waits_for_delay_interval_and_comparators() {
        let trials = [
            curve("t0", &[0.5, 0.55, 0.6, 0.62, 0.63], false),
            curve("t2", &[0.2, 0.3, 0.35, 0.38], true),
        ];
        // Only 4 reports, delay 5: not evaluated.
        assert!(decide(&median_policy(1, 5), Goal::Maximize, "m", &trials).is_empty());
        // Evaluated at 4 with delay 4; t0's average over 4 is 0.5675.
        assert_eq!(
            stopped(&decide(&median_policy(1, 4), Goal::Maximize, "m", &trials)),
            ["t2"]
        );
        // Interval 3: evaluated at report 3 (t2 best 0.35 < t0 avg 0.55).
        assert_eq!(
            stopped(&decide(&median_policy(3, 0), Goal::Maximize, "m", &trials)),
            ["t2"]
        );
        // Alone: nothing to compare with.
        assert!(decide(&median_policy(1, 1), Goal::Maximize, "m", &trials[1..]).is_empty());
        // Others that have not reached report k are not comparators.
        let trials = [curve("t0", &[0.9, 0.9], false), curve("t2", &[0.1, 0.1, 0.1], true)];
        assert!(decide(&median_policy(1, 3), Goal::Maximize, "m", &trials).is_empty());
        // Finished trials are never stopped.
        let trials = [curve("t0", &[0.9; 5], true), curve("t2", &[0.1; 5], false)];
        assert!(decide(&median_policy(1, 1), Goal::Maximize, "m", &trials).is_empty());
    }

    #[test]
    fn median_uses_best_so_far_not_latest() {
        // t1 peaked at 0.8 then dropped: its best (0.8) beats the median 0.6.
        let trials = [
            curve("t0", &[0.6, 0.6, 0.6], false),
            curve("t1", &[0.8, 0.3, 0.2], true),
        ];
        assert!(decide(&median_policy(1, 3), Goal::Maximize, "m", &trials).is_empty());
        // Equal to the median is not worse.
        let trials = [curve("t0", &[0.6, 0.6], false), curve("t1", &[0.5, 0.6], true)];
        assert!(decide(&median_policy(1, 2), Goal::Maximize, "m", &trials).is_empty());
    }

    #[test]
    fn median_minimize_loss_with_even_comparators_and_nan() {
        let trials = [
            curve("a", &[1.0, 0.8, 0.6], false), // avg 0.8
            curve("b", &[1.2, 1.0, 0.8], true),  // avg 1.0
            curve("c", &[2.0, 1.9, 1.8], true),  // best 1.8
            curve("d", &[0.9, 0.7, 0.5], true),  // best 0.5
        ];
        let d = decide(&median_policy(1, 3), Goal::Minimize, "loss", &trials);
        // b: best 0.8 vs median of (0.8, 1.9, 0.7) = 0.8 -> not worse.
        // c: best 1.8 vs median of (0.8, 1.0, 0.7) = 0.8 -> stop.
        assert_eq!(stopped(&d), ["c"]);
        // A diverged (NaN) loss is the worst possible value.
        let trials = [curve("a", &[1.0, 0.8], false), curve("x", &[f64::NAN, f64::NAN], true)];
        assert_eq!(
            stopped(&decide(&median_policy(1, 2), Goal::Minimize, "loss", &trials)),
            ["x"]
        );
    }

    #[test]
    fn steps_not_report_numbers_order_history() {
        // Reports logged at steps 10, 20, 30 in any insertion order.
        let mut t = TrialCurve {
            name: "t".into(),
            active: true,
            ..Default::default()
        };
        t.history.insert(30, 0.1);
        t.history.insert(10, 0.3);
        t.history.insert(20, 0.2);
        let other = curve("o", &[0.5, 0.5, 0.5], false);
        let d = decide(&median_policy(1, 3), Goal::Maximize, "m", &[other, t]);
        assert!(d[0].reason.contains("best m 0.3"), "{}", d[0].reason);
    }

    #[test]
    fn bandit_slack_factor_azure_example() {
        // Best trial at 0.8; slackFactor 0.1 -> limit 0.8/1.1 = 0.7272...
        let trials = [
            curve("best", &[0.8], true),
            curve("ok", &[0.75], true),
            curve("bad", &[0.72], true),
        ];
        let d = decide(&bandit(Some(0.1), None), Goal::Maximize, "acc", &trials);
        assert_eq!(stopped(&d), ["bad"]);
        assert!(
            d[0].reason
                .starts_with("Bandit at report 1: best acc 0.72 is worse than 0.727"),
            "{}",
            d[0].reason
        );
        assert!(
            d[0].reason.ends_with("slackFactor 0.1 from the best trial best (0.8)"),
            "{}",
            d[0].reason
        );
    }

    #[test]
    fn bandit_slack_amount_and_minimize() {
        // Azure example: best 0.8, slackAmount 0.2 -> below 0.6 stops.
        let trials = [
            curve("best", &[0.7, 0.8], false),
            curve("edge", &[0.6, 0.6], true),
            curve("bad", &[0.5, 0.59], true),
        ];
        assert_eq!(
            stopped(&decide(&bandit(None, Some(0.2)), Goal::Maximize, "acc", &trials)),
            ["bad"]
        );
        // Minimize: best loss 1.0, factor 0.5 -> above 1.5 stops.
        let trials = [
            curve("best", &[1.0], true),
            curve("ok", &[1.5], true),
            curve("bad", &[1.6], true),
        ];
        assert_eq!(
            stopped(&decide(&bandit(Some(0.5), None), Goal::Minimize, "loss", &trials)),
            ["bad"]
        );
        // Negative metrics (e.g. log-likelihood, maximized): best -1.0, factor
        // 0.1 -> limit -1.0909; the best itself is never below it.
        let trials = [curve("best", &[-1.0], true), curve("bad", &[-1.2], true)];
        assert_eq!(
            stopped(&decide(&bandit(Some(0.1), None), Goal::Maximize, "ll", &trials)),
            ["bad"]
        );
        // A lone trial is the best: never stopped.
        assert!(decide(&bandit(Some(0.0), None), Goal::Maximize, "acc", &trials[1..]).is_empty());
    }

    #[test]
    fn bandit_compares_at_the_same_report() {
        // The leader's later 0.95 does not count at report 2.
        let trials = [curve("lead", &[0.5, 0.6, 0.95], true), curve("t", &[0.4, 0.55], true)];
        assert!(decide(&bandit(Some(0.1), None), Goal::Maximize, "acc", &trials).is_empty());
        let trials = [
            curve("lead", &[0.5, 0.6, 0.95], true),
            curve("t", &[0.4, 0.55, 0.6], true),
        ];
        assert_eq!(
            stopped(&decide(&bandit(Some(0.1), None), Goal::Maximize, "acc", &trials)),
            ["t"]
        );
    }
}
