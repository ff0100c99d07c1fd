// What the code says about deployment, as JSON, for the checks of deploy/ and k8s/ (one source of
// truth: the manifests, dashboards and alert rules are compared against the code, not against
// copies of its constants).
//
//   deploy_facts code                 ports, health service names, ServiceConfig JSON keys
//   deploy_facts families             every exported metric family (services/common/metrics.h)
//   deploy_facts config router|worker FILE.json
//                                     the file parsed as the binaries parse it (unknown keys and
//                                     bad values fail), with the ports it makes them use
#include <cstdio>
#include <string>

#include "dhsa/v1/attention.grpc.pb.h"
#include "dhsa/v1/service_config.pb.h"
#include "dhsa/v1/worker.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "services/common/config.h"
#include "services/common/metrics.h"
#include "services/router/router.h"
#include "services/worker/worker_server.h"

namespace {

int PortOf(const std::string& address) {
  const size_t colon = address.rfind(':');
  return colon == std::string::npos ? -1 : std::stoi(address.substr(colon + 1));
}

int Fail(const std::string& message) {
  std::fprintf(stderr, "deploy_facts: %s\n", message.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "";
  nlohmann::json out;
  if (what == "code" && argc == 2) {
    out["router_default_listen_address"] = dhsa::router::RouterOptions{}.listen_address;
    out["router_readiness_service"] = dhsa::router::kAttentionServiceName;
    out["router_service"] = dhsa::v1::Attention::service_full_name();
    out["worker_service"] = dhsa::v1::Worker::service_full_name();
    out["router_metrics_port"] = dhsa::metrics::kRouterMetricsPort;
    out["worker_metrics_port"] = dhsa::metrics::kWorkerMetricsPort;
    nlohmann::json keys = nlohmann::json::array();
    const google::protobuf::Descriptor* d = dhsa::v1::ServiceConfig::descriptor();
    for (int i = 0; i < d->field_count(); ++i) keys.push_back(d->field(i)->json_name());
    out["service_config_json_keys"] = keys;
  } else if (what == "families" && argc == 2) {
    out = nlohmann::json::array();
    for (const dhsa::metrics::FamilyInfo& f : dhsa::metrics::Families()) {
      const char* type = f.type == dhsa::metrics::FamilyType::kCounter     ? "counter"
                         : f.type == dhsa::metrics::FamilyType::kHistogram ? "histogram"
                                                                           : "gauge";
      out.push_back({{"name", f.name}, {"type", type}, {"labels", f.labels}});
    }
  } else if (what == "config" && argc == 4) {
    const std::string role = argv[2];
    absl::StatusOr<dhsa::v1::ServiceConfig> config = dhsa::LoadServiceConfigJson(argv[3]);
    if (!config.ok()) return Fail(std::string(config.status().message()));
    out["metrics_port"] = config->metrics_port();
    out["drain_seconds"] = config->drain_seconds() > 0 ? config->drain_seconds() : 30.0;
    if (role == "router") {
      absl::StatusOr<dhsa::router::RouterOptions> o =
          dhsa::router::RouterOptionsFromServiceConfig(*config);
      if (!o.ok()) return Fail(std::string(o.status().message()));
      out["listen_port"] = PortOf(o->listen_address);
      out["worker_dns"] = o->worker_dns;
      out["worker_addresses"] = o->worker_addresses;
    } else if (role == "worker") {
      const dhsa::WorkerOptions o = dhsa::WorkerOptionsFromServiceConfig(*config);
      // Null when the file leaves the address to the binary's default: deployments set it.
      out["listen_port"] =
          o.listen_address.empty() ? nlohmann::json() : nlohmann::json(PortOf(o.listen_address));
      out["backend"] = o.backend.empty() ? "cpu" : o.backend;
      out["capacity_bytes"] = o.capacity_bytes;
    } else {
      return Fail("role must be router or worker");
    }
  } else {
    return Fail("usage: deploy_facts code | families | config router|worker FILE.json");
  }
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}
