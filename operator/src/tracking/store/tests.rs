//! Store tests against temporary SQLite files.
use super::*;

struct TempDb {
    dir: std::path::PathBuf,
}

impl TempDb {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("mlplane-store-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    fn url(&self) -> String {
        format!("sqlite://{}", self.dir.join("tracking.db").display())
    }

    async fn open(&self) -> Store {
        Store::connect(&self.url()).await.unwrap()
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn metric(key: &str, value: f64, timestamp: i64, step: i64) -> Metric {
    Metric {
        key: key.into(),
        value,
        timestamp,
        step,
    }
}

fn code(e: StoreError) -> &'static str {
    ApiError::from(e).code
}

#[tokio::test]
async fn experiments_crud() {
    let db = TempDb::new();
    let s = db.open().await;
    let default = s.get_experiment("0").await.unwrap();
    assert_eq!(default.name, "Default");
    assert_eq!(default.artifact_location, "mlflow-artifacts:/0");
    assert_eq!(default.lifecycle_stage, "active");

    let id = s
        .create_experiment("e1", None, &[KeyValue::new("k", "v")])
        .await
        .unwrap();
    assert_eq!(id, "1");
    let e = s.get_experiment(&id).await.unwrap();
    assert_eq!(e.artifact_location, "mlflow-artifacts:/1");
    assert_eq!(e.tags, vec![KeyValue::new("k", "v")]);
    assert_eq!(e.creation_time, e.last_update_time);
    assert_eq!(
        code(s.create_experiment("e1", None, &[]).await.unwrap_err()),
        "RESOURCE_ALREADY_EXISTS"
    );
    assert_eq!(
        s.create_experiment("", None, &[]).await.unwrap_err().to_string(),
        "Invalid experiment name: ''"
    );
    assert_eq!(s.create_experiment("e2", Some("s3://b/x"), &[]).await.unwrap(), "2");
    assert_eq!(s.get_experiment("2").await.unwrap().artifact_location, "s3://b/x");
    assert_eq!(s.get_or_create_experiment("e1").await.unwrap(), "1");
    assert_eq!(s.get_or_create_experiment("vision/resnet").await.unwrap(), "3");
    assert_eq!(s.experiment_name("3").await.unwrap().as_deref(), Some("vision/resnet"));
    assert_eq!(s.experiment_name("99").await.unwrap(), None);
    assert_eq!(s.experiment_name("abc").await.unwrap(), None);

    let err = s.get_experiment("99").await.unwrap_err();
    assert_eq!(err.to_string(), "No Experiment with id=99 exists");
    assert_eq!(code(err), "RESOURCE_DOES_NOT_EXIST");
    assert_eq!(
        s.get_experiment("abc").await.unwrap_err().to_string(),
        "Invalid experiment ID 'abc'. Experiment ID must be a valid integer."
    );
    assert_eq!(
        s.get_experiment_by_name("e1").await.unwrap().unwrap().experiment_id,
        "1"
    );
    assert!(s.get_experiment_by_name("nope").await.unwrap().is_none());

    s.set_experiment_tag("1", "k2", "v2").await.unwrap();
    s.set_experiment_tag("1", "k", "v3").await.unwrap();
    let tags = s.get_experiment("1").await.unwrap().tags;
    assert_eq!(tags, vec![KeyValue::new("k", "v3"), KeyValue::new("k2", "v2")]);
    s.delete_experiment_tag("1", "k2").await.unwrap();
    assert_eq!(
        s.delete_experiment_tag("1", "zz").await.unwrap_err().to_string(),
        "No tag with name: zz in experiment with id 1"
    );

    s.rename_experiment("1", "e1b").await.unwrap();
    assert_eq!(s.get_experiment("1").await.unwrap().name, "e1b");
    assert_eq!(code(s.rename_experiment("1", "e2").await.unwrap_err()), "BAD_REQUEST");

    let run = s.create_run("1", "u", None, 1, vec![]).await.unwrap();
    s.delete_experiment("1").await.unwrap();
    assert_eq!(s.get_experiment("1").await.unwrap().lifecycle_stage, "deleted");
    assert_eq!(
        s.get_run(&run.info.run_id).await.unwrap().info.lifecycle_stage,
        "deleted"
    );
    assert_eq!(
        s.delete_experiment("1").await.unwrap_err().to_string(),
        "No Experiment with id=1 exists"
    );
    assert_eq!(
        s.create_run("1", "u", None, 1, vec![]).await.unwrap_err().to_string(),
        "The experiment 1 must be in the 'active' state. Current state is deleted."
    );
    assert_eq!(
        s.set_experiment_tag("1", "a", "b").await.unwrap_err().to_string(),
        "The experiment 1 must be in the 'active' state. Current state is deleted."
    );
    assert_eq!(code(s.rename_experiment("1", "x").await.unwrap_err()), "INVALID_STATE");
    s.restore_experiment("1").await.unwrap();
    assert_eq!(
        s.get_run(&run.info.run_id).await.unwrap().info.lifecycle_stage,
        "active"
    );
    assert_eq!(
        code(s.restore_experiment("1").await.unwrap_err()),
        "RESOURCE_DOES_NOT_EXIST"
    );
}

#[tokio::test]
async fn search_experiments_filters_orders_and_pages() {
    let db = TempDb::new();
    let s = db.open().await;
    for (name, tag) in [("alpha", "x"), ("beta", "y"), ("alphabet", "x"), ("Alpha2", "z")] {
        s.create_experiment(name, None, &[KeyValue::new("t", tag)])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    s.delete_experiment("2").await.unwrap();
    let names = |p: &Page<Experiment>| p.items.iter().map(|e| e.name.clone()).collect::<Vec<_>>();

    // Default order: newest first.
    let all = s
        .search_experiments(ViewType::ActiveOnly, 100, "", &[], None)
        .await
        .unwrap();
    assert_eq!(names(&all), ["Alpha2", "alphabet", "alpha", "Default"]);
    let like = s
        .search_experiments(ViewType::ActiveOnly, 100, "name LIKE 'alpha%'", &["name".into()], None)
        .await
        .unwrap();
    assert_eq!(names(&like), ["alpha", "alphabet"], "LIKE is case-sensitive");
    let ilike = s
        .search_experiments(ViewType::ActiveOnly, 100, "name ILIKE 'alpha%'", &["name".into()], None)
        .await
        .unwrap();
    assert_eq!(
        names(&ilike),
        ["Alpha2", "alpha", "alphabet"],
        "byte order: uppercase first"
    );
    let tagged = s
        .search_experiments(ViewType::All, 100, "tags.t = 'x'", &["name DESC".into()], None)
        .await
        .unwrap();
    assert_eq!(names(&tagged), ["alphabet", "alpha"]);
    let deleted = s
        .search_experiments(ViewType::DeletedOnly, 100, "", &[], None)
        .await
        .unwrap();
    assert_eq!(names(&deleted), ["beta"]);
    let ids = s
        .search_experiments(
            ViewType::All,
            100,
            "experiment_id IN ('1', '2')",
            &["experiment_id".into()],
            None,
        )
        .await
        .unwrap();
    assert_eq!(names(&ids), ["alpha", "beta"]);

    let p1 = s
        .search_experiments(ViewType::All, 2, "", &["experiment_id ASC".into()], None)
        .await
        .unwrap();
    assert_eq!(names(&p1), ["Default", "alpha"]);
    assert_eq!(p1.next_page_token.as_deref(), Some("eyJvZmZzZXQiOiAyfQ=="));
    let p2 = s
        .search_experiments(
            ViewType::All,
            2,
            "",
            &["experiment_id ASC".into()],
            p1.next_page_token.as_deref(),
        )
        .await
        .unwrap();
    assert_eq!(names(&p2), ["beta", "alphabet"]);
    let p3 = s
        .search_experiments(
            ViewType::All,
            2,
            "",
            &["experiment_id ASC".into()],
            p2.next_page_token.as_deref(),
        )
        .await
        .unwrap();
    assert_eq!(names(&p3), ["Alpha2"]);
    assert_eq!(p3.next_page_token, None);

    assert_eq!(
        s.search_experiments(ViewType::All, 0, "", &[], None)
            .await
            .unwrap_err()
            .to_string(),
        "Invalid value 0 for parameter 'max_results' supplied. It must be a positive integer"
    );
    assert_eq!(
        code(
            s.search_experiments(ViewType::All, 10, "name = 1", &[], None)
                .await
                .unwrap_err()
        ),
        "INVALID_PARAMETER_VALUE"
    );
}

#[tokio::test]
async fn runs_lifecycle() {
    let db = TempDb::new();
    let s = db.open().await;
    let exp = s.create_experiment("e", None, &[]).await.unwrap();
    let run = s
        .create_run(&exp, "alice", None, 1000, vec![KeyValue::new("t1", "x")])
        .await
        .unwrap();
    let id = run.info.run_id.clone();
    assert_eq!(id.len(), 32);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(run.info.artifact_uri, format!("mlflow-artifacts:/{exp}/{id}/artifacts"));
    assert_eq!(run.info.status, RunStatus::Running);
    assert_eq!(run.info.end_time, None);
    assert_eq!(
        run.tags,
        vec![
            KeyValue::new("t1", "x"),
            KeyValue::new(RUN_NAME_TAG, run.info.run_name.clone())
        ]
    );
    assert_eq!(run.info.run_name.split('-').count(), 3);

    let named = s.create_run(&exp, "", Some("r2"), 5, vec![]).await.unwrap();
    assert_eq!(named.tags, vec![KeyValue::new(RUN_NAME_TAG, "r2")]);
    let by_tag = s
        .create_run(&exp, "", None, 5, vec![KeyValue::new(RUN_NAME_TAG, "from-tag")])
        .await
        .unwrap();
    assert_eq!(by_tag.info.run_name, "from-tag");
    assert_eq!(
        s.create_run(&exp, "", Some("a"), 5, vec![KeyValue::new(RUN_NAME_TAG, "b")])
            .await
            .unwrap_err()
            .to_string(),
        "Both 'run_name' argument and 'mlflow.runName' tag are specified, but with different values \
         (run_name='a', mlflow.runName='b')."
    );
    // Empty experiment id: the Default experiment.
    assert_eq!(
        s.create_run("", "", None, 1, vec![]).await.unwrap().info.experiment_id,
        "0"
    );
    assert_eq!(
        s.create_run("42", "", None, 1, vec![]).await.unwrap_err().to_string(),
        "No Experiment with id=42 exists"
    );

    let info = s.update_run_status(&id, RunStatus::Finished, Some(2000)).await.unwrap();
    assert_eq!((info.status, info.end_time), (RunStatus::Finished, Some(2000)));
    let info = s.update_run(&id, None, None, Some("renamed")).await.unwrap();
    assert_eq!((info.run_name.as_str(), info.status), ("renamed", RunStatus::Finished));
    s.set_tag(&id, RUN_NAME_TAG, "via-tag").await.unwrap();
    let got = s.get_run(&id).await.unwrap();
    assert_eq!(got.info.run_name, "via-tag");
    assert!(got.tags.contains(&KeyValue::new(RUN_NAME_TAG, "via-tag")));
    assert_eq!(got.info.user_id, "alice");

    s.set_tag(&id, "t2", "y").await.unwrap();
    s.delete_tag(&id, "t2").await.unwrap();
    assert_eq!(
        s.delete_tag(&id, "t2").await.unwrap_err().to_string(),
        format!("No tag with name: t2 in run with id {id}")
    );

    s.delete_run(&id).await.unwrap();
    s.delete_run(&id).await.unwrap();
    assert_eq!(s.get_run(&id).await.unwrap().info.lifecycle_stage, "deleted");
    let err = s.log_metric(&id, metric("m", 1.0, 1, 0)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("The run {id} must be in the 'active' state. Current state is deleted.")
    );
    assert_eq!(code(err), "INVALID_PARAMETER_VALUE");
    assert_eq!(
        code(
            s.update_run(&id, Some(RunStatus::Failed), None, None)
                .await
                .unwrap_err()
        ),
        "INVALID_PARAMETER_VALUE"
    );
    s.restore_run(&id).await.unwrap();
    s.log_metric(&id, metric("m", 1.0, 1, 0)).await.unwrap();

    let err = s.get_run("deadbeef").await.unwrap_err();
    assert_eq!(err.to_string(), "Run with id=deadbeef not found");
    assert_eq!(code(err), "RESOURCE_DOES_NOT_EXIST");
    assert_eq!(
        code(s.set_tag("deadbeef", "a", "b").await.unwrap_err()),
        "RESOURCE_DOES_NOT_EXIST"
    );
    assert_eq!(
        s.run_experiment(&id).await.unwrap(),
        Some((exp.clone(), "e".to_string()))
    );
    assert_eq!(s.run_experiment("nope").await.unwrap(), None);
}

#[tokio::test]
async fn params_are_immutable() {
    let db = TempDb::new();
    let s = db.open().await;
    let id = s.create_run("0", "", None, 1, vec![]).await.unwrap().info.run_id;
    s.log_param(&id, "p", "1").await.unwrap();
    s.log_param(&id, "p", "1").await.unwrap();
    let err = s.log_param(&id, "p", "2").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Changing param values is not allowed. Param with key='p' was already logged with value='1' for run \
             ID='{id}'. Attempted logging new value '2'."
        )
    );
    assert_eq!(code(err), "INVALID_PARAMETER_VALUE");
    let err = s
        .log_batch(
            &id,
            vec![],
            vec![KeyValue::new("p", "3"), KeyValue::new("z", "3")],
            vec![],
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Changing param values is not allowed. Params were already logged='[{{'key': 'p', 'old_value': '1', \
             'new_value': '3'}}]' for run ID='{id}'."
        )
    );
    // Nothing of the refused batch was written.
    let run = s.get_run(&id).await.unwrap();
    assert_eq!(run.params, vec![KeyValue::new("p", "1")]);
    // Over-long values are truncated, as MLflow does by default.
    s.log_param(&id, "long", &"x".repeat(7000)).await.unwrap();
    let run = s.get_run(&id).await.unwrap();
    assert_eq!(run.params[1].value.len(), 6000);
}

#[tokio::test]
async fn log_batch_limits_and_contents() {
    let db = TempDb::new();
    let s = db.open().await;
    let id = s.create_run("0", "", None, 1, vec![]).await.unwrap().info.run_id;
    let many: Vec<Metric> = (0..1001).map(|i| metric(&format!("k{i}"), 1.0, 1, 0)).collect();
    assert!(
        s.log_batch(&id, many.clone(), vec![], vec![])
            .await
            .unwrap_err()
            .to_string()
            .starts_with("A batch logging request can contain at most 1000 metrics. Got 1001 metrics.")
    );
    let params: Vec<KeyValue> = (0..101).map(|i| KeyValue::new(format!("p{i}"), "1")).collect();
    assert!(
        s.log_batch(&id, vec![], params.clone(), vec![])
            .await
            .unwrap_err()
            .to_string()
            .starts_with("A batch logging request can contain at most 100 params.")
    );
    assert_eq!(
        s.log_batch("nonexist", vec![], vec![], vec![KeyValue::new("k", "1")])
            .await
            .unwrap_err()
            .to_string(),
        "Run with id=nonexist not found"
    );
    assert_eq!(
        s.log_batch("bad id", vec![], vec![], vec![])
            .await
            .unwrap_err()
            .to_string(),
        "Invalid value \"bad id\" for parameter 'run_id' supplied."
    );
    // The largest allowed batch goes through in one piece.
    let tags: Vec<KeyValue> = (0..100).map(|i| KeyValue::new(format!("t{i}"), "v")).collect();
    s.log_batch(&id, many[..800].to_vec(), params[..100].to_vec(), tags)
        .await
        .unwrap();
    let run = s.get_run(&id).await.unwrap();
    assert_eq!((run.metrics.len(), run.params.len(), run.tags.len()), (800, 100, 101));
    assert_eq!(
        run.metrics[0].key, "k0",
        "metrics keep the order they were first logged in"
    );
    assert_eq!(run.params[99].key, "p99");
    // A run name tag in a batch renames the run.
    s.log_batch(&id, vec![], vec![], vec![KeyValue::new(RUN_NAME_TAG, "batch-name")])
        .await
        .unwrap();
    assert_eq!(s.get_run(&id).await.unwrap().info.run_name, "batch-name");
}

#[tokio::test]
async fn metric_history_and_latest_values() {
    let db = TempDb::new();
    let s = db.open().await;
    let id = s.create_run("0", "", None, 1, vec![]).await.unwrap().info.run_id;
    s.log_batch(
        &id,
        vec![
            metric("acc", 0.7, 30, 2),
            metric("acc", 0.5, 10, 0),
            metric("acc", 0.6, 20, 1),
            metric("acc", 0.6, 20, 1), // identical point: stored once
            metric("acc", 0.1, 40, 1), // later timestamp, older step
        ],
        vec![],
        vec![],
    )
    .await
    .unwrap();
    let hist = s.get_metric_history(&id, "acc", None, None).await.unwrap();
    let points: Vec<(i64, i64, f64)> = hist.items.iter().map(|m| (m.timestamp, m.step, m.value)).collect();
    assert_eq!(points, vec![(10, 0, 0.5), (20, 1, 0.6), (30, 2, 0.7), (40, 1, 0.1)]);
    assert_eq!(hist.next_page_token, None);
    // The latest value is the one with the largest step, not the newest timestamp.
    let run = s.get_run(&id).await.unwrap();
    assert_eq!(run.metrics, vec![metric("acc", 0.7, 30, 2)]);
    s.log_metric(&id, metric("acc", 0.9, 5, 3)).await.unwrap();
    assert_eq!(s.get_run(&id).await.unwrap().metrics[0].value, 0.9);

    let p1 = s.get_metric_history(&id, "acc", Some(2), None).await.unwrap();
    assert_eq!(p1.items.len(), 2);
    let p2 = s
        .get_metric_history(&id, "acc", Some(2), p1.next_page_token.as_deref())
        .await
        .unwrap();
    let p3 = s
        .get_metric_history(&id, "acc", Some(2), p2.next_page_token.as_deref())
        .await
        .unwrap();
    assert_eq!((p2.items.len(), p3.items.len(), p3.next_page_token), (2, 1, None));

    // NaN and infinities, as MLflow keeps them.
    s.log_batch(
        &id,
        vec![
            metric("nan", f64::NAN, 1, 0),
            metric("inf", f64::INFINITY, 1, 0),
            metric("ninf", f64::NEG_INFINITY, 1, 0),
        ],
        vec![],
        vec![],
    )
    .await
    .unwrap();
    let run = s.get_run(&id).await.unwrap();
    let get = |k: &str| run.metrics.iter().find(|m| m.key == k).unwrap().value;
    assert!(get("nan").is_nan());
    assert_eq!(get("inf"), f64::MAX);
    assert_eq!(get("ninf"), f64::MIN);
    assert!(
        s.get_metric_history(&id, "nan", None, None).await.unwrap().items[0]
            .value
            .is_nan()
    );
    // An unknown run has an empty history, as in MLflow.
    assert!(
        s.get_metric_history("nope", "acc", None, None)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(
        s.log_metric(&id, metric("a", 1.0, -1, 0))
            .await
            .unwrap_err()
            .to_string(),
        "Invalid value -1 for parameter 'timestamp' supplied: metric 'a' (value=1.0). Timestamp must be a \
         nonnegative long (64-bit integer) "
    );

    // Bulk interval: sampled by step, first and last kept.
    let many: Vec<Metric> = (0..100).map(|i| metric("loss", i as f64, i, i)).collect();
    s.log_batch(&id, many, vec![], vec![]).await.unwrap();
    let sampled = s
        .get_metric_history_bulk_interval(std::slice::from_ref(&id), "loss", 10, None)
        .await
        .unwrap();
    let steps: Vec<i64> = sampled.iter().map(|m| m.metric.step).collect();
    assert_eq!(steps, vec![0, 10, 20, 30, 40, 50, 60, 70, 80, 99]);
    let ranged = s
        .get_metric_history_bulk_interval(std::slice::from_ref(&id), "loss", 100, Some((5, 7)))
        .await
        .unwrap();
    assert_eq!(ranged.iter().map(|m| m.metric.step).collect::<Vec<_>>(), vec![5, 6, 7]);
}

#[tokio::test]
async fn search_runs_filters_orders_and_pages() {
    let db = TempDb::new();
    let s = db.open().await;
    let exp = s.create_experiment("search", None, &[]).await.unwrap();
    let mut ids = vec![];
    // (name, start, acc, lr, tag)
    type Spec<'a> = (&'a str, i64, Option<f64>, &'a str, Option<&'a str>);
    let specs: [Spec; 5] = [
        ("a", 100, Some(0.95), "0.01", Some("x")),
        ("b", 200, Some(0.80), "0.1", Some("y")),
        ("c", 300, Some(f64::NAN), "0.01", None),
        ("d", 400, None, "0.001", Some("x")),
        ("e", 500, Some(0.99), "0.1", Some("X")),
    ];
    for (name, start, acc, lr, tag) in specs {
        let mut tags = vec![];
        if let Some(t) = tag {
            tags.push(KeyValue::new("t", t));
        }
        let id = s
            .create_run(&exp, "bob", Some(name), start, tags)
            .await
            .unwrap()
            .info
            .run_id;
        let metrics = acc.map(|v| vec![metric("acc", v, 1, 0)]).unwrap_or_default();
        s.log_batch(&id, metrics, vec![KeyValue::new("lr", lr)], vec![])
            .await
            .unwrap();
        ids.push(id);
    }
    s.update_run_status(&ids[0], RunStatus::Finished, Some(150))
        .await
        .unwrap();
    let exps = [exp.clone()];
    let search = |filter: &'static str, order: Vec<&'static str>| {
        let s = s.clone();
        let exps = exps.clone();
        async move {
            let order: Vec<String> = order.into_iter().map(String::from).collect();
            let page = s
                .search_runs(&exps, filter, ViewType::ActiveOnly, &order, 1000, None)
                .await
                .unwrap_or_else(|e| panic!("{filter}: {e}"));
            page.items.iter().map(|r| r.info.run_name.clone()).collect::<Vec<_>>()
        }
    };
    assert_eq!(
        search("", vec![]).await,
        ["e", "d", "c", "b", "a"],
        "start_time DESC by default"
    );
    assert_eq!(search("metrics.acc > 0.9", vec![]).await, ["e", "a"]);
    assert_eq!(
        search("metrics.acc != 0.8", vec![]).await,
        ["e", "c", "a"],
        "NaN satisfies !="
    );
    assert_eq!(search("metrics.acc <= 0.8", vec![]).await, ["b"]);
    assert_eq!(search("params.lr = '0.01'", vec![]).await, ["c", "a"]);
    assert_eq!(search("params.lr LIKE '0.0%'", vec![]).await, ["d", "c", "a"]);
    assert_eq!(search("tags.t = 'x'", vec![]).await, ["d", "a"]);
    assert_eq!(search("tags.t ILIKE 'x'", vec![]).await, ["e", "d", "a"]);
    assert_eq!(
        search("tags.t LIKE 'x'", vec![]).await,
        ["d", "a"],
        "LIKE is case-sensitive"
    );
    assert_eq!(search("tags.t IS NULL", vec![]).await, ["c"]);
    assert_eq!(search("tags.t != 'x'", vec![]).await, ["e", "b"]);
    assert_eq!(search("attributes.status = 'FINISHED'", vec![]).await, ["a"]);
    assert_eq!(
        search("attributes.start_time >= 300 and params.lr != '0.1'", vec![]).await,
        ["d", "c"]
    );
    assert_eq!(search("attributes.end_time < 200", vec![]).await, ["a"]);
    assert_eq!(search("attributes.run_name = 'b'", vec![]).await, ["b"]);
    assert_eq!(search("run_name LIKE '%'", vec![]).await.len(), 5);
    assert_eq!(
        search(
            "attributes.user_id = 'bob' and metrics.acc > 0.85 and tags.t = 'x'",
            vec![]
        )
        .await,
        ["a"]
    );
    let in_filter = format!("attributes.run_id IN ('{}', '{}')", ids[1], ids[3]);
    let page = s
        .search_runs(&exps, &in_filter, ViewType::ActiveOnly, &[], 1000, None)
        .await
        .unwrap();
    assert_eq!(page.items.len(), 2);

    // Metric order: real values first, then NaN, then missing, both directions.
    assert_eq!(search("", vec!["metrics.acc DESC"]).await, ["e", "a", "b", "c", "d"]);
    assert_eq!(search("", vec!["metrics.acc"]).await, ["b", "a", "e", "c", "d"]);
    assert_eq!(search("", vec!["params.lr ASC"]).await, ["d", "c", "a", "e", "b"]);
    assert_eq!(search("", vec!["tags.t DESC"]).await, ["b", "d", "a", "e", "c"]);
    assert_eq!(
        search("", vec!["attributes.start_time ASC"]).await,
        ["a", "b", "c", "d", "e"]
    );
    assert_eq!(search("", vec!["attributes.end_time DESC"]).await[0], "a");
    assert_eq!(
        search("", vec!["params.lr", "metrics.acc DESC"]).await,
        ["d", "a", "c", "e", "b"]
    );

    // Pages.
    let p1 = s
        .search_runs(&exps, "", ViewType::ActiveOnly, &[], 2, None)
        .await
        .unwrap();
    assert_eq!(p1.next_page_token.as_deref(), Some("eyJvZmZzZXQiOiAyfQ=="));
    let p2 = s
        .search_runs(&exps, "", ViewType::ActiveOnly, &[], 2, p1.next_page_token.as_deref())
        .await
        .unwrap();
    let p3 = s
        .search_runs(&exps, "", ViewType::ActiveOnly, &[], 2, p2.next_page_token.as_deref())
        .await
        .unwrap();
    let names: Vec<String> = [p1, p2, p3.clone()]
        .iter()
        .flat_map(|p| p.items.iter().map(|r| r.info.run_name.clone()))
        .collect();
    assert_eq!(names, ["e", "d", "c", "b", "a"]);
    assert_eq!(p3.next_page_token, None);

    // Run data comes along, in logging order.
    let page = s
        .search_runs(&exps, "params.lr = '0.1'", ViewType::ActiveOnly, &[], 10, None)
        .await
        .unwrap();
    let b = page.items.iter().find(|r| r.info.run_name == "b").unwrap();
    assert_eq!(b.params, vec![KeyValue::new("lr", "0.1")]);
    assert_eq!(b.metrics, vec![metric("acc", 0.8, 1, 0)]);
    assert_eq!(b.tags, vec![KeyValue::new("t", "y"), KeyValue::new(RUN_NAME_TAG, "b")]);

    // Deleted runs and view types.
    s.delete_run(&ids[1]).await.unwrap();
    assert_eq!(search("", vec![]).await, ["e", "d", "c", "a"]);
    let deleted = s
        .search_runs(&exps, "", ViewType::DeletedOnly, &[], 10, None)
        .await
        .unwrap();
    assert_eq!(deleted.items.len(), 1);
    let all = s.search_runs(&exps, "", ViewType::All, &[], 10, None).await.unwrap();
    assert_eq!(all.items.len(), 5);

    // Errors.
    let err = s
        .search_runs(
            &exps,
            "metrics.acc > 1 or params.lr = '1'",
            ViewType::All,
            &[],
            10,
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "Invalid clause(s) in filter string: 'or'");
    assert_eq!(
        s.search_runs(&["x".into()], "", ViewType::All, &[], 10, None)
            .await
            .unwrap_err()
            .to_string(),
        "Invalid experiment ID 'x'. Experiment ID must be a valid integer."
    );
    assert!(
        s.search_runs(&[], "", ViewType::All, &[], 10, None)
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn dataset_inputs_are_stored_once() {
    let db = TempDb::new();
    let s = db.open().await;
    let id = s.create_run("0", "", None, 1, vec![]).await.unwrap().info.run_id;
    let input = DatasetInput {
        tags: vec![KeyValue::new(DATASET_CONTEXT_TAG, "training")],
        dataset: Dataset {
            name: "ds".into(),
            digest: "abc".into(),
            source_type: "local".into(),
            source: "{}".into(),
            schema: None,
            profile: Some("{\"rows\": 3}".into()),
        },
    };
    s.log_inputs(&id, vec![input.clone(), input.clone()]).await.unwrap();
    s.log_inputs(&id, vec![input.clone()]).await.unwrap();
    let run = s.get_run(&id).await.unwrap();
    assert_eq!(run.inputs, vec![input]);
    let page = s
        .search_runs(
            &["0".into()],
            "dataset.context = 'training' and datasets.name = 'ds'",
            ViewType::All,
            &[],
            10,
            None,
        )
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
}

#[tokio::test]
async fn acknowledged_writes_survive_reopening() {
    let db = TempDb::new();
    let s = db.open().await;
    let exp = s.create_experiment("durable", None, &[]).await.unwrap();
    let id = s.create_run(&exp, "", Some("r"), 1, vec![]).await.unwrap().info.run_id;
    s.log_param(&id, "p", "1").await.unwrap();
    for i in 0..10 {
        s.log_metric(&id, metric("m", i as f64, i, i)).await.unwrap();
    }
    s.close().await;
    drop(s);

    let s = db.open().await;
    let run = s.get_run(&id).await.unwrap();
    assert_eq!(run.params, vec![KeyValue::new("p", "1")]);
    assert_eq!(run.metrics, vec![metric("m", 9.0, 9, 9)]);
    assert_eq!(
        s.get_metric_history(&id, "m", None, None).await.unwrap().items.len(),
        10
    );
    // Ids keep counting after a restart; migrations are not re-applied.
    assert_eq!(s.create_experiment("next", None, &[]).await.unwrap(), "2");
}

#[tokio::test]
async fn concurrent_writers_share_commits() {
    let db = TempDb::new();
    let s = db.open().await;
    let id = s.create_run("0", "", None, 1, vec![]).await.unwrap().info.run_id;
    let mut tasks = vec![];
    for w in 0..16 {
        let s = s.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                s.log_metric(&id, metric(&format!("w{w}"), i as f64, i, i))
                    .await
                    .unwrap();
            }
            // Refused writes in the middle of others do not disturb them.
            s.log_param(&id, "shared", &w.to_string()).await.is_ok()
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        accepted += usize::from(t.await.unwrap());
    }
    assert_eq!(accepted, 1, "one value of a param wins");
    let run = s.get_run(&id).await.unwrap();
    assert_eq!(run.metrics.len(), 16);
    for w in 0..16 {
        let hist = s.get_metric_history(&id, &format!("w{w}"), None, None).await.unwrap();
        assert_eq!(hist.items.len(), 50);
    }
    assert_eq!(run.params.len(), 1);
}
