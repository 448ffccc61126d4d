//! SQL of the store: row decoding, the writes the writer runs, and the search
//! queries built from [`search`](super::search) types. Portable SQL only
//! (`$n` placeholders, `ON CONFLICT`, `EXISTS`), with the two places where
//! the engines differ handled explicitly: byte-order string sorting
//! (`COLLATE "C"` on PostgreSQL) and case-sensitive LIKE (a SQLite pragma).
use std::collections::HashMap;

use sqlx::AnyConnection;
use sqlx::any::{Any, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Executor, Row};

use super::search::{
    DatasetField, ExperimentFilter, ExperimentNumAttr, ExperimentOrderKey, Number, RunFilter, RunNumAttr, RunOrder,
    RunOrderKey, RunStrAttr, StrOp,
};
use super::{
    ACTIVE, Backend, DATASET_CONTEXT_TAG, DatasetInput, Experiment, KeyValue, Metric, RUN_NAME_TAG, Run, RunInfo,
    RunStatus, Seq, StoreError, ViewType, default_artifact_location, now_millis,
};

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Rows per multi-row INSERT (well under every engine's bind limit).
const INSERT_CHUNK: usize = 500;
/// Ids per `IN (...)` list.
const IN_CHUNK: usize = 500;

// ---------------------------------------------------------------------------
// Dynamic SQL with numbered placeholders

enum Arg {
    Str(String),
    Int(i64),
    Float(f64),
}

/// Placeholders: `$n` on PostgreSQL, `?` on SQLite. (SQLite treats `$1` as
/// a *named* parameter and looks names up linearly when binding, which makes
/// a 600-parameter INSERT quadratic.)
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Placeholders {
    Numbered,
    Anonymous,
}

impl Placeholders {
    pub fn of(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => Placeholders::Anonymous,
            Backend::Postgres => Placeholders::Numbered,
        }
    }

    /// The style of a writer connection.
    fn of_conn(c: &AnyConnection) -> Self {
        if c.backend_name().eq_ignore_ascii_case("sqlite") {
            Placeholders::Anonymous
        } else {
            Placeholders::Numbered
        }
    }

    fn push(self, s: &mut String, n: usize) {
        match self {
            Placeholders::Numbered => {
                s.push('$');
                s.push_str(&n.to_string());
            }
            Placeholders::Anonymous => s.push('?'),
        }
    }
}

struct Sql {
    text: String,
    args: Vec<Arg>,
    style: Placeholders,
}

impl Sql {
    fn new(style: Placeholders) -> Self {
        Self {
            text: String::new(),
            args: vec![],
            style,
        }
    }

    fn push(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self
    }

    /// Appends a placeholder bound to `arg`.
    fn arg(&mut self, arg: Arg) -> &mut Self {
        self.args.push(arg);
        self.style.push(&mut self.text, self.args.len());
        self
    }

    fn str(&mut self, s: &str) -> &mut Self {
        self.arg(Arg::Str(s.to_string()))
    }

    fn int(&mut self, i: i64) -> &mut Self {
        self.arg(Arg::Int(i))
    }

    fn list<T>(&mut self, items: &[T], mut each: impl FnMut(&mut Self, &T)) -> &mut Self {
        self.push("(");
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            each(self, item);
        }
        self.push(")")
    }

    fn query(self) -> sqlx::query::Query<'static, Any, sqlx::any::AnyArguments> {
        let mut q = sqlx::query(AssertSqlSafe(self.text));
        for a in self.args {
            q = match a {
                Arg::Str(s) => q.bind(s),
                Arg::Int(i) => q.bind(i),
                Arg::Float(f) => q.bind(f),
            };
        }
        q
    }
}

/// `INSERT ... VALUES ($1, .., $cols), (...)` for `rows` rows, then `tail`.
fn insert_sql(style: Placeholders, head: &str, cols: usize, rows: usize, tail: &str) -> String {
    let mut s = String::with_capacity(head.len() + tail.len() + rows * cols * 5);
    s.push_str(head);
    let mut n = 0;
    for r in 0..rows {
        if r > 0 {
            s.push_str(", ");
        }
        s.push('(');
        for c in 0..cols {
            if c > 0 {
                s.push_str(", ");
            }
            n += 1;
            style.push(&mut s, n);
        }
        s.push(')');
    }
    s.push_str(tail);
    s
}

// ---------------------------------------------------------------------------
// Rows

pub const SELECT_EXPERIMENT_BY_ID: &str = "SELECT experiment_id, name, artifact_location, lifecycle_stage, \
     creation_time, last_update_time FROM experiments WHERE experiment_id = $1";
pub const SELECT_EXPERIMENT_BY_NAME: &str = "SELECT experiment_id, name, artifact_location, lifecycle_stage, \
     creation_time, last_update_time FROM experiments WHERE name = $1";
const RUN_COLUMNS: &str = "r.run_id, r.experiment_id, r.name, r.user_id, r.status, r.start_time, r.end_time, r.artifact_uri, r.lifecycle_stage";

pub fn experiment_from_row(row: &AnyRow) -> Result<Experiment, sqlx::Error> {
    Ok(Experiment {
        experiment_id: row.try_get::<i64, _>(0)?.to_string(),
        name: row.try_get(1)?,
        artifact_location: row.try_get(2)?,
        lifecycle_stage: row.try_get(3)?,
        creation_time: row.try_get(4)?,
        last_update_time: row.try_get(5)?,
        tags: vec![],
    })
}

fn run_info_from_row(row: &AnyRow) -> Result<RunInfo, sqlx::Error> {
    let status: String = row.try_get(4)?;
    Ok(RunInfo {
        run_id: row.try_get(0)?,
        experiment_id: row.try_get::<i64, _>(1)?.to_string(),
        run_name: row.try_get(2)?,
        user_id: row.try_get(3)?,
        status: RunStatus::parse(&status).unwrap_or(RunStatus::Running),
        start_time: row.try_get(5)?,
        end_time: row.try_get(6)?,
        artifact_uri: row.try_get(7)?,
        lifecycle_stage: row.try_get(8)?,
    })
}

/// A metric from `key, value, timestamp, step, is_nan` columns at `offset`.
fn metric_at(row: &AnyRow, offset: usize) -> Result<Metric, sqlx::Error> {
    let is_nan: i64 = row.try_get(offset + 4)?;
    let value: f64 = row.try_get(offset + 1)?;
    Ok(Metric {
        key: row.try_get(offset)?,
        value: if is_nan != 0 { f64::NAN } else { value },
        timestamp: row.try_get(offset + 2)?,
        step: row.try_get(offset + 3)?,
    })
}

/// A metric from a `key, value, timestamp, step, is_nan` row.
pub fn metric_from_row(row: &AnyRow) -> Result<Metric, sqlx::Error> {
    metric_at(row, 0)
}

/// How MLflow stores a value: NaN as 0 with `is_nan`, ±infinity as ±f64::MAX.
fn sanitize(value: f64) -> (f64, i64) {
    if value.is_nan() {
        (0.0, 1)
    } else if value.is_infinite() {
        (if value > 0.0 { f64::MAX } else { f64::MIN }, 0)
    } else {
        (value, 0)
    }
}

// ---------------------------------------------------------------------------
// Experiments

pub async fn experiment_id_by_name(c: &mut AnyConnection, name: &str) -> Result<Option<i64>> {
    let row = sqlx::query("SELECT experiment_id FROM experiments WHERE name = $1")
        .bind(name.to_string())
        .fetch_optional(&mut *c)
        .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

/// Inserts an experiment with the next id; returns the id.
pub async fn insert_experiment(
    c: &mut AnyConnection,
    seq: &Seq,
    name: &str,
    artifact_location: Option<String>,
    tags: &[KeyValue],
) -> Result<String> {
    let id: i64 = sqlx::query("SELECT COALESCE(MAX(experiment_id), 0) + 1 FROM experiments")
        .fetch_one(&mut *c)
        .await?
        .try_get(0)?;
    let now = now_millis();
    sqlx::query(
        "INSERT INTO experiments (experiment_id, name, artifact_location, lifecycle_stage, creation_time, \
         last_update_time) VALUES ($1, $2, $3, $4, $5, $5)",
    )
    .bind(id)
    .bind(name.to_string())
    .bind(artifact_location.unwrap_or_else(|| default_artifact_location(id)))
    .bind(ACTIVE)
    .bind(now)
    .execute(&mut *c)
    .await?;
    upsert_experiment_tags(c, seq, id, tags).await?;
    Ok(id.to_string())
}

/// The lifecycle stage of an experiment (404 when missing).
pub async fn experiment_stage(c: &mut AnyConnection, id: i64) -> Result<String> {
    let row = sqlx::query("SELECT lifecycle_stage FROM experiments WHERE experiment_id = $1")
        .bind(id)
        .fetch_optional(&mut *c)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("No Experiment with id={id} exists")))?;
    Ok(row.try_get(0)?)
}

/// 404 for a missing experiment, INVALID_PARAMETER_VALUE for a deleted one.
pub async fn check_experiment_active(c: &mut AnyConnection, id: i64) -> Result<()> {
    let stage = experiment_stage(c, id).await?;
    if stage != ACTIVE {
        return Err(StoreError::Invalid(format!(
            "The experiment {id} must be in the 'active' state. Current state is {stage}."
        )));
    }
    Ok(())
}

pub async fn upsert_experiment_tags(c: &mut AnyConnection, seq: &Seq, id: i64, tags: &[KeyValue]) -> Result<()> {
    let tags = super::dedupe_last_wins(tags.to_vec());
    for chunk in tags.chunks(INSERT_CHUNK) {
        let sql = insert_sql(
            Placeholders::of_conn(c),
            "INSERT INTO experiment_tags (experiment_id, key, value, seq) VALUES ",
            4,
            chunk.len(),
            " ON CONFLICT (experiment_id, key) DO UPDATE SET value = excluded.value",
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for t in chunk {
            q = q.bind(id).bind(t.key.clone()).bind(t.value.clone()).bind(seq.next());
        }
        q.execute(&mut *c).await?;
    }
    Ok(())
}

/// Fills in the tags of `exps`.
pub async fn load_experiment_tags(pool: &AnyPool, backend: Backend, exps: &mut [Experiment]) -> Result<()> {
    let ids: Vec<i64> = exps.iter().filter_map(|e| e.experiment_id.parse().ok()).collect();
    let mut tags: HashMap<String, Vec<KeyValue>> = HashMap::new();
    for chunk in ids.chunks(IN_CHUNK) {
        let mut sql = Sql::new(Placeholders::of(backend));
        sql.push("SELECT experiment_id, key, value FROM experiment_tags WHERE experiment_id IN ")
            .list(chunk, |s, id| {
                s.int(*id);
            })
            .push(" ORDER BY seq");
        for row in sql.query().fetch_all(pool).await? {
            let id: i64 = row.try_get(0)?;
            tags.entry(id.to_string()).or_default().push(KeyValue::new(
                row.try_get::<String, _>(1)?,
                row.try_get::<String, _>(2)?,
            ));
        }
    }
    for e in exps {
        e.tags = tags.remove(&e.experiment_id).unwrap_or_default();
    }
    Ok(())
}

/// A text column in an ORDER BY: byte order on every engine.
fn text_order(backend: Backend, column: &str) -> String {
    match backend {
        Backend::Sqlite => column.to_string(),
        Backend::Postgres => format!("{column} COLLATE \"C\""),
    }
}

/// `column <op> value` for a string comparison.
fn str_cmp(sql: &mut Sql, column: &str, op: &StrOp) {
    match op {
        StrOp::Eq(v) => {
            sql.push(column).push(" = ").str(v);
        }
        StrOp::Ne(v) => {
            sql.push(column).push(" != ").str(v);
        }
        StrOp::Like(v) => {
            sql.push(column).push(" LIKE ").str(v);
        }
        StrOp::ILike(v) => {
            sql.push("LOWER(").push(column).push(") LIKE LOWER(").str(v).push(")");
        }
        StrOp::In(vs) => {
            sql.push(column).push(" IN ").list(vs, |s, v| {
                s.str(v);
            });
        }
        StrOp::NotIn(vs) => {
            sql.push(column).push(" NOT IN ").list(vs, |s, v| {
                s.str(v);
            });
        }
        // Handled by the callers (existence of a key).
        StrOp::IsNull | StrOp::IsNotNull => {
            sql.push("1 = 1");
        }
    }
}

/// Experiments matching `filters` in `order`, from `offset`, at most `limit`.
pub async fn search_experiments(
    pool: &AnyPool,
    backend: Backend,
    view: ViewType,
    filters: &[ExperimentFilter],
    order: &[(ExperimentOrderKey, bool)],
    offset: u64,
    limit: usize,
) -> Result<Vec<Experiment>> {
    let mut sql = Sql::new(Placeholders::of(backend));
    sql.push(
        "SELECT e.experiment_id, e.name, e.artifact_location, e.lifecycle_stage, e.creation_time, \
         e.last_update_time FROM experiments e WHERE e.lifecycle_stage IN ",
    )
    .list(view.stages(), |s, st| {
        s.str(st);
    });
    for f in filters {
        sql.push(" AND ");
        match f {
            ExperimentFilter::Name(op) => str_cmp(&mut sql, "e.name", op),
            ExperimentFilter::Id { negate, ids } => {
                sql.push(if *negate {
                    "e.experiment_id NOT IN "
                } else {
                    "e.experiment_id IN "
                })
                .list(ids, |s, id| {
                    s.int(*id);
                });
            }
            ExperimentFilter::Time { attr, op, value } => {
                let col = match attr {
                    ExperimentNumAttr::CreationTime => "e.creation_time",
                    ExperimentNumAttr::LastUpdateTime => "e.last_update_time",
                };
                sql.push(col).push(" ").push(op.sql()).push(" ").int(*value);
            }
            ExperimentFilter::Tag { key, op } => {
                let negate = *op == StrOp::IsNull;
                sql.push(if negate { "NOT EXISTS" } else { "EXISTS" })
                    .push(" (SELECT 1 FROM experiment_tags t WHERE t.experiment_id = e.experiment_id AND t.key = ")
                    .str(key);
                if !matches!(op, StrOp::IsNull | StrOp::IsNotNull) {
                    sql.push(" AND ");
                    str_cmp(&mut sql, "t.value", op);
                }
                sql.push(")");
            }
        }
    }
    sql.push(" ORDER BY ");
    for (i, (key, asc)) in order.iter().enumerate() {
        if i > 0 {
            sql.push(", ");
        }
        let col = match key {
            ExperimentOrderKey::Name => text_order(backend, "e.name"),
            ExperimentOrderKey::ExperimentId => "e.experiment_id".into(),
            ExperimentOrderKey::CreationTime => "e.creation_time".into(),
            ExperimentOrderKey::LastUpdateTime => "e.last_update_time".into(),
        };
        sql.push(&col).push(if *asc { " ASC" } else { " DESC" });
    }
    sql.push(" LIMIT ")
        .int(limit as i64)
        .push(" OFFSET ")
        .int(offset as i64);
    let rows = sql.query().fetch_all(pool).await?;
    let mut exps = rows.iter().map(experiment_from_row).collect::<Result<Vec<_>, _>>()?;
    load_experiment_tags(pool, backend, &mut exps).await?;
    Ok(exps)
}

// ---------------------------------------------------------------------------
// Runs

/// A run's experiment id and lifecycle stage (404 when missing).
async fn run_state(c: &mut AnyConnection, run_id: &str) -> Result<(i64, String)> {
    let row = sqlx::query("SELECT experiment_id, lifecycle_stage FROM runs WHERE run_id = $1")
        .bind(run_id.to_string())
        .fetch_optional(&mut *c)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("Run with id={run_id} not found")))?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// A run's lifecycle stage (404 when missing).
pub async fn run_stage(c: &mut AnyConnection, run_id: &str) -> Result<String> {
    Ok(run_state(c, run_id).await?.1)
}

/// 404 for a missing run, INVALID_PARAMETER_VALUE for a deleted one; the run's experiment id.
pub async fn check_run_active(c: &mut AnyConnection, run_id: &str) -> Result<i64> {
    let (exp, stage) = run_state(c, run_id).await?;
    if stage != ACTIVE {
        return Err(StoreError::Invalid(format!(
            "The run {run_id} must be in the 'active' state. Current state is {stage}."
        )));
    }
    Ok(exp)
}

pub async fn run_info<'c, E: Executor<'c, Database = Any>>(e: E, run_id: &str) -> Result<RunInfo> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM runs r WHERE r.run_id = $1"
    )))
    .bind(run_id.to_string())
    .fetch_optional(e)
    .await?
    .ok_or_else(|| StoreError::NotFound(format!("Run with id={run_id} not found")))?;
    Ok(run_info_from_row(&row)?)
}

/// MLflow's `update_run_info`: a name also sets the `mlflow.runName` tag.
pub async fn update_run_info(
    c: &mut AnyConnection,
    seq: &Seq,
    run_id: &str,
    status: Option<RunStatus>,
    end_time: Option<i64>,
    run_name: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "UPDATE runs SET status = COALESCE($1, status), end_time = COALESCE($2, end_time), \
         name = COALESCE($3, name) WHERE run_id = $4",
    )
    .bind(status.map(|s| s.as_str().to_string()))
    .bind(end_time)
    .bind(run_name.map(str::to_string))
    .bind(run_id.to_string())
    .execute(&mut *c)
    .await?;
    if let Some(name) = run_name {
        upsert_run_tags(c, seq, run_id, &[KeyValue::new(super::RUN_NAME_TAG, name)]).await?;
    }
    Ok(())
}

/// Inserts or overwrites run tags (no run-name handling).
pub async fn upsert_run_tags(c: &mut AnyConnection, seq: &Seq, run_id: &str, tags: &[KeyValue]) -> Result<()> {
    for chunk in tags.chunks(INSERT_CHUNK) {
        let sql = insert_sql(
            Placeholders::of_conn(c),
            "INSERT INTO run_tags (run_id, key, value, seq) VALUES ",
            4,
            chunk.len(),
            " ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value",
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for t in chunk {
            q = q
                .bind(run_id.to_string())
                .bind(t.key.clone())
                .bind(t.value.clone())
                .bind(seq.next());
        }
        q.execute(&mut *c).await?;
    }
    Ok(())
}

/// MLflow's `set_tag`/`_set_tags`: the last value of a key wins, and
/// `mlflow.runName` renames the run (an empty name is ignored).
pub async fn set_run_tags(c: &mut AnyConnection, seq: &Seq, run_id: &str, tags: Vec<KeyValue>) -> Result<()> {
    let mut tags = super::dedupe_last_wins(tags);
    if let Some(pos) = tags.iter().position(|t| t.key == RUN_NAME_TAG) {
        let name = tags.remove(pos).value;
        if !name.is_empty() {
            update_run_info(c, seq, run_id, None, None, Some(&name)).await?;
        }
    }
    upsert_run_tags(c, seq, run_id, &tags).await
}

pub async fn insert_params(c: &mut AnyConnection, seq: &Seq, run_id: &str, params: &[KeyValue]) -> Result<()> {
    for chunk in params.chunks(INSERT_CHUNK) {
        let sql = insert_sql(
            Placeholders::of_conn(c),
            "INSERT INTO params (run_id, key, value, seq) VALUES ",
            4,
            chunk.len(),
            " ON CONFLICT (run_id, key) DO NOTHING",
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for p in chunk {
            q = q
                .bind(run_id.to_string())
                .bind(p.key.clone())
                .bind(p.value.clone())
                .bind(seq.next());
        }
        q.execute(&mut *c).await?;
    }
    Ok(())
}

/// Inserts metric values (an identical point again is a no-op) and moves
/// each key's latest value forward: the largest (step, timestamp, value),
/// NaN counting as 0, the first of equals winning, as in MLflow.
pub async fn insert_metrics(c: &mut AnyConnection, seq: &Seq, run_id: &str, metrics: &[Metric]) -> Result<()> {
    if metrics.is_empty() {
        return Ok(());
    }
    let rows: Vec<(&str, i64, i64, f64, i64)> = metrics
        .iter()
        .map(|m| {
            let (value, is_nan) = sanitize(m.value);
            (m.key.as_str(), m.timestamp, m.step, value, is_nan)
        })
        .collect();
    for chunk in rows.chunks(INSERT_CHUNK) {
        let sql = insert_sql(
            Placeholders::of_conn(c),
            "INSERT INTO metrics (run_id, key, timestamp, step, value, is_nan) VALUES ",
            6,
            chunk.len(),
            " ON CONFLICT DO NOTHING",
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (key, ts, step, value, is_nan) in chunk {
            q = q
                .bind(run_id.to_string())
                .bind(key.to_string())
                .bind(*ts)
                .bind(*step)
                .bind(*value)
                .bind(*is_nan);
        }
        q.execute(&mut *c).await?;
    }
    // The newest value of each key within this batch.
    let mut latest: Vec<(&str, i64, i64, f64, i64)> = vec![];
    let mut index: HashMap<&str, usize> = HashMap::new();
    for r in &rows {
        match index.get(r.0) {
            Some(&i) => {
                let cur = latest[i];
                if (r.2, r.1, r.3) > (cur.2, cur.1, cur.3) {
                    latest[i] = *r;
                }
            }
            None => {
                index.insert(r.0, latest.len());
                latest.push(*r);
            }
        }
    }
    for chunk in latest.chunks(INSERT_CHUNK) {
        let sql = insert_sql(
            Placeholders::of_conn(c),
            "INSERT INTO latest_metrics (run_id, key, timestamp, step, value, is_nan, seq) VALUES ",
            7,
            chunk.len(),
            " ON CONFLICT (run_id, key) DO UPDATE SET timestamp = excluded.timestamp, step = excluded.step, \
             value = excluded.value, is_nan = excluded.is_nan \
             WHERE excluded.step > latest_metrics.step \
             OR (excluded.step = latest_metrics.step AND excluded.timestamp > latest_metrics.timestamp) \
             OR (excluded.step = latest_metrics.step AND excluded.timestamp = latest_metrics.timestamp \
             AND excluded.value > latest_metrics.value)",
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (key, ts, step, value, is_nan) in chunk {
            q = q
                .bind(run_id.to_string())
                .bind(key.to_string())
                .bind(*ts)
                .bind(*step)
                .bind(*value)
                .bind(*is_nan)
                .bind(seq.next());
        }
        q.execute(&mut *c).await?;
    }
    Ok(())
}

/// MLflow's `_log_inputs_impl`: datasets are shared per experiment by (name,
/// digest); a run links each dataset once, with the tags of the first link.
pub async fn insert_inputs(
    c: &mut AnyConnection,
    seq: &Seq,
    experiment_id: i64,
    run_id: &str,
    inputs: Vec<DatasetInput>,
) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for input in inputs {
        let ds = &input.dataset;
        if !seen.insert((ds.name.clone(), ds.digest.clone())) {
            continue;
        }
        let existing =
            sqlx::query("SELECT dataset_id FROM datasets WHERE experiment_id = $1 AND name = $2 AND digest = $3")
                .bind(experiment_id)
                .bind(ds.name.clone())
                .bind(ds.digest.clone())
                .fetch_optional(&mut *c)
                .await?;
        let dataset_id: String = match existing {
            Some(row) => row.try_get(0)?,
            None => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                sqlx::query(
                    "INSERT INTO datasets (dataset_id, experiment_id, name, digest, source_type, source, schema, \
                     profile) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(id.clone())
                .bind(experiment_id)
                .bind(ds.name.clone())
                .bind(ds.digest.clone())
                .bind(ds.source_type.clone())
                .bind(ds.source.clone())
                .bind(ds.schema.clone())
                .bind(ds.profile.clone())
                .execute(&mut *c)
                .await?;
                id
            }
        };
        let linked = sqlx::query("SELECT 1 FROM run_inputs WHERE run_id = $1 AND dataset_id = $2")
            .bind(run_id.to_string())
            .bind(dataset_id.clone())
            .fetch_optional(&mut *c)
            .await?;
        if linked.is_some() {
            continue;
        }
        let input_id = uuid::Uuid::new_v4().simple().to_string();
        sqlx::query("INSERT INTO run_inputs (input_id, run_id, dataset_id, seq) VALUES ($1, $2, $3, $4)")
            .bind(input_id.clone())
            .bind(run_id.to_string())
            .bind(dataset_id)
            .bind(seq.next())
            .execute(&mut *c)
            .await?;
        let tags = super::dedupe_last_wins(input.tags);
        for chunk in tags.chunks(INSERT_CHUNK) {
            let sql = insert_sql(
                Placeholders::of_conn(c),
                "INSERT INTO input_tags (input_id, key, value, seq) VALUES ",
                4,
                chunk.len(),
                "",
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for t in chunk {
                q = q
                    .bind(input_id.clone())
                    .bind(t.key.clone())
                    .bind(t.value.clone())
                    .bind(seq.next());
            }
            q.execute(&mut *c).await?;
        }
    }
    Ok(())
}

/// Runs with their latest metrics, params, tags and inputs, in the order of `infos`.
pub async fn load_run_data(pool: &AnyPool, backend: Backend, infos: Vec<RunInfo>) -> Result<Vec<Run>> {
    let mut runs: Vec<Run> = infos
        .into_iter()
        .map(|info| Run {
            info,
            metrics: vec![],
            params: vec![],
            tags: vec![],
            inputs: vec![],
        })
        .collect();
    let index: HashMap<String, usize> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| (r.info.run_id.clone(), i))
        .collect();
    let ids: Vec<String> = runs.iter().map(|r| r.info.run_id.clone()).collect();
    let mut input_ids: Vec<(String, usize, usize)> = vec![];
    for chunk in ids.chunks(IN_CHUNK) {
        let in_list = |head: &str, tail: &str| {
            let mut sql = Sql::new(Placeholders::of(backend));
            sql.push(head).list(chunk, |s, id| {
                s.str(id);
            });
            sql.push(tail);
            sql
        };
        // Params and tags: the same (run_id, key, value) rows from two tables.
        for (table, is_params) in [("params", true), ("run_tags", false)] {
            let rows = in_list(
                &format!("SELECT run_id, key, value FROM {table} WHERE run_id IN "),
                " ORDER BY seq",
            )
            .query()
            .fetch_all(pool)
            .await?;
            for row in rows {
                let id: String = row.try_get(0)?;
                let kv = KeyValue::new(row.try_get::<String, _>(1)?, row.try_get::<String, _>(2)?);
                let run = &mut runs[index[&id]];
                if is_params {
                    run.params.push(kv)
                } else {
                    run.tags.push(kv)
                }
            }
        }
        let rows = in_list(
            "SELECT run_id, key, value, timestamp, step, is_nan FROM latest_metrics WHERE run_id IN ",
            " ORDER BY seq",
        )
        .query()
        .fetch_all(pool)
        .await?;
        for row in rows {
            let id: String = row.try_get(0)?;
            runs[index[&id]].metrics.push(metric_at(&row, 1)?);
        }
        let rows = in_list(
            "SELECT i.run_id, i.input_id, d.name, d.digest, d.source_type, d.source, d.schema, d.profile \
             FROM run_inputs i JOIN datasets d ON d.dataset_id = i.dataset_id WHERE i.run_id IN ",
            " ORDER BY i.seq",
        )
        .query()
        .fetch_all(pool)
        .await?;
        for row in rows {
            let id: String = row.try_get(0)?;
            let run = &mut runs[index[&id]];
            input_ids.push((row.try_get(1)?, index[&id], run.inputs.len()));
            run.inputs.push(DatasetInput {
                tags: vec![],
                dataset: super::Dataset {
                    name: row.try_get(2)?,
                    digest: row.try_get(3)?,
                    source_type: row.try_get(4)?,
                    source: row.try_get(5)?,
                    schema: row.try_get(6)?,
                    profile: row.try_get(7)?,
                },
            });
        }
    }
    let where_input: HashMap<String, (usize, usize)> = input_ids.into_iter().map(|(id, r, i)| (id, (r, i))).collect();
    let keys: Vec<String> = where_input.keys().cloned().collect();
    for chunk in keys.chunks(IN_CHUNK) {
        let mut sql = Sql::new(Placeholders::of(backend));
        sql.push("SELECT input_id, key, value FROM input_tags WHERE input_id IN ")
            .list(chunk, |s, id| {
                s.str(id);
            })
            .push(" ORDER BY seq");
        for row in sql.query().fetch_all(pool).await? {
            let id: String = row.try_get(0)?;
            let (r, i) = where_input[&id];
            runs[r].inputs[i].tags.push(KeyValue::new(
                row.try_get::<String, _>(1)?,
                row.try_get::<String, _>(2)?,
            ));
        }
    }
    Ok(runs)
}

/// EXISTS/NOT EXISTS over a key/value table of runs.
fn kv_filter(sql: &mut Sql, table: &str, key: &str, op: &StrOp) {
    sql.push(if *op == StrOp::IsNull { "NOT EXISTS" } else { "EXISTS" })
        .push(" (SELECT 1 FROM ")
        .push(table)
        .push(" f WHERE f.run_id = r.run_id AND f.key = ")
        .str(key);
    if !matches!(op, StrOp::IsNull | StrOp::IsNotNull) {
        sql.push(" AND ");
        str_cmp(sql, "f.value", op);
    }
    sql.push(")");
}

fn run_attr_column(attr: &str) -> Option<(&'static str, bool)> {
    Some(match attr {
        "start_time" => ("r.start_time", false),
        "end_time" => ("r.end_time", false),
        "status" => ("r.status", true),
        "run_id" => ("r.run_id", true),
        "run_name" => ("r.name", true),
        "artifact_uri" => ("r.artifact_uri", true),
        "user_id" => ("r.user_id", true),
        _ => return None,
    })
}

/// The page of run infos a search selects (MLflow's `_search_runs` ordering,
/// NaN and missing values last).
#[allow(clippy::too_many_arguments)]
pub async fn search_runs(
    pool: &AnyPool,
    backend: Backend,
    experiment_ids: &[i64],
    view: ViewType,
    filters: &[RunFilter],
    order: &[RunOrder],
    offset: u64,
    limit: usize,
) -> Result<Vec<RunInfo>> {
    let mut sql = Sql::new(Placeholders::of(backend));
    sql.push("SELECT ").push(RUN_COLUMNS).push(" FROM runs r");
    // Outer joins for ordering on metrics, params and tags.
    for (i, o) in order.iter().enumerate() {
        let (table, key) = match &o.key {
            RunOrderKey::Metric(k) => ("latest_metrics", k),
            RunOrderKey::Param(k) => ("params", k),
            RunOrderKey::Tag(k) => ("run_tags", k),
            RunOrderKey::Attribute(_) => continue,
        };
        sql.push(&format!(
            " LEFT JOIN {table} o{i} ON o{i}.run_id = r.run_id AND o{i}.key = "
        ))
        .str(key);
    }
    sql.push(" WHERE r.experiment_id IN ")
        .list(experiment_ids, |s, id| {
            s.int(*id);
        })
        .push(" AND r.lifecycle_stage IN ")
        .list(view.stages(), |s, st| {
            s.str(st);
        });
    for f in filters {
        sql.push(" AND ");
        match f {
            RunFilter::Metric { key, op, value } => {
                sql.push("EXISTS (SELECT 1 FROM latest_metrics f WHERE f.run_id = r.run_id AND f.key = ")
                    .str(key)
                    .push(" AND (f.value ")
                    .push(op.sql())
                    .push(" ")
                    .arg(Arg::Float(*value));
                // NaN (stored as 0) satisfies only `!=`.
                sql.push(if op.sql() == "!=" {
                    " OR f.is_nan = 1))"
                } else {
                    " AND f.is_nan = 0))"
                });
            }
            RunFilter::Param { key, op } => kv_filter(&mut sql, "params", key, op),
            RunFilter::Tag { key, op } => kv_filter(&mut sql, "run_tags", key, op),
            RunFilter::StrAttr {
                attr: RunStrAttr::RunName,
                op,
            } => kv_filter(&mut sql, "run_tags", RUN_NAME_TAG, op),
            RunFilter::StrAttr { attr, op } => {
                let col = match attr {
                    RunStrAttr::RunId => "r.run_id",
                    RunStrAttr::Status => "r.status",
                    RunStrAttr::ArtifactUri => "r.artifact_uri",
                    RunStrAttr::UserId => "r.user_id",
                    RunStrAttr::RunName => "r.name",
                };
                str_cmp(&mut sql, col, op);
            }
            RunFilter::NumAttr { attr, op, value } => {
                let col = match attr {
                    RunNumAttr::StartTime => "r.start_time",
                    RunNumAttr::EndTime => "r.end_time",
                };
                sql.push(col).push(" ").push(op.sql()).push(" ");
                match value {
                    Number::Int(i) => sql.int(*i),
                    Number::Float(f) => sql.arg(Arg::Float(*f)),
                };
            }
            RunFilter::Dataset {
                field: DatasetField::Context,
                op,
            } => {
                sql.push(
                    "EXISTS (SELECT 1 FROM run_inputs i JOIN input_tags t ON t.input_id = i.input_id \
                     WHERE i.run_id = r.run_id AND t.key = ",
                )
                .str(DATASET_CONTEXT_TAG)
                .push(" AND ");
                str_cmp(&mut sql, "t.value", op);
                sql.push(")");
            }
            RunFilter::Dataset { field, op } => {
                sql.push(
                    "EXISTS (SELECT 1 FROM run_inputs i JOIN datasets d ON d.dataset_id = i.dataset_id \
                     WHERE i.run_id = r.run_id AND ",
                );
                let col = if *field == DatasetField::Name {
                    "d.name"
                } else {
                    "d.digest"
                };
                str_cmp(&mut sql, col, op);
                sql.push(")");
            }
        }
    }
    sql.push(" ORDER BY ");
    let mut orders_start_time = false;
    for (i, o) in order.iter().enumerate() {
        let dir = if o.ascending { " ASC" } else { " DESC" };
        match &o.key {
            RunOrderKey::Metric(_) => {
                sql.push(&format!(
                    "CASE WHEN o{i}.is_nan = 1 THEN 1 WHEN o{i}.value IS NULL THEN 2 ELSE 0 END, o{i}.value{dir}, "
                ));
            }
            RunOrderKey::Param(_) | RunOrderKey::Tag(_) => {
                let col = text_order(backend, &format!("o{i}.value"));
                sql.push(&format!("CASE WHEN o{i}.value IS NULL THEN 1 ELSE 0 END, {col}{dir}, "));
            }
            RunOrderKey::Attribute(a) => {
                let (col, text) =
                    run_attr_column(a).ok_or_else(|| StoreError::Invalid(format!("Invalid attribute key '{a}'")))?;
                orders_start_time |= a == "start_time";
                let ordered = if text {
                    text_order(backend, col)
                } else {
                    col.to_string()
                };
                sql.push(&format!("CASE WHEN {col} IS NULL THEN 1 ELSE 0 END, {ordered}{dir}, "));
            }
        }
    }
    if !orders_start_time {
        sql.push("r.start_time DESC, ");
    }
    sql.push(&text_order(backend, "r.run_id"));
    sql.push(" LIMIT ")
        .int(limit as i64)
        .push(" OFFSET ")
        .int(offset as i64);
    let rows = sql.query().fetch_all(pool).await?;
    Ok(rows.iter().map(run_info_from_row).collect::<Result<Vec<_>, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_numbered_multi_row_inserts() {
        assert_eq!(
            insert_sql(
                Placeholders::Numbered,
                "INSERT INTO t (a, b) VALUES ",
                2,
                2,
                " ON CONFLICT DO NOTHING"
            ),
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4) ON CONFLICT DO NOTHING"
        );
        let mut sql = Sql::new(Placeholders::Numbered);
        sql.push("x IN ").list(&["a", "b"], |s, v| {
            s.str(v);
        });
        sql.push(" AND y = ").int(3);
        assert_eq!(sql.text, "x IN ($1, $2) AND y = $3");
        assert_eq!(sql.args.len(), 3);
    }

    #[test]
    fn sanitizes_like_mlflow() {
        assert_eq!(sanitize(f64::NAN), (0.0, 1));
        assert_eq!(sanitize(f64::INFINITY), (f64::MAX, 0));
        assert_eq!(sanitize(f64::NEG_INFINITY), (-f64::MAX, 0));
        assert_eq!(sanitize(1.5), (1.5, 0));
    }
}
