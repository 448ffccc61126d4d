#!/usr/bin/env python3
"""MLflow tracking conformance script.

Runs the same sequence of calls, made with the real ``mlflow`` client (fluent
API and ``MlflowClient``) plus a few raw REST requests for edge cases, against
one tracking server, and writes one normalised entry per step:

    {"step": "runs.get", "result": ... | "error": {...}, "http": [exchanges],
     "message_check": "exact" | "ignore"}

``http`` lists every HTTP request the step made (method, path, query, status,
response body), so the comparison covers the wire format - which fields are
present - and not only what the client makes of it. See normalize.py for what
is masked, compare.py for the comparison and README.md for both.

    python conformance.py --uri http://127.0.0.1:5000 --out result.json [--prefix cf-123]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

# The client must fail fast instead of retrying 5xx answers with backoff, log
# synchronously, and print nothing about the environment.
os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "0"
os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
os.environ["MLFLOW_ENABLE_ASYNC_LOGGING"] = "false"
os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
os.environ["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = "false"
os.environ["MLFLOW_TRACKING_USERNAME"] = ""
for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TRACKING_TOKEN"):
    os.environ.pop(var, None)
os.environ.pop("MLFLOW_TRACKING_USERNAME", None)

import requests  # noqa: E402

sys.dont_write_bytecode = True  # keep tests/tracking free of __pycache__
sys.path.insert(0, str(Path(__file__).resolve().parent))
from normalize import Normalizer  # noqa: E402

T0 = 1_700_000_000_000  # fixed timestamps (2023-11-14), kept exactly by the normaliser


# ---------------------------------------------------------------------------
# HTTP recording: every request the client (or this script) sends goes
# through requests.Session.send; record the exchange for the current step.
# ---------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.exchanges: list[dict] | None = None
        self._orig = requests.Session.send
        rec = self

        def send(session, request, **kwargs):
            resp = rec._orig(session, request, **kwargs)
            if rec.exchanges is not None:
                rec.exchanges.append(rec._describe(request, resp))
            return resp

        requests.Session.send = send

    @staticmethod
    def _describe(request, resp) -> dict:
        url = urlsplit(request.url)
        ex = {"method": request.method, "path": url.path}
        if url.query:
            ex["query"] = dict(parse_qsl(url.query, keep_blank_values=True))
        ex["status"] = resp.status_code
        body = resp.content
        ctype = resp.headers.get("Content-Type", "")
        if "json" in ctype or body[:1] in (b"{", b"["):
            try:
                ex["body"] = json.loads(body, parse_constant=lambda c: {"$json_literal": c})
                return ex
            except ValueError:
                pass
        if body:
            ex["body"] = {"$bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()[:16]}
        return ex


# ---------------------------------------------------------------------------
# Conversion of client return values into plain JSON-able data
# ---------------------------------------------------------------------------
def plain(obj):
    from mlflow.entities import Run
    from mlflow.entities._mlflow_object import _MlflowObject
    from mlflow.store.entities.paged_list import PagedList

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, PagedList):
        return {"items": [plain(x) for x in obj], "token": obj.token}
    if isinstance(obj, Run):
        return plain(obj.to_dictionary())
    if isinstance(obj, _MlflowObject):
        return {k: plain(v) for k, v in obj}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(x) for x in obj]
    try:
        import pandas as pd

        if isinstance(obj, pd.DataFrame):
            rows = []
            for rec in obj.to_dict(orient="records"):
                row = {}
                for k, v in sorted(rec.items()):
                    if isinstance(v, pd.Timestamp):
                        v = int(v.value // 1_000_000)
                    elif v is pd.NaT:
                        v = None
                    row[k] = plain(v)
                rows.append(row)
            return {"columns": sorted(obj.columns), "rows": rows}
    except ImportError:
        pass
    if hasattr(obj, "item"):  # numpy scalar
        return plain(obj.item())
    return repr(obj)


def tree(path: str) -> dict:
    """A downloaded file or directory: relative path -> content (text, or a hash)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
    out = {}
    for f in files:
        rel = f.name if p.is_file() else f.relative_to(p).as_posix()
        data = f.read_bytes()
        try:
            out[rel] = data.decode()
        except UnicodeDecodeError:
            out[rel] = {"$bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()[:16]}
    return out


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------
class Conformance:
    def __init__(self, uri: str, prefix: str, deadline: float):
        self.deadline = time.monotonic() + deadline
        self.uri = uri.rstrip("/")
        self.prefix = prefix
        self.norm = Normalizer(int(time.time() * 1000))
        self.rec = Recorder()
        self.entries: list[dict] = []
        self.names: set[str] = set()
        self.tmp = Path(tempfile.mkdtemp(prefix="mlplane-conformance-"))
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(self.uri)
        self.mlflow = mlflow
        self.client = MlflowClient(self.uri)

    def name(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def step(self, name: str, fn, *, message: str = "ignore", note: str = "", parallel: bool = False, body: bool = True):
        """Runs fn() as one named step; returns its raw result (None on error).

        message: "exact" when MLflow's error message is deterministic and
        reasonable for another server to reproduce word for word, "ignore"
        when only error_code and HTTP status are compared.
        parallel: the client sends this step's requests from a thread pool
        (artifact directories), so their order is not defined: sort them.
        body: False to compare only the status of the answers (the
        reference's 404 page for an unknown path is Flask's HTML).
        """
        assert name not in self.names, name
        self.names.add(name)
        self.rec.exchanges = []
        entry: dict = {"step": name}
        if note:
            entry["note"] = note
        raw = None
        if time.monotonic() > self.deadline:
            # a server that hangs must not make the run hang: the rest is skipped
            entry["error"] = {"type": "skipped", "message": "conformance.py ran past its --deadline"}
            entry["http"] = []
            self.rec.exchanges = None
            self.entries.append(entry)
            return None
        try:
            raw = fn()
            if isinstance(raw, RawResponse):
                if raw.status >= 400:
                    entry["error"] = raw.error()
                else:
                    entry["result"] = raw.summary()
            else:
                entry["result"] = plain(raw)
        except Exception as e:  # noqa: BLE001 - every failure is a recorded answer
            entry["error"] = self._error(e)
        http = [aux(x) for x in self.rec.exchanges]
        if not body:
            http = [{k: v for k, v in x.items() if k != "body"} for x in http]
            if "error" in entry:
                entry["error"] = {k: v for k, v in entry["error"].items() if k in ("type", "http_status")}
        if parallel:
            http.sort(key=lambda x: json.dumps([x["method"], x["path"], x.get("query")], sort_keys=True))
        entry["http"] = http
        self.rec.exchanges = None
        if "error" in entry or any(x.get("status", 0) >= 400 for x in entry["http"]):
            entry["message_check"] = message
        # normalised at the end, once the script has named every id it created
        self.entries.append(entry)
        return raw

    def _error(self, e: Exception) -> dict:
        from mlflow.exceptions import MlflowException

        err: dict = {"type": type(e).__name__}
        failed = [x for x in self.rec.exchanges or [] if x["status"] >= 400]
        last = failed[-1] if failed else None
        if isinstance(e, MlflowException):
            err["error_code"] = e.error_code
        if last is not None:
            err["http_status"] = last["status"]
            body = last.get("body")
            if isinstance(body, dict) and "message" in body:
                err["message"] = body["message"]
        err.setdefault("message", getattr(e, "message", None) or str(e))
        if not isinstance(e, MlflowException):
            err["where"] = traceback.format_exception_only(type(e), e)[-1].strip()[:300]
        return err

    # raw REST --------------------------------------------------------------
    def rest(self, method: str, endpoint: str, *, params=None, body=None, api="mlflow") -> "RawResponse":
        url = f"{self.uri}/api/2.0/{api}/{endpoint}"
        r = requests.request(method, url, params=params, json=body, timeout=10)
        return RawResponse(r)

    # ------------------------------------------------------------------------
    def run_all(self):
        self.experiments()
        self.runs()
        self.logging()
        self.search()
        self.artifacts()
        self.fluent()
        self.errors()

    # experiments -------------------------------------------------------------
    def experiments(self):
        c, n = self.client, self.norm
        n.name_exp("0", "default")
        self.step("exp.get.default", lambda: c.get_experiment("0"))

        a = self.step(
            "exp.create.a",
            lambda: c.create_experiment(self.name("exp-a"), tags={"team": "ml", "owner": "alice"}),
        )
        n.name_exp(a, "a")
        self.exp_a = a
        self.step("exp.get.a", lambda: c.get_experiment(a))
        self.step("exp.get_by_name.a", lambda: c.get_experiment_by_name(self.name("exp-a")))
        self.step("exp.get_by_name.missing", lambda: c.get_experiment_by_name(self.name("nope")))
        self.step("exp.set_tag", lambda: c.set_experiment_tag(a, "stage", "dev"))
        self.step("exp.set_tag.overwrite", lambda: c.set_experiment_tag(a, "team", "research"))
        self.step("exp.get.after_tags", lambda: c.get_experiment(a))
        self.step("exp.rename", lambda: c.rename_experiment(a, self.name("exp-a-renamed")))
        self.step("exp.get.after_rename", lambda: c.get_experiment(a))
        self.step("exp.get_by_name.old_name", lambda: c.get_experiment_by_name(self.name("exp-a")))
        self.step("exp.get_by_name.new_name", lambda: c.get_experiment_by_name(self.name("exp-a-renamed")))

        # a few more experiments for search
        for label, tags in (("b", {"team": "ml"}), ("c", {"team": "infra"}), ("d", None), ("e", {"team": "ml"})):
            eid = self.step(f"exp.create.{label}", lambda label=label, tags=tags: c.create_experiment(self.name(f"exp-{label}"), tags=tags))
            n.name_exp(eid, label)
            setattr(self, f"exp_{label}", eid)

        from mlflow.entities import ViewType

        mine = f"name LIKE '{self.prefix}-%'"
        self.step("exp.search.default_order", lambda: c.search_experiments(filter_string=mine))
        self.step("exp.search.name_asc", lambda: c.search_experiments(filter_string=mine, order_by=["name ASC"]))
        self.step("exp.search.name_desc", lambda: c.search_experiments(filter_string=mine, order_by=["name DESC"]))
        self.step("exp.search.tag_eq", lambda: c.search_experiments(filter_string=f"{mine} AND tags.team = 'ml'", order_by=["name ASC"]))
        self.step("exp.search.tag_ne", lambda: c.search_experiments(filter_string=f"{mine} AND tags.team != 'ml'", order_by=["name ASC"]))
        self.step("exp.search.name_eq", lambda: c.search_experiments(filter_string=f"name = '{self.name('exp-c')}'"))
        self.step("exp.search.ilike", lambda: c.search_experiments(filter_string=f"name ILIKE '{self.prefix.upper()}-EXP-%'", order_by=["name ASC"]))
        self.step("exp.search.tag_like", lambda: c.search_experiments(filter_string=f"{mine} AND tags.team LIKE 'i%'"))

        def pages():
            out, token = [], None
            for _ in range(4):
                page = c.search_experiments(filter_string=mine, order_by=["name ASC"], max_results=2, page_token=token)
                out.append(page)
                token = page.token
                if not token:
                    break
            return out

        self.step("exp.search.pages_of_2", pages)

        self.step("exp.delete.d", lambda: c.delete_experiment(self.exp_d))
        self.step("exp.get.deleted", lambda: c.get_experiment(self.exp_d))
        self.step("exp.search.active_only", lambda: c.search_experiments(view_type=ViewType.ACTIVE_ONLY, filter_string=mine, order_by=["name ASC"]))
        self.step("exp.search.deleted_only", lambda: c.search_experiments(view_type=ViewType.DELETED_ONLY, filter_string=mine, order_by=["name ASC"]))
        self.step("exp.search.all", lambda: c.search_experiments(view_type=ViewType.ALL, filter_string=mine, order_by=["name ASC"]))
        self.step("exp.restore.d", lambda: c.restore_experiment(self.exp_d))
        self.step("exp.get.restored", lambda: c.get_experiment(self.exp_d))
        self.step(
            "exp.search.raw_view_type",
            lambda: self.rest("POST", "experiments/search", body={"filter": mine, "order_by": ["name ASC"], "view_type": "ALL", "max_results": 3}),
        )
        self.step(
            "exp.get_by_name.raw",
            lambda: self.rest("GET", "experiments/get-by-name", params={"experiment_name": self.name("exp-b")}),
        )

    # runs ----------------------------------------------------------------------
    def runs(self):
        c, n = self.client, self.norm
        b = self.exp_b
        n.given_name("first-run")
        r1 = self.step(
            "run.create.r1",
            lambda: c.create_run(b, start_time=T0, tags={"t": "a", "purpose": "conformance"}, run_name="first-run"),
        )
        self.r1 = r1.info.run_id if r1 else None
        n.name_run(self.r1, "r1")
        self.step("run.get.r1", lambda: c.get_run(self.r1))

        r2 = self.step("run.create.r2_generated_name", lambda: c.create_run(b, start_time=T0 + 1000))
        self.r2 = r2.info.run_id if r2 else None
        n.name_run(self.r2, "r2")
        self.step("run.get.r2", lambda: c.get_run(self.r2))

        r3 = self.step(
            "run.create.raw_minimal",
            lambda: self.rest("POST", "runs/create", body={"experiment_id": b}),
            note="no start_time, user_id, run_name or tags: what the server fills in",
        )
        self.r3 = r3.json.get("run", {}).get("info", {}).get("run_id") if r3 and r3.status == 200 else None
        n.name_run(self.r3, "r3")

        n.given_name("renamed-run")
        self.step("run.update.status_end_time", lambda: c.set_terminated(self.r1, status="FAILED", end_time=T0 + 5000))
        self.step("run.get.after_terminate", lambda: c.get_run(self.r1))
        self.step("run.update.name", lambda: c.update_run(self.r1, name="renamed-run"))
        self.step("run.get.after_rename", lambda: c.get_run(self.r1))
        self.step("run.update.status_running", lambda: c.update_run(self.r1, status="RUNNING"))
        self.step("run.get.after_running", lambda: c.get_run(self.r1))
        self.step(
            "run.update.raw",
            lambda: self.rest("POST", "runs/update", body={"run_id": self.r2, "status": "KILLED", "end_time": T0 + 7000, "run_name": "renamed-run"}),
        )
        self.step("run.get.after_raw_update", lambda: c.get_run(self.r2))

        self.step("run.delete.r2", lambda: c.delete_run(self.r2))
        self.step("run.get.deleted", lambda: c.get_run(self.r2))
        self.step("run.restore.r2", lambda: c.restore_run(self.r2))
        self.step("run.get.restored", lambda: c.get_run(self.r2))

        # a run in an experiment that is then deleted: its runs follow it
        c_exp = self.exp_c
        n.given_name("in-deleted-exp")
        r4 = self.step("run.create.r4_in_exp_c", lambda: c.create_run(c_exp, start_time=T0, run_name="in-deleted-exp"))
        self.r4 = r4.info.run_id if r4 else None
        n.name_run(self.r4, "r4")
        self.step("exp.delete.c_with_run", lambda: c.delete_experiment(c_exp))
        self.step("run.get.in_deleted_exp", lambda: c.get_run(self.r4))
        self.step("exp.restore.c_with_run", lambda: c.restore_experiment(c_exp))
        self.step("run.get.in_restored_exp", lambda: c.get_run(self.r4))

    # metrics, params, tags ---------------------------------------------------------
    def logging(self):
        c = self.client
        r = self.r3
        self.step("log_metric.step_ts", lambda: c.log_metric(r, "loss", 0.5, timestamp=T0 + 10, step=3))
        self.step("log_metric.second", lambda: c.log_metric(r, "loss", 0.25, timestamp=T0 + 20, step=4))
        self.step("log_metric.same_step_earlier_ts", lambda: c.log_metric(r, "loss", 0.75, timestamp=T0 + 5, step=4))
        self.step("log_metric.negative_step", lambda: c.log_metric(r, "loss", 1.5, timestamp=T0 + 30, step=-1))
        self.step("log_metric.no_step", lambda: c.log_metric(r, "acc", 0.9, timestamp=T0 + 40))
        self.step("log_metric.int_value", lambda: c.log_metric(r, "count", 7, timestamp=T0 + 41, step=0))
        self.step("log_metric.nan", lambda: c.log_metric(r, "weird", float("nan"), timestamp=T0 + 50, step=0))
        self.step("log_metric.pos_inf", lambda: c.log_metric(r, "weird", float("inf"), timestamp=T0 + 51, step=1))
        self.step("log_metric.neg_inf", lambda: c.log_metric(r, "weird", float("-inf"), timestamp=T0 + 52, step=2))
        self.step("log_metric.big", lambda: c.log_metric(r, "big", 1.2345678901234567e300, timestamp=T0 + 53, step=0))
        self.step("log_metric.client_timestamp", lambda: c.log_metric(r, "clock", 1.0))
        self.step("metric_history.loss", lambda: c.get_metric_history(r, "loss"))
        self.step("metric_history.weird", lambda: c.get_metric_history(r, "weird"))
        self.step("metric_history.clock", lambda: c.get_metric_history(r, "clock"))
        self.step("metric_history.missing_key", lambda: c.get_metric_history(r, "never-logged"))
        self.step("metric_history.raw", lambda: self.rest("GET", "metrics/get-history", params={"run_id": r, "metric_key": "loss"}))
        self.step(
            "metric_history.raw_paged",
            lambda: self.rest("GET", "metrics/get-history", params={"run_id": r, "metric_key": "loss", "max_results": 2}),
        )
        self.step(
            "log_metric.raw_nan_string",
            lambda: self.rest("POST", "runs/log-metric", body={"run_id": r, "key": "raw", "value": "NaN", "timestamp": T0 + 60, "step": 0}),
        )
        self.step(
            "log_metric.raw_inf_string",
            lambda: self.rest("POST", "runs/log-metric", body={"run_id": r, "key": "raw", "value": "Infinity", "timestamp": T0 + 61, "step": 1}),
        )
        self.step("metric_history.raw_key", lambda: self.rest("GET", "metrics/get-history", params={"run_id": r, "metric_key": "raw"}))

        self.step("log_param.lr", lambda: c.log_param(r, "lr", "0.01"))
        self.step("log_param.same_value_again", lambda: c.log_param(r, "lr", "0.01"))
        self.step("log_param.changed_value", lambda: c.log_param(r, "lr", "0.02"), message="exact")
        self.step("log_param.numeric", lambda: c.log_param(r, "epochs", 10))
        self.step("log_param.empty_value", lambda: c.log_param(r, "empty", ""))

        self.step("set_tag.t", lambda: c.set_tag(r, "t", "b"))
        self.step("set_tag.overwrite", lambda: c.set_tag(r, "t", "c"))
        self.step("set_tag.to_delete", lambda: c.set_tag(r, "tmp", "x"))
        self.step("delete_tag.tmp", lambda: c.delete_tag(r, "tmp"))
        self.step("delete_tag.missing", lambda: c.delete_tag(r, "tmp"), message="exact")

        from mlflow.entities import Metric, Param, RunTag

        self.step(
            "log_batch.mixed",
            lambda: c.log_batch(
                r,
                metrics=[Metric("acc", 0.8, T0 + 70, 1), Metric("acc", 0.95, T0 + 71, 2), Metric("f1", 0.7, T0 + 72, 0)],
                params=[Param("opt", "adam"), Param("batch", "32")],
                tags=[RunTag("t", "d"), RunTag("batch-tag", "yes")],
            ),
        )
        self.step(
            "log_batch.raw_same_param_again",
            lambda: self.rest("POST", "runs/log-batch", body={"run_id": r, "params": [{"key": "opt", "value": "adam"}]}),
        )
        self.step(
            "log_batch.raw_changed_param",
            lambda: self.rest("POST", "runs/log-batch", body={"run_id": r, "params": [{"key": "opt", "value": "sgd"}]}),
        )
        self.step(
            "log_batch.raw_duplicate_param_in_batch",
            lambda: self.rest("POST", "runs/log-batch", body={"run_id": r, "params": [{"key": "dup", "value": "1"}, {"key": "dup", "value": "2"}]}),
        )
        self.step(
            "log_batch.raw_1000_metrics_ok",
            lambda: self.rest(
                "POST",
                "runs/log-batch",
                body={"run_id": r, "metrics": [{"key": "bulk", "value": i / 10, "timestamp": T0 + i, "step": i} for i in range(1000)]},
            ),
        )
        self.step(
            "log_batch.raw_1001_metrics",
            lambda: self.rest(
                "POST",
                "runs/log-batch",
                body={"run_id": r, "metrics": [{"key": "over", "value": 1.0, "timestamp": T0 + i, "step": i} for i in range(1001)]},
            ),
            message="exact",
        )
        self.step(
            "log_batch.raw_101_params",
            lambda: self.rest("POST", "runs/log-batch", body={"run_id": r, "params": [{"key": f"p{i}", "value": "v"} for i in range(101)]}),
            message="exact",
        )
        self.step(
            "log_batch.raw_101_tags",
            lambda: self.rest("POST", "runs/log-batch", body={"run_id": r, "tags": [{"key": f"tag{i}", "value": "v"} for i in range(101)]}),
            message="exact",
        )
        self.step(
            "log_batch.client_chunks_1500_metrics",
            lambda: c.log_batch(r, metrics=[Metric("chunked", float(i), T0 + i, i) for i in range(1500)]),
            note="the client splits this into batches of at most 1000 metrics",
        )
        self.step("metric_history.bulk_len", lambda: len(c.get_metric_history(r, "bulk")))
        self.step("metric_history.chunked_len", lambda: len(c.get_metric_history(r, "chunked")))
        self.step("run.get.after_logging", lambda: c.get_run(r))

    # search ----------------------------------------------------------------------------
    def search(self):
        c, n = self.client, self.norm
        from mlflow.entities import Metric, Param, RunTag, ViewType

        e = self.exp_e
        # 8 runs with distinct start times: 3 pages of 3, 3, 2
        spec = [
            # name,  acc,  lr,     opt,     t,    status
            ("s0", 0.95, "0.01", "adam", "a", "FINISHED"),
            ("s1", 0.50, "0.1", "sgd", "b", "FINISHED"),
            ("s2", 0.92, "0.001", "adamw", "A", "FAILED"),
            ("s3", 0.70, "0.01", "sgd", "a", "RUNNING"),
            ("s4", 0.99, "0.1", "adam", "c", "FINISHED"),
            ("s5", 0.10, "0.01", "rmsprop", "b", "KILLED"),
            ("s6", 0.91, "0.001", "Adam", "d", "FINISHED"),
            ("s7", None, "0.5", "sgd", "a", "FAILED"),
        ]
        self.search_runs = {}

        def make():
            for i, (name, acc, lr, opt, t, status) in enumerate(spec):
                n.given_name(f"search-{name}")
                run = c.create_run(e, start_time=T0 + 100_000 * i, run_name=f"search-{name}", tags={"t": t})
                rid = run.info.run_id
                n.name_run(rid, name)
                self.search_runs[name] = rid
                metrics = [Metric("acc", acc, T0 + i, 0), Metric("loss", 1 - acc, T0 + i, 0)] if acc is not None else []
                c.log_batch(rid, metrics=metrics, params=[Param("lr", lr), Param("opt", opt)], tags=[RunTag("idx", str(i))])
                if status != "RUNNING":
                    c.set_terminated(rid, status=status, end_time=T0 + 100_000 * i + 50)
            return sorted(self.search_runs)

        self.step("search.setup", make)

        def s(name, flt="", order=None, view=ViewType.ACTIVE_ONLY, max_results=1000, message="ignore"):
            self.step(
                f"search.{name}",
                lambda: c.search_runs([e], filter_string=flt, order_by=order, run_view_type=view, max_results=max_results),
                message=message,
            )

        s("all_default_order")
        s("metric_gt", "metrics.acc > 0.9")
        s("metric_gte_lt", "metrics.acc >= 0.5 and metrics.acc < 0.95")
        s("metric_eq", "metrics.acc = 0.5")
        s("metric_ne", "metrics.acc != 0.5")
        s("param_eq", "params.lr = '0.01'")
        s("param_ne", "params.lr != '0.01'")
        s("param_double_quotes", 'params.opt = "adam"')
        s("param_backticks", "params.`opt` = 'sgd'")
        s("tag_ne", "tags.t != 'a'")
        s("tag_eq", "tags.t = 'a'")
        s("attr_status", "attributes.status = 'FINISHED'")
        s("attr_status_ne", "attributes.status != 'FINISHED'")
        s("attr_alias_attribute", "attribute.status = 'FAILED'")
        s("attr_run_name", "attributes.run_name = 'search-s3'")
        s("attr_run_name_like", "attributes.run_name LIKE 'search-s%'")
        s("attr_start_time", f"attributes.start_time >= {T0 + 300_000}")
        s("attr_end_time", f"attributes.end_time > {T0 + 200_000}")
        s("like_param", "params.opt LIKE 'adam%'")
        s("ilike_param", "params.opt ILIKE 'adam%'")
        s("like_tag", "tags.t LIKE 'a'")
        s("ilike_tag", "tags.t ILIKE 'a'")
        s("in_params", "params.lr IN ('0.1', '0.5')")
        s("not_in_params", "params.lr NOT IN ('0.1', '0.5')")
        s("in_status", "attributes.status IN ('FAILED', 'KILLED')")
        s("in_tags", "tags.t IN ('c', 'd')")
        self.step(
            "search.in_run_id",
            lambda: c.search_runs([e], filter_string=f"attributes.run_id IN ('{self.search_runs.get('s0')}', '{self.search_runs.get('s5')}')"),
        )
        self.step(
            "search.not_in_run_id",
            lambda: c.search_runs([e], filter_string=f"attributes.run_id NOT IN ('{self.search_runs.get('s0')}', '{self.search_runs.get('s5')}')"),
        )
        s("and_combined", "metrics.acc > 0.6 and params.opt = 'sgd' and tags.t = 'a'")
        s("missing_metric_key", "metrics.nope > 0")
        s("order_metric_desc", order=["metrics.acc DESC"])
        s("order_metric_asc", order=["metrics.acc ASC"])
        s("order_param", order=["params.lr ASC", "attributes.start_time ASC"])
        s("order_param_desc", order=["params.opt DESC", "attributes.start_time ASC"])
        s("order_start_time", order=["attributes.start_time DESC"])
        s("order_start_time_asc", order=["start_time ASC"])
        s("order_tag", order=["tags.t ASC", "metrics.acc DESC"])
        s("order_run_name", order=["attributes.run_name DESC"])
        s("order_status", order=["attributes.status ASC", "start_time ASC"])
        s("filter_and_order", "metrics.acc > 0.5", order=["metrics.acc DESC"])
        s("max_results_2", max_results=2)

        def pages():
            out, token = [], None
            for _ in range(4):
                page = c.search_runs([e], order_by=["metrics.acc DESC"], max_results=3, page_token=token)
                out.append(page)
                token = page.token
                if not token:
                    break
            return out

        self.step("search.pages_3x3", pages)

        def raw_pages():
            out, token = [], None
            for _ in range(4):
                body = {"experiment_ids": [e], "order_by": ["attributes.start_time ASC"], "max_results": 3}
                if token:
                    body["page_token"] = token
                r = self.rest("POST", "runs/search", body=body)
                out.append(r.summary())
                token = r.json.get("next_page_token") if r.status == 200 else None
                if not token:
                    break
            return out

        self.step("search.raw_pages", raw_pages)

        self.step("search.delete_s1", lambda: c.delete_run(self.search_runs.get("s1")))
        s("view_active_after_delete", order=["start_time ASC"])
        s("view_deleted_only", order=["start_time ASC"], view=ViewType.DELETED_ONLY)
        s("view_all", order=["start_time ASC"], view=ViewType.ALL)
        self.step(
            "search.raw_view_deleted",
            lambda: self.rest("POST", "runs/search", body={"experiment_ids": [e], "run_view_type": "DELETED_ONLY"}),
        )
        self.step("search.restore_s1", lambda: c.restore_run(self.search_runs.get("s1")))
        self.step(
            "search.multi_experiment",
            lambda: c.search_runs([self.exp_b, e], filter_string="attributes.status = 'FINISHED'", order_by=["start_time ASC"]),
        )
        self.step(
            "search.fluent_dataframe",
            lambda: self.mlflow.search_runs(experiment_ids=[e], order_by=["metrics.acc DESC"]),
        )
        self.step(
            "search.fluent_list",
            lambda: self.mlflow.search_runs(experiment_ids=[e], filter_string="params.opt = 'sgd'", output_format="list"),
        )
        self.step(
            "search.raw_bad_filter",
            lambda: self.rest("POST", "runs/search", body={"experiment_ids": [e], "filter": "metrics.acc >>> 1"}),
        )
        s("bad_filter_client", "metrics.acc >>> 1")
        s("bad_filter_unknown_entity", "foo.bar = 'x'")
        s("bad_filter_unquoted_param", "params.lr = 0.01")
        s("bad_order_by", order=["metrics.acc SIDEWAYS"])
        self.step(
            "search.raw_max_results_too_big",
            lambda: self.rest("POST", "runs/search", body={"experiment_ids": [e], "max_results": 50001}),
        )
        self.step(
            "search.raw_bad_page_token",
            lambda: self.rest("POST", "runs/search", body={"experiment_ids": [e], "page_token": "not-a-token"}),
        )
        self.step(
            "exp.search.raw_bad_filter",
            lambda: self.rest("POST", "experiments/search", body={"filter": "name === 'x'", "max_results": 10}),
        )

    # artifacts ----------------------------------------------------------------------------
    def artifacts(self):
        c = self.client
        r = self.r1
        src = self.tmp / "src"
        (src / "dir" / "nested").mkdir(parents=True)
        (src / "hello.txt").write_text("hello world\n")
        (src / "dir" / "a.txt").write_text("a\n")
        (src / "dir" / "b.csv").write_text("x,y\n1,2\n")
        (src / "dir" / "nested" / "c.bin").write_bytes(bytes(range(256)) * 4)
        (src / "empty.txt").write_text("")

        self.step("artifacts.log_artifact", lambda: c.log_artifact(r, str(src / "hello.txt")))
        self.step("artifacts.log_artifact.subdir", lambda: c.log_artifact(r, str(src / "empty.txt"), artifact_path="sub/deeper"))
        self.step("artifacts.log_artifacts.dir", lambda: c.log_artifacts(r, str(src / "dir"), artifact_path="dir"), parallel=True)
        self.step("artifacts.log_text", lambda: c.log_text(r, "some notes\nline 2\n", "notes/readme.md"))
        self.step("artifacts.log_dict.json", lambda: c.log_dict(r, {"lr": 0.01, "layers": [64, 32]}, "cfg/config.json"))
        self.step("artifacts.log_dict.yaml", lambda: c.log_dict(r, {"lr": 0.01, "name": "x"}, "cfg/config.yaml"))
        self.step("artifacts.list.root", lambda: c.list_artifacts(r))
        self.step("artifacts.list.dir", lambda: c.list_artifacts(r, "dir"))
        self.step("artifacts.list.nested", lambda: c.list_artifacts(r, "dir/nested"))
        self.step("artifacts.list.deep", lambda: c.list_artifacts(r, "sub/deeper"))
        self.step("artifacts.list.missing_dir", lambda: c.list_artifacts(r, "no-such-dir"))
        self.step("artifacts.list.file_path", lambda: c.list_artifacts(r, "hello.txt"))
        self.step("artifacts.download.file", lambda: tree(c.download_artifacts(r, "hello.txt", str(self.fresh("dl1")))))
        self.step("artifacts.download.dir", lambda: tree(c.download_artifacts(r, "dir", str(self.fresh("dl2")))), parallel=True)
        self.step(
            "artifacts.download.fluent",
            lambda: tree(self.mlflow.artifacts.download_artifacts(run_id=r, artifact_path="cfg", dst_path=str(self.fresh("dl3")))),
            parallel=True,
        )
        self.step("artifacts.download.whole_run", lambda: tree(c.download_artifacts(r, "", str(self.fresh("dl4")))), parallel=True)
        self.step("artifacts.load_text", lambda: self.mlflow.artifacts.load_text(f"runs:/{r}/notes/readme.md"))
        self.step("artifacts.load_dict", lambda: self.mlflow.artifacts.load_dict(f"runs:/{r}/cfg/config.json"))
        self.step("artifacts.download.missing", lambda: tree(c.download_artifacts(r, "nope.txt", str(self.fresh("dl5")))))

        exp = self.exp_b
        base = f"{exp}/{r}/artifacts"
        self.step("artifacts.raw.list", lambda: self.rest("GET", "artifacts", params={"path": base}, api="mlflow-artifacts"))
        self.step("artifacts.raw.list_subdir", lambda: self.rest("GET", "artifacts", params={"path": f"{base}/dir"}, api="mlflow-artifacts"))
        self.step("artifacts.raw.get_file", lambda: self.rest("GET", f"artifacts/{base}/hello.txt", api="mlflow-artifacts"))
        self.step("artifacts.raw.get_missing", lambda: self.rest("GET", f"artifacts/{base}/missing.txt", api="mlflow-artifacts"))
        self.step(
            "artifacts.raw.put",
            lambda: RawResponse(requests.put(f"{self.uri}/api/2.0/mlflow-artifacts/artifacts/{base}/raw/put.txt", data=b"raw bytes\n", timeout=10)),
        )
        self.step("artifacts.raw.get_put", lambda: self.rest("GET", f"artifacts/{base}/raw/put.txt", api="mlflow-artifacts"))

    def fresh(self, name: str) -> Path:
        p = self.tmp / name
        p.mkdir()
        return p

    # fluent API end to end -------------------------------------------------------------
    def fluent(self):
        mlflow, n = self.mlflow, self.norm
        name = self.name("fluent")

        def set_exp():
            exp = mlflow.set_experiment(name)
            n.name_exp(exp.experiment_id, "fluent")
            return exp

        self.step("fluent.set_experiment.create", set_exp)
        self.step("fluent.set_experiment.existing", lambda: mlflow.set_experiment(name))
        n.given_name("fluent-run")

        def start():
            run = mlflow.start_run(run_name="fluent-run", tags={"t": "fluent"})
            n.name_run(run.info.run_id, "fluent")
            self.fluent_run = run.info.run_id
            return run

        self.step("fluent.start_run", start)
        self.step("fluent.log_param", lambda: mlflow.log_param("lr", "0.01"))
        self.step("fluent.log_params", lambda: mlflow.log_params({"opt": "adam", "epochs": 3}))
        self.step("fluent.log_metric", lambda: mlflow.log_metric("acc", 0.5, step=1, timestamp=T0 + 1))
        self.step("fluent.log_metric.default_ts", lambda: mlflow.log_metric("acc", 0.6, step=2))
        self.step("fluent.log_metrics", lambda: mlflow.log_metrics({"acc": 0.7, "loss": 0.3}, step=3, timestamp=T0 + 3))
        self.step("fluent.set_tag", lambda: mlflow.set_tag("phase", "train"))
        self.step("fluent.set_tags", lambda: mlflow.set_tags({"a": "1", "b": "2"}))
        self.step("fluent.delete_tag", lambda: mlflow.delete_tag("a"))
        self.step("fluent.log_text", lambda: mlflow.log_text("fluent text", "out/fluent.txt"))
        self.step("fluent.log_dict", lambda: mlflow.log_dict({"k": [1, 2]}, "out/fluent.json"))
        self.step("fluent.log_param.change_error", lambda: mlflow.log_param("lr", "0.1"), message="exact")
        self.step("fluent.end_run", lambda: mlflow.end_run())
        self.step("fluent.get_run", lambda: mlflow.get_run(self.fluent_run))
        self.step("fluent.last_active_run", lambda: mlflow.last_active_run())

        def failed_run():
            try:
                with mlflow.start_run(run_name="fluent-failed") as run:
                    n.name_run(run.info.run_id, "fluent-failed")
                    mlflow.log_metric("x", 1.0, step=0, timestamp=T0)
                    raise RuntimeError("boom")
            except RuntimeError:
                pass
            return mlflow.get_run(run.info.run_id)

        n.given_name("fluent-failed")
        self.step("fluent.run_context_failure", failed_run)
        self.step(
            "fluent.search_after_failure",
            lambda: mlflow.search_runs(search_all_experiments=False, filter_string="attributes.run_name = 'fluent-failed'", output_format="list"),
        )
        self.step(
            "fluent.search_experiments",
            lambda: mlflow.search_experiments(filter_string=f"name = '{name}'"),
        )
        self.step("fluent.get_experiment_by_name", lambda: mlflow.get_experiment_by_name(name))

    # errors ------------------------------------------------------------------------------
    def errors(self):
        c = self.client
        missing_run = "0123456789abcdef0123456789abcdef"
        self.norm.name_exp("999999999", "missing")
        self.norm.name_run(missing_run, "missing")
        self.step("err.run.get_missing", lambda: c.get_run(missing_run), message="exact")
        self.step("err.run.get_missing_raw", lambda: self.rest("GET", "runs/get", params={"run_id": missing_run}), message="exact")
        self.step("err.run.get_no_id_raw", lambda: self.rest("GET", "runs/get"), message="exact")
        self.step("err.run.log_metric_missing_run", lambda: c.log_metric(missing_run, "m", 1.0, timestamp=T0, step=0), message="exact")
        self.step("err.run.log_param_missing_run", lambda: c.log_param(missing_run, "p", "1"), message="exact")
        self.step("err.run.set_tag_missing_run", lambda: c.set_tag(missing_run, "k", "v"), message="exact")
        self.step("err.run.update_missing_run", lambda: c.set_terminated(missing_run, end_time=T0), message="exact")
        self.step("err.run.delete_missing_run", lambda: c.delete_run(missing_run), message="exact")
        self.step("err.run.history_missing_run", lambda: c.get_metric_history(missing_run, "m"))
        self.step("err.run.create_missing_experiment", lambda: c.create_run("999999999", start_time=T0), message="exact")
        self.step(
            "err.run.log_metric_no_value_raw",
            lambda: self.rest("POST", "runs/log-metric", body={"run_id": self.r3, "key": "novalue", "timestamp": T0}),
            message="exact",
        )
        self.step(
            "err.run.log_metric_no_key_raw",
            lambda: self.rest("POST", "runs/log-metric", body={"run_id": self.r3, "value": 1.0, "timestamp": T0}),
            message="exact",
        )
        self.step(
            "err.run.log_metric_bad_value_raw",
            lambda: self.rest("POST", "runs/log-metric", body={"run_id": self.r3, "key": "k", "value": "abc", "timestamp": T0}),
        )
        self.step(
            "err.run.log_metric_to_deleted_run",
            lambda: (c.delete_run(self.r4), c.log_metric(self.r4, "m", 1.0, timestamp=T0, step=0)),
            message="exact",
        )

        self.step("err.exp.get_missing", lambda: c.get_experiment("999999999"), message="exact")
        self.step("err.exp.get_missing_raw", lambda: self.rest("GET", "experiments/get", params={"experiment_id": "999999999"}), message="exact")
        self.step("err.exp.get_no_id_raw", lambda: self.rest("GET", "experiments/get"), message="exact")
        self.step(
            "err.exp.get_by_name_missing_raw",
            lambda: self.rest("GET", "experiments/get-by-name", params={"experiment_name": self.name("missing")}),
            message="exact",
        )
        self.step("err.exp.create_duplicate", lambda: c.create_experiment(self.name("exp-b")))
        self.step(
            "err.exp.create_duplicate_raw",
            lambda: self.rest("POST", "experiments/create", body={"name": self.name("exp-b")}),
        )
        self.step("err.exp.create_empty_name_raw", lambda: self.rest("POST", "experiments/create", body={"name": ""}), message="exact")
        self.step("err.exp.create_no_name_raw", lambda: self.rest("POST", "experiments/create", body={}), message="exact")
        self.step("err.exp.rename_to_existing", lambda: c.rename_experiment(self.exp_e, self.name("exp-b")))
        self.step("err.exp.delete_missing", lambda: c.delete_experiment("999999999"), message="exact")
        self.step("err.exp.set_tag_missing", lambda: c.set_experiment_tag("999999999", "k", "v"), message="exact")
        self.step("err.exp.bad_filter", lambda: c.search_experiments(filter_string="name === 'x'"))
        self.step("err.exp.bad_order_by", lambda: c.search_experiments(order_by=["nme ASC"]))
        self.step("err.unknown_endpoint_raw", lambda: self.rest("GET", "no-such-endpoint"), body=False)


SERVER_INFO = "/api/3.0/mlflow/server-info"


def aux(ex: dict) -> dict:
    """Reduces an answer of an endpoint the client only probes to what the client uses.

    /api/3.0/mlflow/server-info: the artifact client reads two flags from it and
    treats any non-200 answer as "both false"; everything else in it describes
    the reference server's own features (gateway, workspaces, trace archival).
    """
    if ex.get("path") == SERVER_INFO:
        body = ex.get("body") if ex.get("status") == 200 and isinstance(ex.get("body"), dict) else {}
        return {
            "method": ex["method"],
            "path": ex["path"],
            "client_view": {k: bool(body.get(k, False)) for k in ("multipart_downloads_enabled", "multipart_uploads_enabled")},
        }
    return ex


class RawResponse:
    def __init__(self, r: requests.Response):
        self.status = r.status_code
        try:
            self.json = json.loads(r.content, parse_constant=lambda c: {"$json_literal": c})
        except ValueError:
            self.json = None
        self.text = r.content

    def summary(self):
        return {"status": self.status}

    def error(self):
        body = self.json if isinstance(self.json, dict) else {}
        return {
            "type": "http",
            "error_code": body.get("error_code"),
            "http_status": self.status,
            "message": body.get("message"),
        }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", required=True, help="tracking server base URL, e.g. http://127.0.0.1:5000")
    ap.add_argument("--out", required=True, help="where to write the normalised JSON result")
    ap.add_argument("--prefix", default=f"cf{os.getpid()}", help="run-unique prefix of experiment names")
    ap.add_argument("--deadline", type=float, default=50, help="seconds after which remaining steps are skipped")
    args = ap.parse_args()

    started = time.monotonic()
    conf = Conformance(args.uri, args.prefix, args.deadline)
    try:
        conf.run_all()
    finally:
        if conf.mlflow.active_run():
            conf.mlflow.end_run()
        shutil.rmtree(conf.tmp, ignore_errors=True)
    out = {
        "mlflow_version": conf.mlflow.__version__,
        "prefix": args.prefix,
        "steps": [conf.norm.value(e) for e in conf.entries],
    }
    Path(args.out).write_text(json.dumps(out, indent=1, sort_keys=True, allow_nan=False) + "\n")
    errors = sum(1 for e in conf.entries if "error" in e)
    print(
        f"conformance: {len(conf.entries)} steps ({errors} answered with an error) against {args.uri} "
        f"in {time.monotonic() - started:.1f}s -> {args.out}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
