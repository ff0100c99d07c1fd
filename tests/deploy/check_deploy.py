#!/usr/bin/python3
"""Checks that the Kubernetes overlays, the Dockerfiles and the Prometheus config agree with the
code: ports, gRPC health service names, ServiceConfig keys, metric ports, the config file paths,
the user id, and that every path a Dockerfile copies exists in the repository.

    check_deploy.py --facts build/tests/deploy/deploy_facts --repo . [--kubectl kubectl]

What the code says comes from deploy_facts (tests/deploy/deploy_facts.cc), which parses each
rendered ConfigMap's JSON exactly as dhsa-router and dhsa-worker do. Prints one line per problem;
exit 1 if there is any.
"""
import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

OVERLAYS = {"cpu": "cpu", "gpu": "cuda"}  # overlay -> worker backend it must configure
USER_ID = 10001


class Checker:
    def __init__(self):
        self.problems = []
        self.checks = 0

    def expect(self, ok, message):
        self.checks += 1
        if not ok:
            self.problems.append(message)
        return ok


def run_json(args):
    out = subprocess.run(args, check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def find(objs, kind, name=None):
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return found


def port_named(container, name):
    for p in container.get("ports", []):
        if p.get("name") == name:
            return p["containerPort"]
    return None


def check_workload(c, where, workload, facts, code, role, config_map, config_file):
    spec = workload["spec"]["template"]["spec"]
    container = spec["containers"][0]
    service_name = code["router_readiness_service"] if role == "router" else code["worker_service"]
    c.expect(port_named(container, "grpc") == facts["listen_port"],
             f"{where}: containerPort grpc {port_named(container, 'grpc')} != listen port "
             f"{facts['listen_port']} of its config")
    metrics_code = code["router_metrics_port"] if role == "router" else code["worker_metrics_port"]
    c.expect(port_named(container, "metrics") == facts["metrics_port"] == metrics_code,
             f"{where}: containerPort metrics {port_named(container, 'metrics')}, config metricsPort "
             f"{facts['metrics_port']} and the code's port {metrics_code} differ")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        p = container.get(probe, {}).get("grpc")
        if not c.expect(p is not None, f"{where}: {probe} is not a native gRPC probe"):
            continue
        c.expect(p["port"] == facts["listen_port"], f"{where}: {probe} port {p['port']} != "
                 f"listen port {facts['listen_port']}")
        want = service_name if probe == "readinessProbe" else ""
        c.expect(p.get("service", "") == want,
                 f"{where}: {probe} asks for service '{p.get('service', '')}', the code serves '{want}'")
    c.expect(spec.get("terminationGracePeriodSeconds", 30) > facts["drain_seconds"],
             f"{where}: terminationGracePeriodSeconds must exceed drainSeconds {facts['drain_seconds']}")
    # The config file the container reads is the ConfigMap key checked above.
    args = container.get("args", [])
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    config_path = args[args.index("--config") + 1] if "--config" in args else None
    mounted = [f"{mounts[n]}/{config_file}" for n, v in volumes.items()
               if v.get("configMap", {}).get("name") == config_map and n in mounts]
    c.expect(config_path in mounted, f"{where}: --config {config_path} is not {config_file} of "
             f"ConfigMap {config_map} (mounted: {mounted})")
    # Security context: non-root, read-only root filesystem, no privilege escalation.
    pod_sc = spec.get("securityContext", {})
    for ctr in spec["containers"]:
        sc = ctr.get("securityContext", {})
        c.expect(sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: not runAsNonRoot")
        c.expect(sc.get("runAsUser", pod_sc.get("runAsUser")) == USER_ID,
                 f"{where}: runAsUser is not the images' user {USER_ID}")
        c.expect(sc.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem is writable")
        c.expect(sc.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation allowed")
        c.expect("ALL" in sc.get("capabilities", {}).get("drop", []), f"{where}: capabilities not dropped")
        res = ctr.get("resources", {})
        c.expect("requests" in res and "limits" in res, f"{where}: resource requests and limits missing")
    return container


def check_service(c, where, svc, grpc_port, metrics_port):
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    if "grpc" in ports:
        c.expect(ports["grpc"]["port"] == grpc_port, f"{where}: grpc port {ports['grpc']['port']} != {grpc_port}")
    c.expect(ports.get("metrics", {}).get("port") == metrics_port,
             f"{where}: metrics port {ports.get('metrics', {}).get('port')} != {metrics_port}")


def memory_bytes(q):
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(q))
    return int(m.group(1)) * units.get(m.group(2), 1)


def check_overlay(c, repo, kubectl, facts_bin, code, overlay, backend, tmp):
    where = f"k8s/overlays/{overlay}"
    rendered = subprocess.run([kubectl, "kustomize", os.path.join(repo, where)], check=True,
                              capture_output=True, text=True).stdout
    objs = [o for o in yaml.safe_load_all(rendered) if o]
    cms = [o for o in find(objs, "ConfigMap") if o["metadata"]["name"].startswith("dhsa-config")]
    if not c.expect(len(cms) == 1, f"{where}: expected one dhsa-config ConfigMap, got {len(cms)}"):
        return
    cm = cms[0]
    facts = {}
    for role in ("router", "worker"):
        key = f"{role}.json"
        path = os.path.join(tmp, f"{overlay}-{key}")
        with open(path, "w") as f:
            f.write(cm["data"][key])
        for k in json.loads(cm["data"][key]):
            c.expect(k in code["service_config_json_keys"], f"{where}: {key} key '{k}' is not a ServiceConfig field")
        try:
            facts[role] = run_json([facts_bin, "config", role, path])
        except RuntimeError as e:
            c.expect(False, f"{where}: {key} is rejected by the code: {e}")
            return
    rf, wf = facts["router"], facts["worker"]
    c.expect(wf["listen_port"] is not None, f"{where}: worker.json must set listenAddress")
    c.expect(wf["backend"] == backend, f"{where}: worker backend '{wf['backend']}', expected '{backend}'")

    router = find(objs, "Deployment", "dhsa-router")
    workers = find(objs, "StatefulSet", "dhsa-worker")
    if not (c.expect(len(router) == 1, f"{where}: no Deployment dhsa-router") and
            c.expect(len(workers) == 1, f"{where}: no StatefulSet dhsa-worker")):
        return
    router, workers = router[0], workers[0]
    cm_name = cm["metadata"]["name"]
    check_workload(c, f"{where} router", router, rf, code, "router", cm_name, "router.json")
    wc = check_workload(c, f"{where} worker", workers, wf, code, "worker", cm_name, "worker.json")

    # The router finds the workers through the headless Service the StatefulSet is governed by.
    m = re.fullmatch(r"dns:///([^:/]+):(\d+)", rf["worker_dns"] or "")
    if c.expect(m is not None, f"{where}: router workerDns '{rf['worker_dns']}' is not dns:///name:port"):
        host, port = m.group(1).split(".")[0], int(m.group(2))
        c.expect(port == wf["listen_port"], f"{where}: workerDns port {port} != worker listen port {wf['listen_port']}")
        c.expect(workers["spec"]["serviceName"] == host,
                 f"{where}: workerDns names '{host}', the StatefulSet's Service is '{workers['spec']['serviceName']}'")
        svc = find(objs, "Service", host)
        if c.expect(len(svc) == 1, f"{where}: no Service '{host}' for the workers"):
            c.expect(svc[0]["spec"].get("clusterIP") == "None", f"{where}: Service {host} is not headless")
            check_service(c, f"{where} Service {host}", svc[0], wf["listen_port"], wf["metrics_port"])
    rsvc = find(objs, "Service", "dhsa-router")
    if c.expect(len(rsvc) == 1, f"{where}: no Service dhsa-router"):
        check_service(c, f"{where} Service dhsa-router", rsvc[0], rf["listen_port"], rf["metrics_port"])

    limits = wc.get("resources", {}).get("limits", {})
    if backend == "cpu":
        c.expect(memory_bytes(limits.get("memory", 0)) > wf["capacity_bytes"] > 0,
                 f"{where}: worker memory limit {limits.get('memory')} must exceed capacityBytes {wf['capacity_bytes']}")
    else:
        c.expect(str(limits.get("nvidia.com/gpu")) == "1", f"{where}: workers do not ask for nvidia.com/gpu")
        c.expect("cuda" in wc["image"], f"{where}: worker image {wc['image']} is not the CUDA image")

    # Only the router reaches the workers' gRPC port.
    nps = find(objs, "NetworkPolicy")
    ok = False
    for np in nps:
        if np["spec"]["podSelector"].get("matchLabels") != workers["spec"]["selector"]["matchLabels"]:
            continue
        for rule in np["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            if wf["listen_port"] in ports:
                ok = all(f.get("podSelector", {}).get("matchLabels") == router["spec"]["selector"]["matchLabels"]
                         and "namespaceSelector" not in f for f in rule["from"])
    c.expect(ok, f"{where}: no NetworkPolicy admits only the router to worker port {wf['listen_port']}")

    hpa = find(objs, "HorizontalPodAutoscaler", "dhsa-router")
    c.expect(len(hpa) == 1 and hpa[0]["apiVersion"] == "autoscaling/v2" and
             hpa[0]["spec"]["scaleTargetRef"]["name"] == "dhsa-router", f"{where}: no autoscaling/v2 HPA on the router")
    for wl in (router, workers):
        labels = wl["spec"]["selector"]["matchLabels"]
        c.expect(any(p["spec"]["selector"]["matchLabels"] == labels for p in find(objs, "PodDisruptionBudget")),
                 f"{where}: no PodDisruptionBudget for {wl['metadata']['name']}")
    sms = find(objs, "ServiceMonitor")
    if c.expect(len(sms) == 1, f"{where}: no ServiceMonitor"):
        sel = sms[0]["spec"]["selector"]["matchLabels"]
        scraped = sorted(s["metadata"]["name"] for s in find(objs, "Service")
                         if sel.items() <= s["metadata"].get("labels", {}).items())
        c.expect(scraped == ["dhsa-router", "dhsa-worker"], f"{where}: the ServiceMonitor selects {scraped}")
        for ep in sms[0]["spec"]["endpoints"]:
            c.expect(ep["port"] == "metrics", f"{where}: ServiceMonitor port '{ep['port']}' is not 'metrics'")
    return {"namespace": router["metadata"]["namespace"], "router": rf, "worker": wf}


def dockerfile_stages(path):
    """[(base image, [instructions])] of a Dockerfile, continuation lines joined."""
    with open(path) as f:
        text = re.sub(r"\\\n", " ", f.read())
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append((rest.split()[0], []))
        elif stages:
            stages[-1][1].append((word.upper(), rest.strip()))
    return stages


def check_dockerfiles(c, repo, code, deployed):
    tracked = subprocess.run(["git", "-C", repo, "ls-files"], check=True, capture_output=True,
                             text=True).stdout.split()
    with open(os.path.join(repo, ".dockerignore")) as f:
        ignored = [l.strip().rstrip("/") for l in f if l.strip() and not l.startswith("#")]
    images = {
        "Dockerfile.router": ("dhsa-router", deployed["router"], "/etc/dhsa/router.json", None),
        "Dockerfile.worker": ("dhsa-worker", deployed["worker"], "/etc/dhsa/worker.json", "cpu"),
        "Dockerfile.worker-cuda": ("dhsa-worker", deployed["worker"], "/etc/dhsa/worker.json", "cuda"),
    }
    for name, (binary, facts, config_path, backend) in images.items():
        where = f"deploy/docker/{name}"
        stages = dockerfile_stages(os.path.join(repo, where))
        if not c.expect(len(stages) >= 2, f"{where}: not a multi-stage build"):
            continue
        for _, instructions in stages:
            for word, rest in instructions:
                if word != "COPY" or "--from" in rest:
                    continue
                for src in rest.split()[:-1]:
                    exists = any(t == src or t.startswith(src.rstrip("/") + "/") for t in tracked)
                    c.expect(exists, f"{where}: COPY {src}: no such path in the repository")
                    c.expect(not any(fnmatch.fnmatch(src, p) or src == p for p in ignored),
                             f"{where}: COPY {src} is excluded by .dockerignore")
        base, final = stages[-1]
        words = dict(final)
        runs = " ".join(rest for w, rest in final if w == "RUN")
        c.expect(not re.search(r"\b(build-essential|cmake|g\+\+|gcc|ninja-build|-dev)\b", runs),
                 f"{where}: the runtime stage installs build tools")
        c.expect(words.get("USER", "").split(":")[0] == str(USER_ID), f"{where}: USER is not {USER_ID}")
        exposed = {int(p.split("/")[0]) for w, rest in final if w == "EXPOSE" for p in rest.split()}
        c.expect(exposed == {facts["listen_port"], facts["metrics_port"]},
                 f"{where}: EXPOSE {sorted(exposed)} != ports {facts['listen_port']}, {facts['metrics_port']}")
        entry = json.loads(words.get("ENTRYPOINT", "[]"))
        c.expect(entry and entry[0].endswith("/" + binary), f"{where}: ENTRYPOINT is not {binary}")
        cmd = json.loads(words.get("CMD", "[]"))
        c.expect(cmd[:2] == ["--config", config_path], f"{where}: CMD does not read {config_path}")
        if backend:
            c.expect(cmd[-2:] == ["--backend", backend], f"{where}: CMD does not select backend {backend}")
        c.expect(any(w == "HEALTHCHECK" for w, _ in final) or "No HEALTHCHECK:" in open(os.path.join(repo, where)).read(),
                 f"{where}: neither a HEALTHCHECK nor a reason for none")
        if backend == "cuda":
            c.expect(re.match(r"nvidia/cuda:.*-runtime-", base) is not None,
                     f"{where}: runtime base {base} is not an official CUDA runtime image")


def check_prometheus(c, repo, deployed, namespace):
    path = os.path.join(repo, "deploy/prometheus/prometheus.yml")
    with open(path) as f:
        conf = yaml.safe_load(f)
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    want = {"dhsa-router": ("dhsa-router-pods", deployed["router"]["metrics_port"]),
            "dhsa-worker": ("dhsa-worker", deployed["worker"]["metrics_port"])}
    for job, (service, port) in want.items():
        if not c.expect(job in jobs, f"{path}: no job {job}"):
            continue
        sd = jobs[job]["dns_sd_configs"][0]
        c.expect(sd["port"] == port, f"{path}: job {job} scrapes port {sd['port']}, the config says {port}")
        c.expect(sd["names"] == [f"{service}.{namespace}.svc.cluster.local"],
                 f"{path}: job {job} resolves {sd['names']}, not Service {service} in namespace {namespace}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", required=True)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--kubectl", default="kubectl")
    args = ap.parse_args()
    c = Checker()
    code = run_json([args.facts, "code"])
    c.expect(code["router_readiness_service"] == code["router_service"],
             "the router's readiness name is not its gRPC service name")
    deployed = {}
    with tempfile.TemporaryDirectory() as tmp:
        for overlay, backend in OVERLAYS.items():
            deployed[overlay] = check_overlay(c, args.repo, args.kubectl, args.facts, code, overlay, backend, tmp)
    if deployed.get("cpu"):
        check_dockerfiles(c, args.repo, code, deployed["cpu"])
        check_prometheus(c, args.repo, deployed["cpu"], deployed["cpu"]["namespace"])
    for p in c.problems:
        print("FAIL:", p)
    print(f"check_deploy: {c.checks} checks, {len(c.problems)} problems")
    return 1 if c.problems or c.checks == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
