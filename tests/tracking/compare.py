#!/usr/bin/env python3
"""Compares two normalised conformance results step by step.

    python compare.py ref.json mlplane.json [--max-diffs-per-step N]

The first file is the reference (expected), the second the server under test
(actual). Prints one block per differing step with the JSON path of every
difference, expected vs actual, and a one-line summary; exits 1 on any
difference, 0 when the results match.

Strict everywhere (types too: 1 and "1" differ, an absent field differs from
an empty one), except error messages: when the reference step says
``"message_check": "ignore"``, every ``message`` under its ``error`` and in the
bodies of its HTTP answers with status >= 400 is left out of the comparison
(error_code and HTTP status still are compared).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

MISSING = object()


def strip_messages(entry: dict) -> dict:
    entry = copy.deepcopy(entry)
    if isinstance(entry.get("error"), dict):
        entry["error"].pop("message", None)
    for ex in entry.get("http") or []:
        if isinstance(ex, dict) and isinstance(ex.get("status"), int) and ex["status"] >= 400:
            body = ex.get("body")
            if isinstance(body, dict):
                body.pop("message", None)
    return entry


def same_scalar(a, b) -> bool:
    if type(a) is not type(b):
        # JSON has one number type: 1 and 1.0 are the same number
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
            return a == b
        return False
    return a == b


def diff(exp, act, path: str, out: list):
    if isinstance(exp, dict) and isinstance(act, dict):
        for k in sorted(set(exp) | set(act), key=str):
            diff(exp.get(k, MISSING), act.get(k, MISSING), f"{path}.{k}", out)
    elif isinstance(exp, list) and isinstance(act, list):
        if len(exp) != len(act):
            out.append((path, f"list of {len(exp)}", f"list of {len(act)}"))
        for i in range(min(len(exp), len(act))):
            diff(exp[i], act[i], f"{path}[{i}]", out)
        for i in range(len(act), len(exp)):
            out.append((f"{path}[{i}]", exp[i], MISSING))
        for i in range(len(exp), len(act)):
            out.append((f"{path}[{i}]", MISSING, act[i]))
    elif exp is MISSING or act is MISSING:
        out.append((path, exp, act))
    elif isinstance(exp, (dict, list)) or isinstance(act, (dict, list)):
        out.append((path, exp, act))
    elif not same_scalar(exp, act):
        out.append((path, exp, act))


def show(v, limit=300) -> str:
    if v is MISSING:
        return "<absent>"
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= limit else s[:limit] + f"... ({len(s)} chars)"


def describe_http(entry: dict) -> str:
    calls = []
    for ex in entry.get("http") or []:
        calls.append(f"{ex.get('method')} {ex.get('path')} -> {ex.get('status')}")
    return "; ".join(calls) if calls else "(no HTTP request)"


def outcome(entry: dict) -> str:
    if entry is None:
        return "<step absent>"
    if "error" in entry:
        e = entry["error"]
        return f"error {e.get('error_code')} (HTTP {e.get('http_status')})"
    return "ok"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("expected")
    ap.add_argument("actual")
    ap.add_argument("--max-diffs-per-step", type=int, default=25)
    args = ap.parse_args()

    with open(args.expected) as f:
        ref = json.load(f)
    with open(args.actual) as f:
        act = json.load(f)

    ref_steps = {e["step"]: e for e in ref["steps"]}
    act_steps = {e["step"]: e for e in act["steps"]}
    order = [e["step"] for e in ref["steps"]] + [s for s in act_steps if s not in ref_steps]

    # An exception that is neither an MLflow error nor an HTTP answer means the
    # harness itself broke against the reference: that is never a pass.
    harness = [
        e["step"]
        for e in ref["steps"]
        if isinstance(e.get("error"), dict) and e["error"].get("type") not in ("MlflowException", "RestException", "http")
    ]
    for name in harness:
        print(f"--- {name}: the reference run raised {ref_steps[name]['error'].get('where') or ref_steps[name]['error']}")

    failed = list(harness)
    headline: dict[str, str] = {}
    for name in order:
        e, a = ref_steps.get(name), act_steps.get(name)
        if e is None or a is None:
            failed.append(name)
            print(f"--- {name}: step only in {'actual' if e is None else 'expected'}")
            continue
        if e.get("message_check", "ignore") != "exact":
            e, a = strip_messages(e), strip_messages(a)
        # how to compare messages is the reference's decision, not a result
        e = {k: v for k, v in e.items() if k not in ("message_check", "note")}
        a = {k: v for k, v in a.items() if k not in ("message_check", "note")}
        out: list = []
        diff(e, a, "", out)
        if not out:
            continue
        failed.append(name)
        headline[name] = f"expected {outcome(e)}, got {outcome(a)}"
        print(f"--- {name}: {headline[name]}")
        print(f"    expected calls: {describe_http(e)}")
        print(f"    actual calls:   {describe_http(a)}")
        for path, x, y in out[: args.max_diffs_per_step]:
            print(f"    {path or '.'}")
            print(f"        expected: {show(x)}")
            print(f"        actual:   {show(y)}")
        if len(out) > args.max_diffs_per_step:
            print(f"    ... {len(out) - args.max_diffs_per_step} more differences")

    failed = list(dict.fromkeys(failed))
    total = len(order)
    print(f"compare: {total - len(failed)} of {total} steps match, {len(failed)} differ")
    if failed:
        print("differing steps:")
        for name in failed:
            print(f"  {name}: {headline.get(name, 'see above')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
