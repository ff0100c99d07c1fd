// Validates every object of the rendered kustomize overlays against the Kubernetes API schemas
// (kubernetes-models; the ServiceMonitor against the Prometheus operator's CRD schema). Offline: the
// schemas ship in the npm packages. Usage (from the repository root, after `npm ci` here):
//   node tests/deploy/validate_k8s.mjs k8s/overlays/cpu k8s/overlays/gpu
// Exits 1 naming each object that does not validate, or a kind it has no schema for.
import { execFileSync } from "node:child_process";
import { parseAllDocuments } from "yaml";

// apiVersion -> module whose exports are the kinds of that group/version.
async function modelsFor(apiVersion) {
  if (apiVersion === "monitoring.coreos.com/v1") {
    return import("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1");
  }
  return import(`kubernetes-models/${apiVersion}`);
}

let problems = 0;
let validated = 0;
const overlays = process.argv.slice(2);
if (overlays.length === 0) {
  console.error("usage: node validate_k8s.mjs OVERLAY_DIR...");
  process.exit(2);
}
for (const overlay of overlays) {
  const rendered = execFileSync("kubectl", ["kustomize", overlay], { encoding: "utf8" });
  for (const doc of parseAllDocuments(rendered)) {
    const obj = doc.toJS();
    if (!obj) continue;
    const where = `${overlay}: ${obj.kind}/${obj.metadata?.name}`;
    let Model;
    try {
      Model = (await modelsFor(obj.apiVersion))[obj.kind];
    } catch (e) {
      Model = undefined;
    }
    if (!Model) {
      console.error(`FAIL ${where}: no schema for ${obj.apiVersion} ${obj.kind}`);
      problems++;
      continue;
    }
    try {
      new Model(obj).validate();
      validated++;
    } catch (e) {
      console.error(`FAIL ${where}: ${e.message}`);
      problems++;
    }
  }
}
console.log(`validate_k8s: ${validated} objects valid, ${problems} problems`);
process.exit(problems > 0 || validated === 0 ? 1 : 0);
