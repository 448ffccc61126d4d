//! The single writer: one database connection that applies every write, with
//! group commit. Concurrent requests queue here; the writer takes everything
//! queued (up to a bound), runs it in one transaction and commits once, then
//! answers each request. A request is acknowledged only after its commit, so
//! an acknowledged write survives a crash, and N concurrent writers cost one
//! fsync instead of N. With SQLite this also means no SQLITE_BUSY between our
//! own writers.
//!
//! Contract for jobs: a job that fails with a logical error (anything but
//! [`StoreError::Db`]) must not have written anything, so the batch goes on;
//! a database error aborts the whole batch (rolled back, every job in it fails).
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::AnyConnection;
use sqlx::{Connection, Executor};
use tokio::sync::{mpsc, oneshot};

use super::{Backend, StoreError};

/// How many queued requests one transaction takes at most.
const MAX_BATCH: usize = 512;

/// The commit outcome, handed to a finished job.
type Done = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// Whether a job's result lets the batch commit.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// Refused before writing: the batch goes on.
    Rejected,
    /// Database error: roll the batch back.
    Abort,
}

/// A queued write; run with `None` when it cannot be run (the database is
/// unavailable or its batch aborted), which answers its caller with an error.
type JobFn = Box<dyn for<'c> FnOnce(Option<&'c mut AnyConnection>) -> BoxFuture<'c, (Outcome, Done)> + Send>;

enum Msg {
    Job(JobFn),
    Close(oneshot::Sender<()>),
}

/// Handle to the writer task.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Msg>,
}

impl Writer {
    /// Starts the writer on `conn`; `reconnect` opens a new connection after
    /// a connection-level failure.
    pub fn start(
        conn: AnyConnection,
        backend: Backend,
        reconnect: impl Fn() -> BoxFuture<'static, Result<AnyConnection, sqlx::Error>> + Send + Sync + 'static,
    ) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(run(conn, backend, rx, reconnect));
        Self { tx }
    }

    /// Runs `f` in the writer's transaction and returns its result once committed.
    pub async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut AnyConnection) -> BoxFuture<'c, Result<T, StoreError>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, StoreError>>();
        let job: JobFn = Box::new(move |conn| {
            Box::pin(async move {
                let result = match conn {
                    Some(conn) => f(conn).await,
                    None => Err(StoreError::Internal(
                        "the write was not applied: the database failed".into(),
                    )),
                };
                let outcome = match &result {
                    Ok(_) => Outcome::Ok,
                    Err(StoreError::Db(_)) | Err(StoreError::Internal(_)) => Outcome::Abort,
                    Err(_) => Outcome::Rejected,
                };
                let done: Done = Box::new(move |commit| {
                    let _ = tx.send(match commit {
                        Ok(()) => result,
                        Err(e) => match result {
                            Err(own) => Err(own),
                            Ok(_) => Err(e),
                        },
                    });
                });
                (outcome, done)
            })
        });
        self.tx.send(Msg::Job(job)).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Finishes queued writes and closes the connection.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

async fn run(
    conn: AnyConnection,
    backend: Backend,
    mut rx: mpsc::Receiver<Msg>,
    reconnect: impl Fn() -> BoxFuture<'static, Result<AnyConnection, sqlx::Error>>,
) {
    let begin = match backend {
        Backend::Sqlite => "BEGIN IMMEDIATE",
        Backend::Postgres => "BEGIN",
    };
    let mut conn = Some(conn);
    let mut closing: Option<oneshot::Sender<()>> = None;
    while closing.is_none() {
        let Some(first) = rx.recv().await else { break };
        let mut jobs = vec![];
        match first {
            Msg::Job(j) => jobs.push(j),
            Msg::Close(ack) => closing = Some(ack),
        }
        while closing.is_none() && jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Job(j)) => jobs.push(j),
                Ok(Msg::Close(ack)) => closing = Some(ack),
                Err(_) => break,
            }
        }
        if jobs.is_empty() {
            continue;
        }
        if conn.is_none() {
            match reconnect().await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::error!(error = %e, "tracking store: cannot reconnect the writer");
                    fail_all(jobs, StoreError::Internal(format!("the database is unavailable: {e}"))).await;
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected above");
        if let Err(e) = c.execute(begin).await {
            tracing::error!(error = %e, "tracking store: BEGIN failed");
            conn = None;
            fail_all(jobs, StoreError::Internal(format!("the database is unavailable: {e}"))).await;
            continue;
        }
        let mut dones: Vec<Done> = Vec::with_capacity(jobs.len());
        let mut abort = false;
        for job in jobs {
            if abort {
                dones.push(job(None).await.1);
                continue;
            }
            match AssertUnwindSafe(job(Some(&mut *c))).catch_unwind().await {
                Ok((outcome, done)) => {
                    abort |= outcome == Outcome::Abort;
                    dones.push(done);
                }
                Err(_) => {
                    tracing::error!("tracking store: a write panicked; rolling back its batch");
                    abort = true;
                }
            }
        }
        let commit = if abort {
            let _ = c.execute("ROLLBACK").await;
            Err(StoreError::Internal("the write was rolled back with its batch".into()))
        } else {
            match c.execute("COMMIT").await {
                Ok(_) => Ok(()),
                Err(e) => {
                    tracing::error!(error = %e, "tracking store: COMMIT failed");
                    let _ = c.execute("ROLLBACK").await;
                    conn = None;
                    Err(StoreError::Internal(format!("commit failed: {e}")))
                }
            }
        };
        for done in dones {
            done(commit.clone());
        }
    }
    if let Some(c) = conn {
        let _ = c.close().await;
    }
    if let Some(ack) = closing {
        let _ = ack.send(());
    }
}

/// Answers every job of a batch that could not run with `error`.
async fn fail_all(jobs: Vec<JobFn>, error: StoreError) {
    for job in jobs {
        let (_, done) = job(None).await;
        done(Err(error.clone()));
    }
}
