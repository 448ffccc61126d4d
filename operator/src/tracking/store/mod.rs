//! The run history store: experiments, runs, params, tags, metrics and
//! dataset inputs in SQL (SQLite embedded, PostgreSQL by URL), with one
//! portable schema (`operator/migrations/tracking`) applied at connect time.
//!
//! Writes go through a single writer connection with group commit
//! ([`writer`]); reads use a pool. SQLite runs in WAL mode with
//! `synchronous=FULL`, so a write is on disk before it is acknowledged.
//! MLflow's rules (validation, messages, NaN/infinity handling, run name
//! sync, immutable params) are applied here, so the REST handlers and the
//! operator's in-process calls behave the same.
//!
//! mlplane's own records (DataAsset versions, the Pipeline step cache) are
//! in [`records`].
//!
//! Owns: the tracking database. Must not touch Kubernetes or artifacts.
pub mod names;
mod query;
pub mod records;
pub mod validate;
mod writer;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyConnection, AnyPool, ConnectOptions, Executor, Row, SqlSafeStr};

use self::writer::Writer;
use super::error::ApiError;
use super::search;

/// Name of the tag MLflow keeps in sync with a run's name.
pub const RUN_NAME_TAG: &str = "mlflow.runName";
/// Input tag naming a dataset's context (`training`, `eval`, ...).
pub const DATASET_CONTEXT_TAG: &str = "mlflow.data.context";
/// The experiment every MLflow server has.
pub const DEFAULT_EXPERIMENT_ID: &str = "0";
pub const DEFAULT_EXPERIMENT_NAME: &str = "Default";
const ACTIVE: &str = "active";
const DELETED: &str = "deleted";

/// A failed store operation, mapped to MLflow's error codes by [`ApiError::from`].
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// RESOURCE_DOES_NOT_EXIST.
    #[error("{0}")]
    NotFound(String),
    /// RESOURCE_ALREADY_EXISTS.
    #[error("{0}")]
    AlreadyExists(String),
    /// INVALID_PARAMETER_VALUE.
    #[error("{0}")]
    Invalid(String),
    /// INVALID_STATE (MLflow answers it with HTTP 500).
    #[error("{0}")]
    InvalidState(String),
    /// BAD_REQUEST.
    #[error("{0}")]
    BadRequest(String),
    /// A database failure.
    #[error("database error: {0}")]
    Db(Arc<sqlx::Error>),
    #[error("{0}")]
    Internal(String),
    /// An error MLflow raises without a code: INTERNAL_ERROR (500) with its message.
    #[error("{0}")]
    Unclassified(String),
    #[error("the tracking store is closed")]
    Closed,
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Db(Arc::new(e))
    }
}

impl From<search::SearchError> for StoreError {
    fn from(e: search::SearchError) -> Self {
        StoreError::Invalid(e.0)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => ApiError::not_found(m),
            StoreError::AlreadyExists(m) => ApiError::already_exists(m),
            StoreError::Invalid(m) => ApiError::invalid(m),
            StoreError::BadRequest(m) => ApiError::bad_request(m),
            StoreError::InvalidState(m) => ApiError {
                status: axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                code: "INVALID_STATE",
                message: m,
            },
            StoreError::Unclassified(m) => ApiError {
                status: axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                code: "INTERNAL_ERROR",
                message: m,
            },
            other => ApiError::internal(other),
        }
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A key/value pair: a param, a run tag, an experiment tag or an input tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

impl KeyValue {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
        }
    }
}

/// One metric value. `value` is NaN for a NaN; ±infinity is stored (and
/// returned) as ±f64::MAX, as MLflow does.
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    pub key: String,
    pub value: f64,
    pub timestamp: i64,
    pub step: i64,
}

/// A metric value with the run it belongs to (bulk history).
#[derive(Clone, Debug, PartialEq)]
pub struct RunMetric {
    pub run_id: String,
    pub metric: Metric,
}

/// A run's status (MLflow's RunStatus).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    Running,
    Scheduled,
    Finished,
    Failed,
    Killed,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "RUNNING",
            RunStatus::Scheduled => "SCHEDULED",
            RunStatus::Finished => "FINISHED",
            RunStatus::Failed => "FAILED",
            RunStatus::Killed => "KILLED",
        }
    }

    /// From the name (`FINISHED`) or the proto number (`3`).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "RUNNING" | "1" => RunStatus::Running,
            "SCHEDULED" | "2" => RunStatus::Scheduled,
            "FINISHED" | "3" => RunStatus::Finished,
            "FAILED" | "4" => RunStatus::Failed,
            "KILLED" | "5" => RunStatus::Killed,
            _ => return None,
        })
    }

    /// Whether the run is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, RunStatus::Finished | RunStatus::Failed | RunStatus::Killed)
    }
}

/// Which lifecycle stages a search returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ViewType {
    #[default]
    ActiveOnly,
    DeletedOnly,
    All,
}

impl ViewType {
    /// From the name (`ACTIVE_ONLY`) or the proto number (`1`).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ACTIVE_ONLY" | "1" => ViewType::ActiveOnly,
            "DELETED_ONLY" | "2" => ViewType::DeletedOnly,
            "ALL" | "3" => ViewType::All,
            _ => return None,
        })
    }

    fn stages(self) -> &'static [&'static str] {
        match self {
            ViewType::ActiveOnly => &[ACTIVE],
            ViewType::DeletedOnly => &[DELETED],
            ViewType::All => &[ACTIVE, DELETED],
        }
    }
}

/// An experiment.
#[derive(Clone, Debug, PartialEq)]
pub struct Experiment {
    pub experiment_id: String,
    pub name: String,
    pub artifact_location: String,
    pub lifecycle_stage: String,
    pub creation_time: i64,
    pub last_update_time: i64,
    pub tags: Vec<KeyValue>,
}

/// A run's metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct RunInfo {
    pub run_id: String,
    pub experiment_id: String,
    pub run_name: String,
    pub user_id: String,
    pub status: RunStatus,
    pub start_time: i64,
    pub end_time: Option<i64>,
    pub artifact_uri: String,
    pub lifecycle_stage: String,
}

/// A dataset logged as a run input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    pub name: String,
    pub digest: String,
    pub source_type: String,
    pub source: String,
    pub schema: Option<String>,
    pub profile: Option<String>,
}

/// A dataset input of a run, with its input tags (e.g. `mlflow.data.context`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetInput {
    pub tags: Vec<KeyValue>,
    pub dataset: Dataset,
}

/// A run with its latest metrics, params, tags and dataset inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub info: RunInfo,
    pub metrics: Vec<Metric>,
    pub params: Vec<KeyValue>,
    pub tags: Vec<KeyValue>,
    pub inputs: Vec<DatasetInput>,
}

/// One page of search results.
#[derive(Clone, Debug, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_page_token: Option<String>,
}

/// The database engine behind a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Monotonic sequence numbers for the order keys were first logged in.
struct Seq(AtomicI64);

impl Seq {
    fn next(&self) -> i64 {
        let now = now_micros();
        let prev = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| Some(now.max(p + 1)))
            .expect("always Some");
        now.max(prev + 1)
    }
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_micros() as i64
}

/// Milliseconds since the epoch (MLflow's timestamps).
pub fn now_millis() -> i64 {
    now_micros() / 1000
}

struct Inner {
    backend: Backend,
    pool: AnyPool,
    writer: Writer,
    seq: Arc<Seq>,
}

/// Handle to the tracking database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// The embedded migrations of `operator/migrations/tracking`.
fn migrator() -> Migrator {
    Migrator::with_migrations(vec![
        Migration::new(
            1,
            Cow::Borrowed("run history"),
            MigrationType::Simple,
            sqlx::AssertSqlSafe(include_str!("../../../migrations/tracking/0001_run_history.sql")).into_sql_str(),
            false,
        ),
        Migration::new(
            2,
            Cow::Borrowed("data versions and step cache"),
            MigrationType::Simple,
            sqlx::AssertSqlSafe(include_str!(
                "../../../migrations/tracking/0002_data_versions_and_step_cache.sql"
            ))
            .into_sql_str(),
            false,
        ),
    ])
}

/// Normalises a database URL: SQLite paths become absolute and are created
/// if missing (`mode=rwc`).
fn normalise_url(database_url: &str) -> anyhow::Result<(Backend, String)> {
    if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        return Ok((Backend::Postgres, database_url.to_string()));
    }
    let Some(rest) = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))
    else {
        anyhow::bail!("unsupported tracking database URL {database_url:?}: use sqlite://<file> or postgres://...");
    };
    let (path, params) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    anyhow::ensure!(
        !path.is_empty() && path != ":memory:",
        "the tracking database must be a file (sqlite://<file>), not {database_url:?}"
    );
    let path = std::path::absolute(path)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut url = url::Url::from_file_path(&path).map_err(|_| anyhow::anyhow!("bad SQLite path {path:?}"))?;
    url.set_query(Some(params.unwrap_or("mode=rwc")));
    let url = url.as_str().replacen("file://", "sqlite://", 1);
    Ok((Backend::Sqlite, url))
}

/// Per-connection settings.
async fn setup_connection(conn: &mut AnyConnection, backend: Backend) -> Result<(), sqlx::Error> {
    if backend == Backend::Sqlite {
        // WAL lets readers run beside the writer; FULL makes every commit
        // durable (an acknowledged write survives a crash or power loss).
        conn.execute("PRAGMA journal_mode = WAL").await?;
        conn.execute("PRAGMA synchronous = FULL").await?;
        conn.execute("PRAGMA busy_timeout = 10000").await?;
        conn.execute("PRAGMA foreign_keys = ON").await?;
        // MLflow's LIKE is case-sensitive (ILIKE is not).
        conn.execute("PRAGMA case_sensitive_like = ON").await?;
    }
    Ok(())
}

async fn connect_one(backend: Backend, url: &str) -> Result<AnyConnection, sqlx::Error> {
    let options: sqlx::any::AnyConnectOptions = url.parse()?;
    let mut conn = options.disable_statement_logging().connect().await?;
    setup_connection(&mut conn, backend).await?;
    Ok(conn)
}

impl Store {
    /// Opens (creating if needed) the database at `sqlite://<path>` or
    /// `postgres://...`, applies migrations and makes sure experiment 0
    /// ("Default") exists.
    pub async fn connect(database_url: &str) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        let (backend, url) = normalise_url(database_url)?;
        let mut conn = connect_one(backend, &url).await?;
        migrator().run(&mut conn).await?;
        let now = now_millis();
        sqlx::query(
            "INSERT INTO experiments (experiment_id, name, artifact_location, lifecycle_stage, creation_time, \
             last_update_time) VALUES (0, $1, $2, 'active', $3, $3) ON CONFLICT DO NOTHING",
        )
        .bind(DEFAULT_EXPERIMENT_NAME)
        .bind(default_artifact_location(0))
        .bind(now)
        .execute(&mut conn)
        .await?;
        let max_readers = match backend {
            Backend::Sqlite => 8,
            Backend::Postgres => 16,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_readers)
            .min_connections(1)
            .after_connect(move |conn, _| Box::pin(setup_connection(conn, backend)))
            .connect_with(url.parse::<sqlx::any::AnyConnectOptions>()?.disable_statement_logging())
            .await?;
        let reconnect_url = url.clone();
        let writer = Writer::start(conn, backend, move || {
            let url = reconnect_url.clone();
            Box::pin(async move { connect_one(backend, &url).await })
        });
        Ok(Store {
            inner: Arc::new(Inner {
                backend,
                pool,
                writer,
                seq: Arc::new(Seq(AtomicI64::new(0))),
            }),
        })
    }

    /// The database engine.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// Finishes queued writes and closes every connection.
    pub async fn close(&self) {
        self.inner.writer.close().await;
        self.inner.pool.close().await;
    }

    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut AnyConnection, Arc<Seq>) -> BoxFuture<'c, Result<T>> + Send + 'static,
    {
        let seq = self.inner.seq.clone();
        self.inner.writer.write(move |c| f(c, seq)).await
    }

    // -----------------------------------------------------------------------
    // Experiments

    /// The name of an experiment, `None` when there is none with that id
    /// (including ids that are not integers).
    pub async fn experiment_name(&self, experiment_id: &str) -> Result<Option<String>> {
        let Ok(id) = experiment_id.trim().parse::<i64>() else {
            return Ok(None);
        };
        let row = sqlx::query("SELECT name FROM experiments WHERE experiment_id = $1")
            .bind(id)
            .fetch_optional(&self.inner.pool)
            .await?;
        Ok(row.map(|r| r.try_get("name")).transpose()?)
    }

    /// The experiment id and name a run belongs to, `None` for an unknown run.
    pub async fn run_experiment(&self, run_id: &str) -> Result<Option<(String, String)>> {
        let row = sqlx::query(
            "SELECT e.experiment_id, e.name FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id \
             WHERE r.run_id = $1",
        )
        .bind(run_id.to_string())
        .fetch_optional(&self.inner.pool)
        .await?;
        row.map(|r| Ok((r.try_get::<i64, _>(0)?.to_string(), r.try_get(1)?)))
            .transpose()
    }

    /// Creates an experiment; its artifact location defaults to `mlflow-artifacts:/<id>`.
    pub async fn create_experiment(
        &self,
        name: &str,
        artifact_location: Option<&str>,
        tags: &[KeyValue],
    ) -> Result<String> {
        validate::experiment_name(name)?;
        for t in tags {
            validate::experiment_tag(&t.key, &t.value)?;
        }
        let name = name.to_string();
        let artifact_location = artifact_location.filter(|s| !s.is_empty()).map(str::to_string);
        let tags = tags.to_vec();
        self.write(move |c, seq| {
            Box::pin(async move {
                if query::experiment_id_by_name(c, &name).await?.is_some() {
                    return Err(StoreError::AlreadyExists(format!(
                        "Experiment(name={name}) already exists."
                    )));
                }
                query::insert_experiment(c, &seq, &name, artifact_location, &tags).await
            })
        })
        .await
    }

    /// The id of the experiment named `name`, created (with default settings) if missing.
    pub async fn get_or_create_experiment(&self, name: &str) -> Result<String> {
        validate::experiment_name(name)?;
        let name = name.to_string();
        self.write(move |c, seq| {
            Box::pin(async move {
                if let Some(id) = query::experiment_id_by_name(c, &name).await? {
                    return Ok(id.to_string());
                }
                query::insert_experiment(c, &seq, &name, None, &[]).await
            })
        })
        .await
    }

    /// An experiment in any lifecycle stage.
    pub async fn get_experiment(&self, experiment_id: &str) -> Result<Experiment> {
        let id = validate::parse_experiment_id(experiment_id)?;
        let row = sqlx::query(query::SELECT_EXPERIMENT_BY_ID)
            .bind(id)
            .fetch_optional(&self.inner.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("No Experiment with id={id} exists")))?;
        let mut exps = vec![query::experiment_from_row(&row)?];
        query::load_experiment_tags(&self.inner.pool, self.inner.backend, &mut exps).await?;
        Ok(exps.remove(0))
    }

    /// The experiment named `name` in any lifecycle stage.
    pub async fn get_experiment_by_name(&self, name: &str) -> Result<Option<Experiment>> {
        let row = sqlx::query(query::SELECT_EXPERIMENT_BY_NAME)
            .bind(name.to_string())
            .fetch_optional(&self.inner.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let mut exps = vec![query::experiment_from_row(&row)?];
        query::load_experiment_tags(&self.inner.pool, self.inner.backend, &mut exps).await?;
        Ok(exps.pop())
    }

    /// Renames an active experiment.
    pub async fn rename_experiment(&self, experiment_id: &str, new_name: &str) -> Result<()> {
        validate::experiment_name(new_name)?;
        let id = validate::parse_experiment_id(experiment_id)?;
        let new_name = new_name.to_string();
        self.write(move |c, _| {
            Box::pin(async move {
                let stage = query::experiment_stage(c, id).await?;
                if stage != ACTIVE {
                    return Err(StoreError::InvalidState(
                        "Cannot rename a non-active experiment.".into(),
                    ));
                }
                if let Some(other) = query::experiment_id_by_name(c, &new_name).await?
                    && other != id
                {
                    return Err(StoreError::BadRequest(format!(
                        "An experiment named {new_name:?} already exists (experiment {other})."
                    )));
                }
                sqlx::query("UPDATE experiments SET name = $1, last_update_time = $2 WHERE experiment_id = $3")
                    .bind(new_name)
                    .bind(now_millis())
                    .bind(id)
                    .execute(&mut *c)
                    .await?;
                Ok(())
            })
        })
        .await
    }

    /// Marks an active experiment and all its runs deleted.
    pub async fn delete_experiment(&self, experiment_id: &str) -> Result<()> {
        self.set_experiment_stage(experiment_id, ACTIVE, DELETED).await
    }

    /// Restores a deleted experiment and all its runs.
    pub async fn restore_experiment(&self, experiment_id: &str) -> Result<()> {
        self.set_experiment_stage(experiment_id, DELETED, ACTIVE).await
    }

    async fn set_experiment_stage(&self, experiment_id: &str, from: &'static str, to: &'static str) -> Result<()> {
        let id = validate::parse_experiment_id(experiment_id)?;
        self.write(move |c, _| {
            Box::pin(async move {
                let found = sqlx::query("SELECT 1 FROM experiments WHERE experiment_id = $1 AND lifecycle_stage = $2")
                    .bind(id)
                    .bind(from)
                    .fetch_optional(&mut *c)
                    .await?;
                if found.is_none() {
                    return Err(StoreError::NotFound(format!("No Experiment with id={id} exists")));
                }
                let now = now_millis();
                sqlx::query(
                    "UPDATE experiments SET lifecycle_stage = $1, last_update_time = $2 WHERE experiment_id = $3",
                )
                .bind(to)
                .bind(now)
                .bind(id)
                .execute(&mut *c)
                .await?;
                let deleted_time = (to == DELETED).then_some(now);
                sqlx::query("UPDATE runs SET lifecycle_stage = $1, deleted_time = $2 WHERE experiment_id = $3")
                    .bind(to)
                    .bind(deleted_time)
                    .bind(id)
                    .execute(&mut *c)
                    .await?;
                Ok(())
            })
        })
        .await
    }

    /// Sets a tag on an active experiment.
    pub async fn set_experiment_tag(&self, experiment_id: &str, key: &str, value: &str) -> Result<()> {
        validate::experiment_tag(key, value)?;
        let id = validate::parse_experiment_id(experiment_id)?;
        let tag = KeyValue::new(key, value);
        self.write(move |c, seq| {
            Box::pin(async move {
                query::check_experiment_active(c, id).await?;
                query::upsert_experiment_tags(c, &seq, id, &[tag]).await
            })
        })
        .await
    }

    /// Deletes a tag of an active experiment.
    pub async fn delete_experiment_tag(&self, experiment_id: &str, key: &str) -> Result<()> {
        let id = validate::parse_experiment_id(experiment_id)?;
        let key = key.to_string();
        let id_text = experiment_id.to_string();
        self.write(move |c, _| {
            Box::pin(async move {
                query::check_experiment_active(c, id).await?;
                let found = sqlx::query("SELECT 1 FROM experiment_tags WHERE experiment_id = $1 AND key = $2")
                    .bind(id)
                    .bind(key.clone())
                    .fetch_optional(&mut *c)
                    .await?;
                if found.is_none() {
                    return Err(StoreError::NotFound(format!(
                        "No tag with name: {key} in experiment with id {id_text}"
                    )));
                }
                sqlx::query("DELETE FROM experiment_tags WHERE experiment_id = $1 AND key = $2")
                    .bind(id)
                    .bind(key)
                    .execute(&mut *c)
                    .await?;
                Ok(())
            })
        })
        .await
    }

    /// experiments/search: `max_results` must be 1..=50000.
    pub async fn search_experiments(
        &self,
        view: ViewType,
        max_results: i64,
        filter: &str,
        order_by: &[String],
        page_token: Option<&str>,
    ) -> Result<Page<Experiment>> {
        let max_results = validate::max_results(max_results)?;
        let offset = search::parse_page_token(page_token)?;
        let mut items = self
            .scan_experiments(view, filter, order_by, offset, max_results + 1)
            .await?;
        let next_page_token =
            (items.len() > max_results).then(|| search::create_page_token(offset + max_results as u64));
        items.truncate(max_results);
        Ok(Page { items, next_page_token })
    }

    /// Experiments matching a search, in order, from `offset` (at most `limit`).
    pub async fn scan_experiments(
        &self,
        view: ViewType,
        filter: &str,
        order_by: &[String],
        offset: u64,
        limit: usize,
    ) -> Result<Vec<Experiment>> {
        let filters = search::parse_experiment_filter(filter)?;
        let order = search::parse_experiment_order_by(order_by)?;
        query::search_experiments(
            &self.inner.pool,
            self.inner.backend,
            view,
            &filters,
            &order,
            offset,
            limit,
        )
        .await
    }

    // -----------------------------------------------------------------------
    // Runs

    /// Creates a run in an active experiment (empty id: the Default
    /// experiment). Without a name (and no `mlflow.runName` tag) the run gets
    /// a random one; the name and the tag are kept equal.
    pub async fn create_run(
        &self,
        experiment_id: &str,
        user_id: &str,
        run_name: Option<&str>,
        start_time: i64,
        tags: Vec<KeyValue>,
    ) -> Result<Run> {
        let experiment_id = if experiment_id.is_empty() {
            DEFAULT_EXPERIMENT_ID
        } else {
            experiment_id
        };
        let exp_id = validate::parse_experiment_id(experiment_id)?;
        let run_name = run_name.filter(|n| !n.is_empty()).map(str::to_string);
        let name_tag = tags
            .iter()
            .rev()
            .find(|t| t.key == RUN_NAME_TAG)
            .map(|t| t.value.clone());
        if let (Some(name), Some(tag)) = (&run_name, &name_tag)
            && !tag.is_empty()
            && name != tag
        {
            return Err(StoreError::Invalid(format!(
                "Both 'run_name' argument and 'mlflow.runName' tag are specified, but with different values \
                 (run_name='{name}', mlflow.runName='{tag}')."
            )));
        }
        let name = run_name
            .or(name_tag.clone().filter(|t| !t.is_empty()))
            .unwrap_or_else(names::random_run_name);
        let mut tags = dedupe_last_wins(tags);
        if name_tag.is_none_or(|t| t.is_empty()) {
            tags.retain(|t| t.key != RUN_NAME_TAG);
            tags.push(KeyValue::new(RUN_NAME_TAG, name.clone()));
        }
        let user_id = user_id.to_string();
        self.write(move |c, seq| {
            Box::pin(async move {
                let row =
                    sqlx::query("SELECT artifact_location, lifecycle_stage FROM experiments WHERE experiment_id = $1")
                        .bind(exp_id)
                        .fetch_optional(&mut *c)
                        .await?
                        .ok_or_else(|| StoreError::NotFound(format!("No Experiment with id={exp_id} exists")))?;
                let location: String = row.try_get(0)?;
                let stage: String = row.try_get(1)?;
                if stage != ACTIVE {
                    return Err(StoreError::Invalid(format!(
                        "The experiment {exp_id} must be in the 'active' state. Current state is {stage}."
                    )));
                }
                let run_id = uuid::Uuid::new_v4().simple().to_string();
                let info = RunInfo {
                    artifact_uri: append_to_uri_path(&location, &[&run_id, "artifacts"]),
                    run_id,
                    experiment_id: exp_id.to_string(),
                    run_name: name,
                    user_id,
                    status: RunStatus::Running,
                    start_time,
                    end_time: None,
                    lifecycle_stage: ACTIVE.into(),
                };
                sqlx::query(
                    "INSERT INTO runs (run_id, experiment_id, name, user_id, status, start_time, end_time, \
                     deleted_time, artifact_uri, lifecycle_stage) VALUES ($1, $2, $3, $4, $5, $6, NULL, NULL, $7, $8)",
                )
                .bind(info.run_id.clone())
                .bind(exp_id)
                .bind(info.run_name.clone())
                .bind(info.user_id.clone())
                .bind(info.status.as_str())
                .bind(info.start_time)
                .bind(info.artifact_uri.clone())
                .bind(ACTIVE)
                .execute(&mut *c)
                .await?;
                query::upsert_run_tags(c, &seq, &info.run_id, &tags).await?;
                Ok(Run {
                    info,
                    metrics: vec![],
                    params: vec![],
                    tags,
                    inputs: vec![],
                })
            })
        })
        .await
    }

    /// Updates an active run's status, end time and/or name (keeping the
    /// `mlflow.runName` tag equal to the name).
    pub async fn update_run(
        &self,
        run_id: &str,
        status: Option<RunStatus>,
        end_time: Option<i64>,
        run_name: Option<&str>,
    ) -> Result<RunInfo> {
        let run_id = run_id.to_string();
        let run_name = run_name.filter(|n| !n.is_empty()).map(str::to_string);
        self.write(move |c, seq| {
            Box::pin(async move {
                query::check_run_active(c, &run_id).await?;
                query::update_run_info(c, &seq, &run_id, status, end_time, run_name.as_deref()).await?;
                query::run_info(&mut *c, &run_id).await
            })
        })
        .await
    }

    /// Sets a run's status and end time (how the operator finishes runs).
    pub async fn update_run_status(&self, run_id: &str, status: RunStatus, end_time: Option<i64>) -> Result<RunInfo> {
        self.update_run(run_id, Some(status), end_time, None).await
    }

    /// Marks a run deleted.
    pub async fn delete_run(&self, run_id: &str) -> Result<()> {
        self.set_run_stage(run_id, DELETED).await
    }

    /// Restores a deleted run.
    pub async fn restore_run(&self, run_id: &str) -> Result<()> {
        self.set_run_stage(run_id, ACTIVE).await
    }

    async fn set_run_stage(&self, run_id: &str, to: &'static str) -> Result<()> {
        let run_id = run_id.to_string();
        self.write(move |c, _| {
            Box::pin(async move {
                query::run_stage(c, &run_id).await?;
                let deleted_time = (to == DELETED).then(now_millis);
                sqlx::query("UPDATE runs SET lifecycle_stage = $1, deleted_time = $2 WHERE run_id = $3")
                    .bind(to)
                    .bind(deleted_time)
                    .bind(run_id)
                    .execute(&mut *c)
                    .await?;
                Ok(())
            })
        })
        .await
    }

    /// A run with its latest metrics, params, tags and inputs.
    pub async fn get_run(&self, run_id: &str) -> Result<Run> {
        let info = query::run_info(&self.inner.pool, run_id).await?;
        let mut runs = query::load_run_data(&self.inner.pool, self.inner.backend, vec![info]).await?;
        Ok(runs.remove(0))
    }

    /// Logs one metric value.
    pub async fn log_metric(&self, run_id: &str, metric: Metric) -> Result<()> {
        validate::metric(&metric, "")?;
        let run_id = run_id.to_string();
        self.write(move |c, seq| {
            Box::pin(async move {
                query::check_run_active(c, &run_id).await?;
                query::insert_metrics(c, &seq, &run_id, std::slice::from_ref(&metric)).await
            })
        })
        .await
    }

    /// Logs a param; logging it again with another value is refused.
    pub async fn log_param(&self, run_id: &str, key: &str, value: &str) -> Result<()> {
        let param = validate::param(key, value, "")?;
        let run_id = run_id.to_string();
        self.write(move |c, seq| {
            Box::pin(async move {
                query::check_run_active(c, &run_id).await?;
                let existing = sqlx::query("SELECT value FROM params WHERE run_id = $1 AND key = $2")
                    .bind(run_id.clone())
                    .bind(param.key.clone())
                    .fetch_optional(&mut *c)
                    .await?;
                if let Some(row) = existing {
                    let old: String = row.try_get(0)?;
                    if old != param.value {
                        return Err(StoreError::Invalid(format!(
                            "Changing param values is not allowed. Param with key='{}' was already logged with \
                             value='{}' for run ID='{}'. Attempted logging new value '{}'.",
                            param.key, old, run_id, param.value
                        )));
                    }
                    return Ok(());
                }
                query::insert_params(c, &seq, &run_id, &[param]).await
            })
        })
        .await
    }

    /// Sets a run tag (`mlflow.runName` renames the run).
    pub async fn set_tag(&self, run_id: &str, key: &str, value: &str) -> Result<()> {
        let tag = validate::tag(key, value, "")?;
        let run_id = run_id.to_string();
        self.write(move |c, seq| {
            Box::pin(async move {
                query::check_run_active(c, &run_id).await?;
                query::set_run_tags(c, &seq, &run_id, vec![tag]).await
            })
        })
        .await
    }

    /// Deletes a run tag.
    pub async fn delete_tag(&self, run_id: &str, key: &str) -> Result<()> {
        let run_id = run_id.to_string();
        let key = key.to_string();
        self.write(move |c, _| {
            Box::pin(async move {
                query::check_run_active(c, &run_id).await?;
                let done = sqlx::query("DELETE FROM run_tags WHERE run_id = $1 AND key = $2")
                    .bind(run_id.clone())
                    .bind(key.clone())
                    .execute(&mut *c)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound(format!(
                        "No tag with name: {key} in run with id {run_id}"
                    )));
                }
                Ok(())
            })
        })
        .await
    }

    /// Logs metrics, params and tags in one transaction, with MLflow's limits
    /// (1000 metrics, 100 params, 100 tags, 1000 in all) and rules.
    pub async fn log_batch(
        &self,
        run_id: &str,
        metrics: Vec<Metric>,
        params: Vec<KeyValue>,
        tags: Vec<KeyValue>,
    ) -> Result<()> {
        validate::run_id(run_id)?;
        let (params, tags) = validate::batch(&metrics, &params, &tags)?;
        let run_id = run_id.to_string();
        self.write(move |c, seq| {
            Box::pin(async move {
                query::check_run_active(c, &run_id).await?;
                // Every check before the first write (see `writer`).
                let mut new_params = vec![];
                if !params.is_empty() {
                    let rows = sqlx::query("SELECT key, value FROM params WHERE run_id = $1")
                        .bind(run_id.clone())
                        .fetch_all(&mut *c)
                        .await?;
                    let existing: HashMap<String, String> = rows
                        .iter()
                        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                        .collect::<Result<_, sqlx::Error>>()?;
                    let mut conflicts = vec![];
                    for p in params {
                        match existing.get(&p.key) {
                            Some(old) if *old != p.value => conflicts.push(format!(
                                "{{'key': {}, 'old_value': {}, 'new_value': {}}}",
                                validate::py_repr_str(&p.key),
                                validate::py_repr_str(old),
                                validate::py_repr_str(&p.value)
                            )),
                            Some(_) => {}
                            None => new_params.push(p),
                        }
                    }
                    if !conflicts.is_empty() {
                        return Err(StoreError::Invalid(format!(
                            "Changing param values is not allowed. Params were already logged='[{}]' for run ID='{}'.",
                            conflicts.join(", "),
                            run_id
                        )));
                    }
                }
                query::insert_params(c, &seq, &run_id, &new_params).await?;
                query::insert_metrics(c, &seq, &run_id, &metrics).await?;
                if !tags.is_empty() {
                    query::set_run_tags(c, &seq, &run_id, tags).await?;
                }
                Ok(())
            })
        })
        .await
    }

    /// Logs dataset inputs of a run (deduplicated by name and digest, as MLflow does).
    pub async fn log_inputs(&self, run_id: &str, datasets: Vec<DatasetInput>) -> Result<()> {
        validate::run_id(run_id)?;
        for d in &datasets {
            validate::dataset_input(d)?;
        }
        let run_id = run_id.to_string();
        self.write(move |c, seq| {
            Box::pin(async move {
                let exp_id = query::check_run_active(c, &run_id).await?;
                query::insert_inputs(c, &seq, exp_id, &run_id, datasets).await
            })
        })
        .await
    }

    /// Every value of a metric of a run, in MLflow's order (timestamp, step,
    /// value); `max_results` pages them. An unknown run has no history.
    pub async fn get_metric_history(
        &self,
        run_id: &str,
        key: &str,
        max_results: Option<usize>,
        page_token: Option<&str>,
    ) -> Result<Page<Metric>> {
        let offset = search::parse_page_token(page_token)?;
        let limit = max_results.map(|m| m as i64 + 1).unwrap_or(i64::MAX);
        let rows = sqlx::query(
            "SELECT key, value, timestamp, step, is_nan FROM metrics WHERE run_id = $1 AND key = $2 \
             ORDER BY timestamp, step, value LIMIT $3 OFFSET $4",
        )
        .bind(run_id.to_string())
        .bind(key.to_string())
        .bind(limit)
        .bind(offset as i64)
        .fetch_all(&self.inner.pool)
        .await?;
        let mut items = rows.iter().map(query::metric_from_row).collect::<Result<Vec<_>, _>>()?;
        let mut next_page_token = None;
        if let Some(m) = max_results
            && items.len() > m
        {
            items.truncate(m);
            next_page_token = Some(search::create_page_token(offset + m as u64));
        }
        Ok(Page { items, next_page_token })
    }

    /// Up to `max_results` values of a metric per run, evenly sampled over
    /// the history ordered by step (first and last kept), optionally within
    /// `[start_step, end_step]` (MLflow's get-history-bulk-interval).
    pub async fn get_metric_history_bulk_interval(
        &self,
        run_ids: &[String],
        key: &str,
        max_results: usize,
        steps: Option<(i64, i64)>,
    ) -> Result<Vec<RunMetric>> {
        let max_results = max_results.max(1);
        let mut out = vec![];
        for run_id in run_ids {
            let (lo, hi) = steps.unwrap_or((i64::MIN, i64::MAX));
            let rows = sqlx::query(
                "SELECT key, value, timestamp, step, is_nan FROM metrics WHERE run_id = $1 AND key = $2 \
                 AND step >= $3 AND step <= $4 ORDER BY step, timestamp, value, is_nan",
            )
            .bind(run_id.clone())
            .bind(key.to_string())
            .bind(lo)
            .bind(hi)
            .fetch_all(&self.inner.pool)
            .await?;
            let metrics = rows.iter().map(query::metric_from_row).collect::<Result<Vec<_>, _>>()?;
            for metric in sample_evenly(metrics, max_results) {
                out.push(RunMetric {
                    run_id: run_id.clone(),
                    metric,
                });
            }
        }
        Ok(out)
    }

    /// runs/search: runs of `experiment_ids` matching `filter`, ordered by
    /// `order_by` then MLflow's default (start_time DESC, run_id).
    pub async fn search_runs(
        &self,
        experiment_ids: &[String],
        filter: &str,
        view: ViewType,
        order_by: &[String],
        max_results: i64,
        page_token: Option<&str>,
    ) -> Result<Page<Run>> {
        let max_results = validate::max_results(max_results)?;
        let filters = search::parse_run_filter(filter)?;
        let order = search::parse_run_order_by_list(order_by).map_err(|e| match e {
            search::OrderByError::Invalid(e) => StoreError::from(e),
            search::OrderByError::Duplicate(m) => StoreError::Unclassified(m),
        })?;
        let offset = search::parse_page_token(page_token)?;
        let ids = experiment_ids
            .iter()
            .map(|id| validate::parse_experiment_id(id))
            .collect::<Result<Vec<_>>>()?;
        if ids.is_empty() {
            return Ok(Page {
                items: vec![],
                next_page_token: None,
            });
        }
        let mut infos = query::search_runs(
            &self.inner.pool,
            self.inner.backend,
            &ids,
            view,
            &filters,
            &order,
            offset,
            max_results + 1,
        )
        .await?;
        let next_page_token =
            (infos.len() > max_results).then(|| search::create_page_token(offset + max_results as u64));
        infos.truncate(max_results);
        let items = query::load_run_data(&self.inner.pool, self.inner.backend, infos).await?;
        Ok(Page { items, next_page_token })
    }
}

/// Keeps the last value of each key, at the position the key first appeared.
fn dedupe_last_wins(items: Vec<KeyValue>) -> Vec<KeyValue> {
    let mut out: Vec<KeyValue> = Vec::with_capacity(items.len());
    let mut index: HashMap<String, usize> = HashMap::new();
    for kv in items {
        match index.get(&kv.key) {
            Some(&i) => out[i].value = kv.value,
            None => {
                index.insert(kv.key.clone(), out.len());
                out.push(kv);
            }
        }
    }
    out
}

/// `mlflow-artifacts:/<id>`: where a new experiment's artifacts go (the
/// artifact proxy's scheme, as `mlflow server --serve-artifacts` answers).
pub fn default_artifact_location(experiment_id: i64) -> String {
    format!("mlflow-artifacts:/{experiment_id}")
}

/// MLflow's `append_to_uri_path`: `uri` with POSIX `parts` appended to its path.
pub fn append_to_uri_path(uri: &str, parts: &[&str]) -> String {
    let (base, query) = match uri.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (uri, None),
    };
    let mut out = base.trim_end_matches('/').to_string();
    for p in parts {
        let p = p.trim_matches('/');
        if !p.is_empty() {
            out.push('/');
            out.push_str(p);
        }
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// MLflow's sampling for get-history-bulk-interval: the first row of each of
/// `max_results` equal buckets (SQL NTILE) plus the last row.
fn sample_evenly(rows: Vec<Metric>, max_results: usize) -> Vec<Metric> {
    let n = rows.len();
    if n == 0 {
        return rows;
    }
    let buckets = max_results.min(n);
    // NTILE: the first n % buckets buckets have one extra row.
    let (base, extra) = (n / buckets, n % buckets);
    let mut picks = Vec::with_capacity(buckets + 1);
    let mut start = 0;
    for b in 0..buckets {
        picks.push(start);
        start += base + usize::from(b < extra);
    }
    let last = n - 1;
    if picks.last() != Some(&last) {
        if picks.len() >= max_results {
            *picks.last_mut().expect("non-empty") = last;
        } else {
            picks.push(last);
        }
    }
    picks.into_iter().map(|i| rows[i].clone()).collect()
}
