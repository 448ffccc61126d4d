"""Normalisation of MLflow tracking responses for the conformance comparison.

Two independent runs of conformance.py (against two servers, or the same
server twice) must produce byte-identical normalised output when the servers
behave the same. Everything a server legitimately generates differently on
each run is masked here; everything else is kept as is, including whether a
field is present at all (proto3 JSON omits default values, so "absent" and
"empty" are different answers).

Rules (README.md repeats them):
- ids: experiment ids (``experiment_id``, ``experiment_ids``), run ids
  (``run_id``, ``run_uuid``, any 32-hex string, any known run id inside a
  string) and the experiment id inside artifact locations/paths are replaced
  by placeholders. The script names the ids it creates (``<exp:a>``,
  ``<run:r1>``) right after creating them; any other id gets ``<exp?N>`` /
  ``<run?N>`` in order of first appearance. The same value always maps to the
  same placeholder, so "same id in two places" is still checked.
- timestamps: a value under a key named ``*_time``/``timestamp`` that lies in
  the window [script start - 1h, now + 1h] was generated at run time (by the
  server, or by the client's clock) and becomes ``<now>``. The script logs
  everything it can with fixed timestamps in 2023, which are kept exactly.
- ``user_id``, the ``mlflow.user`` tag and ``mlflow.source.*`` tags depend on
  the environment: non-empty values become ``<user>`` / ``<env>``.
- run names the script did not supply (server-generated, like "bold-cat-42")
  become ``<gen-name:N>`` by first appearance (``run_name`` and the
  ``mlflow.runName`` tag), so their equality is still checked.
- page tokens are opaque: a non-empty token becomes ``<token>``.
- lists MLflow gives no order for are sorted by ``key``: run tags, params and
  latest metrics, experiment tags (any list of objects that all have a
  ``key``; the sort is stable, so a metric history - one key, ordered by
  MLflow as timestamp, step, value - keeps its order). Everything else keeps
  the server's order (search results, artifact listings, history).
- non-finite floats: JSON literals (NaN, Infinity) become
  ``{"$json_literal": "NaN"}``, Python floats from client objects become
  ``{"$float": "nan"}``, so they compare equal to themselves and the wire form
  (literal vs "NaN" string) is still checked.
"""

from __future__ import annotations

import math
import re
import time

RUN_ID_RE = re.compile(r"\b[0-9a-f]{32}\b")
TIME_KEY_RE = re.compile(r"(^|[._])(time|timestamp|[a-z]+_time)$")
ENV_TAG_RE = re.compile(r"^(tags\.)?mlflow\.(user|source\..+)$")
RUN_NAME_TAG_RE = re.compile(r"^(tags\.)?mlflow\.runName$")
# experiment id segment in front of a run id in an artifact path or URI:
#   mlflow-artifacts:/<exp>/<run>/artifacts, .../mlflow-artifacts/artifacts/<exp>/<run>/...,
#   path=<exp>/<run>/artifacts/...
EXP_BEFORE_RUN_RE = re.compile(r"(^|/)([^/<>?=&\s]+)/(<run[:?][^>]+>)")
EXP_ARTIFACT_LOCATION_RE = re.compile(r"^(mlflow-artifacts:/)([^/<>\s]+)$")


class Normalizer:
    def __init__(self, window_start_ms: int | None = None):
        now = int(time.time() * 1000)
        self.window_lo = (window_start_ms or now) - 3600_000
        self.exp_ids: dict[str, str] = {}
        self.run_ids: dict[str, str] = {}
        self.gen_names: dict[str, str] = {}
        self.given_names: set[str] = set()

    # -- registration -------------------------------------------------------
    def name_exp(self, value, label: str) -> None:
        if value is not None and str(value) not in self.exp_ids:
            self.exp_ids[str(value)] = f"<exp:{label}>"

    def name_run(self, value, label: str) -> None:
        if value is not None and str(value) not in self.run_ids:
            self.run_ids[str(value)] = f"<run:{label}>"

    def given_name(self, name: str) -> None:
        self.given_names.add(name)

    def exp(self, value) -> str:
        v = str(value)
        if v not in self.exp_ids:
            self.exp_ids[v] = f"<exp?{len(self.exp_ids) + 1}>"
        return self.exp_ids[v]

    def run(self, value) -> str:
        v = str(value)
        if v not in self.run_ids:
            self.run_ids[v] = f"<run?{len(self.run_ids) + 1}>"
        return self.run_ids[v]

    def run_name(self, value):
        if not isinstance(value, str) or value == "" or value in self.given_names:
            return value
        if value not in self.gen_names:
            self.gen_names[value] = f"<gen-name:{len(self.gen_names) + 1}>"
        return self.gen_names[value]

    # -- values -------------------------------------------------------------
    def string(self, s: str) -> str:
        """Masks run ids and the experiment id of artifact URIs inside a string."""
        for rid in sorted(self.run_ids, key=len, reverse=True):
            if len(rid) >= 8 and rid in s:
                s = s.replace(rid, self.run_ids[rid])
        s = RUN_ID_RE.sub(lambda m: self.run(m.group(0)), s)
        m = EXP_ARTIFACT_LOCATION_RE.match(s)
        if m:
            return m.group(1) + self.exp(m.group(2))
        return EXP_BEFORE_RUN_RE.sub(lambda m: m.group(1) + self.exp(m.group(2)) + "/" + m.group(3), s)

    def is_now(self, v) -> bool:
        return (
            isinstance(v, int)
            and not isinstance(v, bool)
            and self.window_lo <= v <= int(time.time() * 1000) + 3600_000
        )

    def value(self, obj, key: str | None = None):
        if isinstance(obj, bool) or obj is None:
            return obj
        if isinstance(obj, float):
            if math.isnan(obj):
                return {"$float": "nan"}
            if math.isinf(obj):
                return {"$float": "inf" if obj > 0 else "-inf"}
            return obj
        if isinstance(obj, int):
            if key and TIME_KEY_RE.search(key) and self.is_now(obj):
                return "<now>"
            return obj
        if isinstance(obj, str):
            if key in ("experiment_id",):
                return self.exp(obj) if obj != "" else obj
            if key in ("run_id", "run_uuid"):
                return self.run(obj) if obj != "" else obj
            if key in ("next_page_token", "page_token", "token") and obj:
                return "<token>"
            if key == "user_id" and obj:
                return "<user>"
            if key and ENV_TAG_RE.match(key) and obj:
                return "<env>"
            if key and (key == "run_name" or RUN_NAME_TAG_RE.match(key)):
                return self.run_name(obj)
            if key and TIME_KEY_RE.search(key) and obj.isdigit() and self.is_now(int(obj)):
                return "<now>"
            return self.string(obj)
        if isinstance(obj, (list, tuple)):
            if key == "experiment_ids":
                return [self.exp(x) if isinstance(x, str) else self.value(x) for x in obj]
            out = [self.value(x, key) for x in obj]
            if out and all(isinstance(x, dict) and isinstance(x.get("key"), str) for x in out):
                out = sorted(out, key=lambda x: x["key"])
            return out
        if isinstance(obj, dict):
            if "$json_literal" in obj or "$float" in obj:
                return obj
            # a {"key": k, "value": v} tag/param: the key decides how the value is masked
            if isinstance(obj.get("key"), str) and "value" in obj:
                k = obj["key"]
                out = {}
                for kk, vv in obj.items():
                    out[kk] = self.value(vv, k if kk == "value" else kk)
                return out
            return {k: self.value(v, k) for k, v in obj.items()}
        return self.string(repr(obj))
