#!/usr/bin/env python3
"""Writes deploy/grafana/dhsa-dashboard.json, the Grafana dashboard of a dhsa deployment.

    python3 deploy/grafana/generate_dashboard.py            # rewrite the JSON
    python3 deploy/grafana/generate_dashboard.py --check    # exit 1 if the JSON is stale

Edit the panels here, not in the JSON. tests/observability checks that the committed JSON is what
this script writes and that every metric its queries use is one the code exports.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "dhsa-dashboard.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
# Every query is restricted to the namespace chosen at the top of the dashboard.
NS = 'namespace=~"$namespace"'


def target(expr, legend, ref):
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}


def panel(title, unit, targets, x, y, w=12, h=8, kind="timeseries", stack=False, description=""):
    p = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [target(e, l, chr(ord("A") + i)) for i, (e, l) in enumerate(targets)],
    }
    if stack:
        p["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal"}, "fillOpacity": 30}
    if kind == "bargauge":
        p["options"] = {"orientation": "horizontal", "displayMode": "gradient"}
        p["fieldConfig"]["defaults"].update({"min": 0, "max": 1, "thresholds": {
            "mode": "absolute", "steps": [{"color": "green", "value": None}, {"color": "orange", "value": 0.75},
                                          {"color": "red", "value": 0.9}]}})
    return p


def row(title, y):
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
            "panels": []}


def quantiles(metric, selector, by, legend_prefix):
    return [(f'histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[{RATE}])))',
             f"p{int(q * 100)} {legend_prefix}") for q in (0.5, 0.9, 0.99)]


def panels():
    router = f'role="router",{NS}'
    out = []
    y = 0
    out.append(row("Requests", y)); y += 1
    out.append(panel("Request rate by method and code", "reqps", [
        (f"sum by (method, code) (rate(dhsa_requests_total{{{router}}}[{RATE}]))", "{{method}} {{code}}")],
        0, y, stack=True, description="Router RPCs finished per second (Attention service)."))
    out.append(panel("Errors by code", "reqps", [
        (f'sum by (code) (rate(dhsa_requests_total{{{router},code!="OK"}}[{RATE}]))', "{{code}}"),
        (f'sum(rate(dhsa_requests_total{{{router},code!="OK"}}[{RATE}])) / '
         f'sum(rate(dhsa_requests_total{{{router}}}[{RATE}]))', "error ratio")],
        12, y, description="Non-OK router responses per second, and their share of all requests."))
    y += 8
    out.append(panel("Latency p50 / p90 / p99 per method", "s",
                     quantiles("dhsa_request_duration_seconds", f'{router},code="OK"', "method", "{{method}}"),
                     0, y, description="Successful router calls, from the request's start to its end."))
    out.append(panel("In-flight requests and active sequences", "short", [
        (f"sum by (role) (dhsa_inflight_requests{{{NS}}})", "in flight ({{role}})"),
        (f"sum(dhsa_active_sequences{{{NS}}})", "active sequences")], 12, y))
    y += 8
    out.append(row("Where the time goes", y)); y += 1
    for i, method in enumerate(("Prefill", "Decode")):
        out.append(panel(f"{method}: mean time per stage", "s", [
            (f'sum by (stage) (rate(dhsa_stage_duration_seconds_sum{{method="{method}",{NS}}}[{RATE}])) / '
             f'sum by (stage) (rate(dhsa_stage_duration_seconds_count{{method="{method}",{NS}}}[{RATE}]))',
             "{{stage}}")], 12 * i, y, stack=True,
            description="Router stages of one layer call: boundaries, selection (summaries, scores, spans), "
                        "dispatch (KV and queries to workers), attention (waiting for workers), merge."))
    y += 8
    out.append(panel("Worker attention time", "s",
                     quantiles("dhsa_worker_attention_duration_seconds", NS, "backend", "{{backend}}"), 0, y,
                     description="Compute time of one Attend on a worker."))
    out.append(panel("Selection density", "percentunit", [
        (f"sum by (method) (rate(dhsa_selection_density_ratio_sum{{{NS}}}[{RATE}])) / "
         f"sum by (method) (rate(dhsa_selection_density_ratio_count{{{NS}}}[{RATE}]))", "mean {{method}}"),
        (f"histogram_quantile(0.5, sum by (le, method) (rate(dhsa_selection_density_ratio_bucket{{{NS}}}[{RATE}])))",
         "median {{method}}")], 12, y,
        description="Attended (query, key) pairs over the causal pairs dense attention would attend."))
    y += 8
    out.append(row("Throughput and transfer", y)); y += 1
    out.append(panel("Tokens per second", "short", [
        (f"sum(rate(dhsa_prefill_tokens_total{{{NS}}}[{RATE}]))", "prefill"),
        (f"sum(rate(dhsa_decode_tokens_total{{{NS}}}[{RATE}]))", "decode")], 0, y,
        description="Layer-tokens: a token of an L-layer model counts once per layer."))
    out.append(panel("Bytes per second by transport", "Bps", [
        (f"sum by (transport, direction) (rate(dhsa_transfer_bytes_total{{{NS}}}[{RATE}]))",
         "{{transport}} {{direction}}"),
        (f"sum(rate(dhsa_kv_stored_bytes_total{{{NS}}}[{RATE}]))", "KV stored on workers")], 12, y))
    y += 8
    out.append(row("Capacity", y)); y += 1
    out.append(panel("KV bytes held vs capacity per worker", "bytes", [
        (f"sum by (instance, worker) (dhsa_kv_held_bytes{{{NS}}})", "held {{instance}}/{{worker}}"),
        (f"sum by (instance, worker) (dhsa_kv_capacity_bytes{{{NS}}})", "capacity {{instance}}/{{worker}}")],
        0, y))
    out.append(panel("KV cache fill per worker", "percentunit", [
        (f"dhsa_kv_held_bytes{{{NS}}} / (dhsa_kv_capacity_bytes{{{NS}}} > 0)", "{{instance}}/{{worker}}")],
        12, y, kind="bargauge", description="The alert DhsaKvCapacityHigh fires above 90% for 5 minutes."))
    y += 8
    out.append(panel("Workers up (router's probes)", "short", [
        (f"min by (worker) (dhsa_worker_up{{{NS}}})", "{{worker}}")], 0, y))
    out.append(panel("KV bytes placed by the router per worker", "bytes", [
        (f"max by (worker) (dhsa_router_placed_bytes{{{NS}}})", "placed {{worker}}"),
        (f"max by (worker) (dhsa_router_worker_capacity_bytes{{{NS}}})", "capacity {{worker}}")], 12, y))
    y += 8
    out.append(row("Processes", y)); y += 1
    out.append(panel("CPU (cores)", "short", [
        (f"sum by (job, instance) (rate(process_cpu_seconds_total{{{NS}}}[{RATE}]))", "{{job}} {{instance}}")],
        0, y, w=8))
    out.append(panel("Resident memory", "bytes", [
        (f"sum by (job, instance) (process_resident_memory_bytes{{{NS}}})", "{{job}} {{instance}}")], 8, y, w=8))
    out.append(panel("GPU memory (CUDA workers)", "bytes", [
        (f"sum by (instance, device) (dhsa_gpu_memory_used_bytes{{{NS}}})", "used {{instance}} gpu{{device}}"),
        (f"sum by (instance, device) (dhsa_gpu_memory_total_bytes{{{NS}}})", "total {{instance}} gpu{{device}}")],
        16, y, w=8))
    for i, p in enumerate(out):
        p["id"] = i + 1
    return out


def dashboard():
    return {
        "uid": "dhsa-overview",
        "title": "dhsa: distributed sparse attention",
        "description": "Router and workers of dhsa (deploy/grafana/generate_dashboard.py writes this file).",
        "tags": ["dhsa"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
            {"name": "namespace", "type": "query", "datasource": DS, "label": "Namespace",
             "query": {"query": "label_values(dhsa_requests_total, namespace)", "refId": "ns"},
             "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2,
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": panels(),
    }


def render():
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


def main():
    text = render()
    if "--check" in sys.argv[1:]:
        with open(OUT) as f:
            if f.read() != text:
                print(f"{OUT} is stale: run python3 deploy/grafana/generate_dashboard.py", file=sys.stderr)
                return 1
        return 0
    with open(OUT, "w") as f:
        f.write(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
