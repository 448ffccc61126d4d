//! Which API writes go first when the API server is the bottleneck.
//!
//! Under a burst of new objects (a sweep, a GitOps sync of hundreds of
//! Experiments or ModelDeployments) every write of the operator queues at
//! the same API server. The writes that start users' workloads — run Jobs,
//! pipeline step Jobs, serving Deployments — are *foreground*: they hold a
//! [`Busy`] while they are on the wire. Bookkeeping — status patches,
//! Events, a ModelDeployment's Services — is *background*: before each
//! write it calls [`Foreground::wait_turn`], which returns once no
//! foreground write has been in flight for [`QUIET`].
//!
//! Background work is deferred, never starved: a writer that has waited
//! [`MAX_DEFER`] goes ahead, and opens the gate to every background writer
//! for [`OPEN`], so under sustained foreground load bookkeeping still gets
//! about a third of the time. Deferring also makes status writes fewer: the
//! status writer keeps only the newest status of each object, so statuses
//! that changed several times while deferred are written once.
//!
//! With no foreground write in the last [`QUIET`] (an idle or converged
//! operator), `wait_turn` returns at once.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How long after the last foreground write background writes wait.
pub const QUIET: Duration = Duration::from_millis(100);
/// The longest a background write is deferred.
pub const MAX_DEFER: Duration = Duration::from_secs(2);
/// How long the gate stays open for background writes once one of them
/// waited [`MAX_DEFER`].
pub const OPEN: Duration = Duration::from_secs(1);

/// The gate between foreground and background writes; clones share it.
#[derive(Clone, Default)]
pub struct Foreground(Arc<Inner>);

#[derive(Default)]
struct Inner {
    /// Foreground writes in flight.
    active: AtomicUsize,
    times: Mutex<Times>,
    /// Woken when the last foreground write in flight ends.
    idle: Notify,
}

#[derive(Default)]
struct Times {
    /// When the last foreground write ended.
    last_end: Option<Instant>,
    /// Until when background writes go ahead regardless.
    open_until: Option<Instant>,
}

/// A foreground write on the wire (see [`Foreground::begin`]).
pub struct Busy(Arc<Inner>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.times.lock().expect("foreground lock").last_end = Some(Instant::now());
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// What a background writer does next.
#[derive(Debug, PartialEq)]
enum Turn {
    Go,
    /// Wait until the instant (or until the last foreground write ends).
    WaitUntil(Instant),
    /// Waited long enough: go, and open the gate for the others.
    GoAndOpen,
}

/// The gate's decision at `now` for a writer whose wait ends at `deadline`.
fn turn(active: usize, times: &Times, now: Instant, deadline: Instant) -> Turn {
    if times.open_until.is_some_and(|t| now < t) {
        return Turn::Go;
    }
    let quiet_at = times.last_end.map(|t| t + QUIET);
    if active == 0 && quiet_at.is_none_or(|t| t <= now) {
        return Turn::Go;
    }
    if now >= deadline {
        return Turn::GoAndOpen;
    }
    match quiet_at {
        Some(t) if active == 0 => Turn::WaitUntil(t.min(deadline)),
        _ => Turn::WaitUntil(deadline),
    }
}

impl Foreground {
    /// Marks a foreground write in flight until the returned guard drops.
    pub fn begin(&self) -> Busy {
        self.0.active.fetch_add(1, Ordering::AcqRel);
        Busy(self.0.clone())
    }

    /// Waits until background writes may go (see the module docs).
    pub async fn wait_turn(&self) {
        let deadline = Instant::now() + MAX_DEFER;
        loop {
            let idle = self.0.idle.notified();
            tokio::pin!(idle);
            // Registered before the check: an end between the check and the
            // wait is not missed.
            idle.as_mut().enable();
            let now = Instant::now();
            let decision = {
                let mut times = self.0.times.lock().expect("foreground lock");
                let decision = turn(self.0.active.load(Ordering::Acquire), &times, now, deadline);
                if decision == Turn::GoAndOpen {
                    times.open_until = Some(now + OPEN);
                }
                decision
            };
            match decision {
                Turn::Go | Turn::GoAndOpen => return,
                Turn::WaitUntil(t) => {
                    tokio::select! {
                        _ = idle => {}
                        _ = tokio::time::sleep_until(t) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_goes_when_nothing_foreground_happened_lately() {
        let now = Instant::now();
        let deadline = now + MAX_DEFER;
        assert_eq!(turn(0, &Times::default(), now, deadline), Turn::Go);
        let long_ago = Times {
            last_end: Some(now - QUIET),
            open_until: None,
        };
        assert_eq!(turn(0, &long_ago, now, deadline), Turn::Go);
    }

    #[test]
    fn background_waits_for_a_quiet_spell_after_foreground_writes() {
        let now = Instant::now();
        let deadline = now + MAX_DEFER;
        let just_ended = Times {
            last_end: Some(now),
            open_until: None,
        };
        assert_eq!(turn(0, &just_ended, now, deadline), Turn::WaitUntil(now + QUIET));
        // A write in flight: wait until it ends (woken) or the deadline.
        assert_eq!(turn(1, &just_ended, now, deadline), Turn::WaitUntil(deadline));
        assert_eq!(turn(3, &Times::default(), now, deadline), Turn::WaitUntil(deadline));
    }

    #[test]
    fn background_is_deferred_at_most_max_defer_then_the_gate_opens() {
        let now = Instant::now();
        let busy = Times {
            last_end: Some(now),
            open_until: None,
        };
        assert_eq!(turn(2, &busy, now, now), Turn::GoAndOpen);
        let open = Times {
            last_end: Some(now),
            open_until: Some(now + OPEN),
        };
        assert_eq!(turn(2, &open, now, now + MAX_DEFER), Turn::Go);
        assert_eq!(
            turn(2, &open, now + OPEN, now + OPEN + MAX_DEFER),
            Turn::WaitUntil(now + OPEN + MAX_DEFER)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_writer_is_let_through_once_the_foreground_is_quiet() {
        let fg = Foreground::default();
        let busy = fg.begin();
        let waiter = tokio::spawn({
            let fg = fg.clone();
            async move {
                let start = Instant::now();
                fg.wait_turn().await;
                start.elapsed()
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(busy);
        let waited = waiter.await.unwrap();
        assert!(waited >= Duration::from_millis(500) + QUIET, "{waited:?}");
        assert!(waited < MAX_DEFER, "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_behind_a_foreground_that_never_pauses_waits_max_defer() {
        let fg = Foreground::default();
        let _busy = fg.begin();
        let start = Instant::now();
        fg.wait_turn().await;
        assert_eq!(start.elapsed(), MAX_DEFER);
        // The gate is open now for the others.
        let again = Instant::now();
        fg.wait_turn().await;
        assert_eq!(again.elapsed(), Duration::ZERO);
    }
}
