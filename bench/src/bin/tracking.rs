//! Tracking benchmark: 32 concurrent clients each log 10,000 metrics to their
//! own run, once one metric per request (log-metric) and once in batches of
//! 1,000 (log-batch), against the reference `mlflow server` and against
//! `mlplane tracking` started in the same run on the same machine, both with
//! a SQLite backend. Prints throughput and p50/p99 latency of both and the
//! ratios. Goal: at least 10x the reference's throughput and a lower p99.
//!
//! A phase stops early after `MLPLANE_BENCH_PHASE_SECONDS` (default 120) so a
//! slow server cannot make the benchmark run for hours; throughput is then
//! measured over what was acknowledged.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mlplane_test_support::{TrackingServer, free_port, http_get, repo_root};
use serde_json::{Value, json};

const CLIENTS: usize = 32;
const METRICS_PER_CLIENT: usize = 10_000;
const BATCH: usize = 1_000;

struct Phase {
    server: &'static str,
    mode: &'static str,
    metrics: usize,
    seconds: f64,
    latencies_ms: Vec<f64>,
    complete: bool,
}

impl Phase {
    fn throughput(&self) -> f64 {
        self.metrics as f64 / self.seconds
    }
    fn percentile(&self, p: f64) -> f64 {
        let mut v = self.latencies_ms.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() as f64 - 1.0) * p).round() as usize]
    }
}

async fn post(http: &reqwest::Client, url: &str, body: &Value) -> Result<Value> {
    let resp = http.post(url).json(body).send().await?;
    let code = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if !code.is_success() {
        bail!("{url}: {code} {v}");
    }
    Ok(v)
}

async fn run_phase(base: &str, server: &'static str, mode: &'static str, budget: Duration) -> Result<Phase> {
    let api = format!("{base}/api/2.0/mlflow");
    let http = reqwest::Client::builder().pool_max_idle_per_host(CLIENTS).build()?;
    let name = format!("bench-{mode}-{}", mlplane_test_support::random_suffix());
    let exp = post(&http, &format!("{api}/experiments/create"), &json!({"name": name})).await?;
    let exp_id = exp["experiment_id"].as_str().context("experiment_id")?.to_string();
    let mut runs = vec![];
    for _ in 0..CLIENTS {
        let r = post(&http, &format!("{api}/runs/create"), &json!({"experiment_id": exp_id})).await?;
        runs.push(r["run"]["info"]["run_id"].as_str().context("run_id")?.to_string());
    }
    let start = Instant::now();
    let deadline = start + budget;
    let mut tasks = vec![];
    for run_id in runs {
        let (http, api) = (http.clone(), api.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = vec![];
            let mut done = 0usize;
            while done < METRICS_PER_CLIENT && Instant::now() < deadline {
                let t = Instant::now();
                if mode == "log-metric" {
                    let body = json!({"run_id": run_id, "key": "loss", "value": done as f64 * 0.001,
                                      "timestamp": 1_700_000_000_000u64 + done as u64, "step": done});
                    post(&http, &format!("{api}/runs/log-metric"), &body).await?;
                    done += 1;
                } else {
                    let metrics: Vec<Value> = (done..done + BATCH)
                        .map(|i| {
                            json!({"key": "loss", "value": i as f64 * 0.001,
                                        "timestamp": 1_700_000_000_000u64 + i as u64, "step": i})
                        })
                        .collect();
                    post(
                        &http,
                        &format!("{api}/runs/log-batch"),
                        &json!({"run_id": run_id, "metrics": metrics}),
                    )
                    .await?;
                    done += BATCH;
                }
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok((done, lat))
        }));
    }
    let mut metrics = 0;
    let mut latencies_ms = vec![];
    for t in tasks {
        let (done, lat) = t.await??;
        metrics += done;
        latencies_ms.extend(lat);
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(Phase {
        server,
        mode,
        metrics,
        seconds,
        latencies_ms,
        complete: metrics == CLIENTS * METRICS_PER_CLIENT,
    })
}

/// The reference `mlflow server` from the project's virtualenv.
struct Reference {
    child: Child,
    url: String,
}

impl Drop for Reference {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_reference(dir: &std::path::Path) -> Result<Reference> {
    let out = Command::new(repo_root().join("hack/python-env.sh")).output()?;
    if !out.status.success() {
        bail!("hack/python-env.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let python = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    let mlflow = python.with_file_name("mlflow");
    let port = free_port();
    let log = std::fs::File::create(dir.join("mlflow.log"))?;
    let child = Command::new(mlflow)
        .args(["server", "--host", "127.0.0.1", "--port", &port.to_string()])
        .arg("--backend-store-uri")
        .arg(format!("sqlite:///{}", dir.join("ref.db").display()))
        .arg("--artifacts-destination")
        .arg(dir.join("ref-artifacts"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while http_get(&format!("{url}/health"))
        .map(|(c, _)| c != 200)
        .unwrap_or(true)
    {
        if start.elapsed() > Duration::from_secs(120) {
            bail!("mlflow server did not start; see {}", dir.join("mlflow.log").display());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(Reference { child, url })
}

#[tokio::main]
async fn main() -> Result<()> {
    let budget = Duration::from_secs(mlplane_test_support::env_or("MLPLANE_BENCH_PHASE_SECONDS", 120));
    let dir = std::env::temp_dir().join(format!("mlplane-bench-{}", mlplane_test_support::random_suffix()));
    std::fs::create_dir_all(&dir)?;
    println!(
        "tracking benchmark: {CLIENTS} clients x {METRICS_PER_CLIENT} metrics, log-metric and log-batch ({BATCH}/request), SQLite backends"
    );

    let reference = start_reference(&dir)?;
    let mlplane = TrackingServer::start(
        &format!("sqlite://{}", dir.join("mlplane.db").display()),
        &dir.join("mlplane-artifacts"),
        None,
    )
    .await?;
    let mut phases = vec![];
    for mode in ["log-metric", "log-batch"] {
        phases.push(run_phase(&reference.url, "mlflow", mode, budget).await?);
        phases.push(run_phase(&mlplane.url(), "mlplane", mode, budget).await?);
    }
    println!(
        "{:<8} {:<11} {:>9} {:>8} {:>11} {:>8} {:>8}  note",
        "server", "mode", "metrics", "seconds", "metrics/s", "p50 ms", "p99 ms"
    );
    for p in &phases {
        println!(
            "{:<8} {:<11} {:>9} {:>8.2} {:>11.0} {:>8.2} {:>8.2}  {}",
            p.server,
            p.mode,
            p.metrics,
            p.seconds,
            p.throughput(),
            p.percentile(0.5),
            p.percentile(0.99),
            if p.complete { "" } else { "stopped at the time budget" }
        );
    }
    for pair in phases.chunks(2) {
        let (r, m) = (&pair[0], &pair[1]);
        let ratio = m.throughput() / r.throughput();
        println!(
            "{}: throughput mlplane/mlflow = {ratio:.1}x (goal >= 10x: {}); p99 {:.2} ms vs {:.2} ms (goal lower: {})",
            r.mode,
            if ratio >= 10.0 { "met" } else { "NOT met" },
            m.percentile(0.99),
            r.percentile(0.99),
            if m.percentile(0.99) < r.percentile(0.99) {
                "met"
            } else {
                "NOT met"
            },
        );
    }
    drop(mlplane);
    drop(reference);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
