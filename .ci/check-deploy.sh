#!/usr/bin/env bash
# CI: the deployment checks that need no build (about half a minute): Dockerfile lint, each k8s
# overlay rendered with kubectl kustomize and every object validated offline against the Kubernetes
# schemas (kubernetes-models), promtool on the Prometheus config and alert rules (with their unit
# tests), and the Grafana dashboard against its generator. The checks that compare all of this with
# the code (ports, probe names, config keys, metric names) need the build and run under ctest
# (tests/deploy, tests/observability). Run from anywhere; needs deploy/install-deps.sh first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

for tool in kubectl node npm promtool /usr/bin/python3; do
  command -v "$tool" >/dev/null || { echo "check-deploy: $tool not found (deploy/install-deps.sh)"; exit 1; }
done

echo "== npm ci (tests/deploy: kubernetes-models, dockerfilelint)"
(cd tests/deploy && npm ci --no-audit --no-fund --loglevel=error)

echo "== dockerfilelint"
tests/deploy/node_modules/.bin/dockerfilelint deploy/docker/Dockerfile.*

echo "== kubectl kustomize + Kubernetes schemas"
node tests/deploy/validate_k8s.mjs k8s/overlays/cpu k8s/overlays/gpu

echo "== promtool"
promtool check config deploy/prometheus/prometheus.yml
(cd deploy/prometheus && promtool test rules dhsa-alerts.test.yml)

echo "== Grafana dashboard is what its generator writes"
/usr/bin/python3 deploy/grafana/generate_dashboard.py --check
echo "check-deploy: ok"
