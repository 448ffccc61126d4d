//! DataAsset and Pipeline benchmarks, each against a baseline measured in
//! the same run:
//!
//! 1. The manifest and digest of a 100,000-object listing (what a DataAsset
//!    refresh computes) through a real S3 server (MinIO, hack/minio.sh):
//!    time and peak memory of `storage::manifest::list` + digest + canonical
//!    text, against the bare listing (`ObjectStore::list` collected, nothing
//!    else). Also the manifest alone from an in-memory listing (the CPU cost
//!    of mlplane's part without the network).
//! 2. Planning a 500-step DAG per reconcile: resolving the DAG from the spec
//!    (references, placeholders, cycles), cache keys of every step (run
//!    start), and a reconcile's decisions (which keys to look up, what to
//!    start, reuse or skip), against a plain topological sort of the same
//!    graph.
//!
//! `MLPLANE_BENCH_OBJECTS` (default 100000) sets the listing size; the
//! seeded server data is kept in `~/.cache/mlplane/bench/minio-<n>` for the
//! next run (seeding 100,000 objects takes minutes). Each
//! figure is the median of 3 (listing) or the mean of 200 (planning) runs.
//! Peak memory is the process's high-water mark (VmHWM, reset through
//! /proc/self/clear_refs before each phase) above its resident size when the
//! phase starts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use mlplane::api::experiment::PinnedInput;
use mlplane::api::{PipelineSpec, RunPhase};
use mlplane::controllers::pipeline::dag;
use mlplane::controllers::pipeline::plan::{KeyInputs, Known, cache_keys, decide, run_phase, to_look_up};
use mlplane::storage::Credentials;
use mlplane::storage::manifest::{self, Manifest, Shape};
use mlplane_test_support::*;
use object_store::{ObjectMeta, ObjectStoreExt, PutPayload};
use serde_json::json;

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Runs `f` and returns its result, duration and peak memory (MiB) above
/// the resident size at its start.
async fn measured<T, F: std::future::Future<Output = Result<T>>>(f: F) -> Result<(T, Duration, f64)> {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = status_kib("VmRSS:");
    let t = Instant::now();
    let out = f.await?;
    let took = t.elapsed();
    let peak = status_kib("VmHWM:").saturating_sub(before) as f64 / 1024.0;
    Ok((out, took, peak))
}

fn median(mut v: Vec<(Duration, f64)>) -> (Duration, f64) {
    v.sort_by_key(|(d, _)| *d);
    let d = v[v.len() / 2].0;
    let mut m: Vec<f64> = v.iter().map(|(_, m)| *m).collect();
    m.sort_by(|a, b| a.total_cmp(b));
    (d, m[m.len() / 2])
}

async fn listing(n: usize) -> Result<()> {
    // The seeded objects are kept between runs (seeding is the slow part).
    let home = std::env::var_os("HOME").context("HOME")?;
    let dir = std::path::PathBuf::from(home).join(format!(".cache/mlplane/bench/minio-{n}"));
    let seeded = dir.join("seeded");
    let s3 = S3Server::start_at(dir, &["bench"], true)?;
    let uri = "s3://bench/set/";
    let loc = s3.open(uri)?;
    if seeded.exists() {
        println!("reusing {n} objects seeded earlier in {}", s3.dir.display());
    } else {
        seed(&loc, n).await?;
        std::fs::write(&seeded, "")?;
    }
    measure_listing(&loc, uri, n).await
}

async fn seed(loc: &mlplane::storage::Location, n: usize) -> Result<()> {
    let t = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let store = loc.store.clone();
            let path = loc
                .prefix
                .clone()
                .join(format!("part-{:03}", i % 100))
                .join(format!("{i:07}.bin"));
            async move {
                store
                    .put(&path, PutPayload::from(format!("row {i}\n").into_bytes()))
                    .await
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await?;
    println!(
        "seeded {n} objects into MinIO in {:.1} s ({:.0} PUT/s)",
        t.elapsed().as_secs_f64(),
        n as f64 / t.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn measure_listing(loc: &mlplane::storage::Location, uri: &str, n: usize) -> Result<()> {
    let creds = Credentials::none();
    let mut bare = vec![];
    let mut ours = vec![];
    let mut digest = String::new();
    for _ in 0..3 {
        let (metas, d, m) = measured(async {
            let v: Vec<ObjectMeta> = loc.store.list(Some(&loc.prefix)).try_collect().await?;
            Ok(v)
        })
        .await?;
        anyhow::ensure!(metas.len() == n, "listed {} of {n}", metas.len());
        drop(metas);
        bare.push((d, m));
        let ((files, dg), d, m) = measured(async {
            let man = manifest::list(loc, Shape::Folder, uri, &creds).await?;
            let dg = man.digest();
            let text = man.text();
            std::hint::black_box(&text);
            Ok((man.files(), dg))
        })
        .await?;
        anyhow::ensure!(files == n as u64, "manifest of {files} of {n}");
        digest = dg;
        ours.push((d, m));
    }
    let (bd, bm) = median(bare);
    let (od, om) = median(ours);
    println!("listing {n} objects through S3 (median of 3):");
    println!(
        "  baseline, bare listing:          {:>8.0} ms   peak +{bm:.1} MiB",
        bd.as_secs_f64() * 1e3
    );
    println!(
        "  mlplane, manifest+digest+text:   {:>8.0} ms   peak +{om:.1} MiB   ({:.2}x the listing's time, {digest})",
        od.as_secs_f64() * 1e3,
        od.as_secs_f64() / bd.as_secs_f64()
    );

    // mlplane's part alone: from listed metadata to digest, no network.
    let metas: Vec<ObjectMeta> = loc.store.list(Some(&loc.prefix)).try_collect().await?;
    let mut pure = vec![];
    for _ in 0..3 {
        let input = metas.clone();
        let ((), d, m) = measured(async {
            let man = Manifest::from_listing(&loc.prefix, input);
            std::hint::black_box(man.digest());
            Ok(())
        })
        .await?;
        pure.push((d, m));
    }
    let (pd, pm) = median(pure);
    println!(
        "  manifest+digest from {n} listed objects (no I/O): {:.0} ms ({:.2} µs/object), peak +{pm:.1} MiB",
        pd.as_secs_f64() * 1e3,
        pd.as_secs_f64() * 1e6 / n as f64
    );
    Ok(())
}

/// A 500-step DAG: step i reads up to three earlier steps' outputs
/// (i-1, i/2, i/3), step 0 the pipeline input.
fn big_spec(n: usize) -> PipelineSpec {
    let steps: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let mut inputs = serde_json::Map::new();
            let ups: BTreeSet<usize> = [i.wrapping_sub(1), i / 2, i / 3]
                .into_iter()
                .filter(|&u| u < i)
                .collect();
            for u in &ups {
                inputs.insert(format!("in{u}"), json!(format!("${{{{steps.s{u}.outputs.o}}}}")));
            }
            let mut command = vec![
                json!("python"),
                json!("step.py"),
                json!("${{outputs.o}}"),
                json!("${{params.i}}"),
            ];
            command.extend(ups.iter().map(|u| json!(format!("${{{{inputs.in{u}}}}}"))));
            if i == 0 {
                command.push(json!("${{inputs.raw}}"));
            }
            json!({"name": format!("s{i}"), "inputs": inputs, "command": command,
                   "params": {"i": i}, "outputs": {"o": {}}})
        })
        .collect();
    serde_json::from_value(json!({
        "environment": {"image": "python:3.12"},
        "inputs": {"raw": {"dataAsset": "sales"}},
        "steps": steps,
    }))
    .expect("spec")
}

fn mean_of(iters: usize, mut f: impl FnMut()) -> Duration {
    f();
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed() / iters as u32
}

fn planning(n: usize) {
    let spec = big_spec(n);
    let d = dag::build(&spec).expect("valid DAG");
    let edges: usize = d.upstream.iter().map(BTreeSet::len).sum();
    let images = vec!["python:3.12".to_string(); n];
    let pins = BTreeMap::from([(
        "raw".to_string(),
        PinnedInput {
            data_asset: Some("sales".into()),
            version: Some("3".into()),
            digest: Some("sha256:0123".into()),
            uri: Some("s3://b/sales/".into()),
        },
    )]);
    let keys_in = KeyInputs {
        images: &images,
        pins: &pins,
        root: Some("s3://art/ws"),
        run: "uid/1",
    };
    let keys = cache_keys(&spec, &d, &keys_in);
    // Mid-run: the first half of the order succeeded, the rest undecided.
    let known: Vec<Known> = {
        let mut k = vec![Known::Undecided; n];
        for &i in &d.order[..n / 2] {
            k[i] = Known::Job(RunPhase::Succeeded);
        }
        k
    };
    let reusable = vec![true; n];
    let hits: BTreeSet<usize> = d.order[n / 2..n * 3 / 4].iter().copied().collect();

    let iters = 200;
    let baseline = mean_of(iters, || {
        std::hint::black_box(dag::topological_order(&d.upstream, &d.downstream).expect("acyclic"));
    });
    let resolve = mean_of(iters, || {
        std::hint::black_box(dag::build(&spec).expect("valid"));
    });
    let start = mean_of(iters, || {
        let d = dag::build(&spec).expect("valid");
        std::hint::black_box(cache_keys(&spec, &d, &keys_in));
    });
    let reconcile = mean_of(iters, || {
        let d = dag::build(&spec).expect("valid");
        let ask = to_look_up(&d, &known, &reusable, &keys);
        let acts = decide(&d, &known, &reusable, &keys, &hits, false);
        std::hint::black_box((ask, acts, run_phase(&known)));
    });
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("planning a {n}-step DAG ({edges} edges), mean of {iters}:");
    println!("  baseline, topological sort:        {:>9.1} µs", us(baseline));
    println!(
        "  resolve the DAG from the spec:     {:>9.1} µs ({:.0}x)",
        us(resolve),
        us(resolve) / us(baseline)
    );
    println!(
        "  run start (resolve + cache keys):  {:>9.1} µs ({:.0}x)",
        us(start),
        us(start) / us(baseline)
    );
    println!(
        "  reconcile (resolve + decisions):   {:>9.1} µs ({:.0}x)",
        us(reconcile),
        us(reconcile) / us(baseline)
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    install_crypto_provider();
    let n: usize = std::env::var("MLPLANE_BENCH_OBJECTS")
        .ok()
        .map(|v| v.parse())
        .transpose()
        .context("MLPLANE_BENCH_OBJECTS")?
        .unwrap_or(100_000);
    planning(500);
    listing(n).await
}
