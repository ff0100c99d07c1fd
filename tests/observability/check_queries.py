#!/usr/bin/python3
"""Fails when a Grafana dashboard or a Prometheus rule file queries a metric, or groups by a label,
that the code does not export.

    check_queries.py FAMILIES [--dashboard D.json]... [--rules R.yml]...

FAMILIES is the output of `deploy_facts families` (services/common/metrics.h Families()), or the
deploy_facts binary itself (then it is run). A histogram family
F is queried as F_bucket, F_sum or F_count. Besides each metric's own labels, the labels that
Prometheus attaches to every target (job, instance, namespace, pod) may be used, `le` with a
histogram's buckets, and the metric `up`.
"""
import json
import os
import re
import subprocess
import sys

import yaml

TARGET_LABELS = {"job", "instance", "namespace", "pod", "__name__"}
# PromQL words that are not metric names: aggregations, functions, keywords.
NOT_METRICS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right", "and",
    "or", "unless", "bool", "offset", "inf", "nan",
}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"\{([^}]*)\}")
IDENT = re.compile(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w])")


def load_families(path):
    if os.access(path, os.X_OK) and not path.endswith(".json"):
        families = json.loads(subprocess.run([path, "families"], check=True, capture_output=True,
                                             text=True).stdout)
    else:
        with open(path) as f:
            families = json.load(f)
    series = {"up": set()}
    for fam in families:
        labels = set(fam["labels"])
        if fam["type"] == "histogram":
            series[fam["name"] + "_bucket"] = labels | {"le"}
            series[fam["name"] + "_sum"] = labels
            series[fam["name"] + "_count"] = labels
        else:
            series[fam["name"]] = labels
    return series


def check_expr(expr, series, where):
    """Returns the problems of one PromQL expression."""
    problems = []
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # String literals hold label values only.
    text = re.sub(r"'(?:[^'\\]|\\.)*'", "''", text)
    used_labels = set()
    for m in MATCHERS.finditer(text):
        used_labels |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(1)))
    text = MATCHERS.sub(" ", text)
    for m in GROUPING.finditer(text):
        used_labels |= {l.strip() for l in m.group(2).split(",") if l.strip()}
    text = GROUPING.sub(lambda m: m.group(1) + " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # Ranges and Grafana's $__rate_interval.
    metrics = []
    for m in IDENT.finditer(text):
        word = m.group(1)
        rest = text[m.end():].lstrip()
        if word.lower() in NOT_METRICS or rest.startswith("("):
            continue  # A function call, an aggregation or a keyword.
        if re.fullmatch(r"[0-9.e+-]+", word):
            continue
        metrics.append(word)
    if not metrics:
        problems.append(f"{where}: no metric found in '{expr}'")
    allowed = set(TARGET_LABELS)
    for name in metrics:
        if name not in series:
            problems.append(f"{where}: metric '{name}' is not exported by the code")
        else:
            allowed |= series[name]
    for label in sorted(used_labels - allowed):
        problems.append(f"{where}: label '{label}' is on none of {sorted(set(metrics))}")
    return problems


def dashboard_exprs(path):
    with open(path) as f:
        dash = json.load(f)
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((f"{path}: panel '{p.get('title')}' {t.get('refId')}", t["expr"]))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", q or "")
        if m:
            out.append((f"{path}: variable '{v['name']}'", f"{m.group(1)}{{{m.group(2)}!=\"\"}}"))
    return out


def rule_exprs(path):
    with open(path) as f:
        doc = yaml.safe_load(f)
    return [(f"{path}: rule '{r.get('alert') or r.get('record')}'", r["expr"])
            for g in doc["groups"] for r in g["rules"]]


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    series = load_families(argv[1])
    exprs = []
    args = argv[2:]
    while args:
        flag, path, args = args[0], args[1], args[2:]
        exprs += dashboard_exprs(path) if flag == "--dashboard" else rule_exprs(path)
    problems = []
    for where, expr in exprs:
        problems += check_expr(expr, series, where)
    for p in problems:
        print(p, file=sys.stderr)
    print(f"check_queries: {len(exprs)} queries, {len(problems)} problems")
    return 1 if problems or not exprs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
