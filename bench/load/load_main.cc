// dhsa_load: the bounded load test. Against a running router (--target), or, without it, an
// embedded router + workers started here on loopback.
//   dhsa_load [--target HOST:PORT] [--workers 2] [--concurrency 8] [--seconds 10]
//             [--prefill 512] [--decode 16] [--capacity-bytes N] [--max-inflight N]
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "bench/load/load.h"
#include "services/router/embedded.h"

int main(int argc, char** argv) {
  dhsa::load::LoadOptions o;
  o.config.budget = 256;
  o.config.sink = 16;
  o.config.local = 128;
  o.config.q_block = 64;
  int workers = 2, max_inflight = 64;
  int64_t capacity = int64_t{256} << 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--target")
      o.target = value;
    else if (flag == "--workers")
      workers = std::atoi(value.c_str());
    else if (flag == "--concurrency")
      o.concurrency = std::atoi(value.c_str());
    else if (flag == "--seconds")
      o.seconds = std::atof(value.c_str());
    else if (flag == "--prefill")
      o.prefill_tokens = std::atoll(value.c_str());
    else if (flag == "--decode")
      o.decode_steps = std::atoi(value.c_str());
    else if (flag == "--capacity-bytes")
      capacity = std::atoll(value.c_str());
    else if (flag == "--max-inflight")
      max_inflight = std::atoi(value.c_str());
    else {
      std::fprintf(stderr, "dhsa_load: unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  if (argc % 2 == 0) {
    std::fprintf(stderr, "dhsa_load: every flag takes a value\n");
    return 2;
  }
  std::unique_ptr<dhsa::EmbeddedService> service;
  if (o.target.empty()) {
    dhsa::EmbeddedOptions e;
    e.num_workers = workers;
    e.stripe_tokens = 256;
    e.threads = 2;
    e.capacity_bytes_per_worker = capacity;
    e.max_inflight = max_inflight;
    absl::StatusOr<std::unique_ptr<dhsa::EmbeddedService>> started =
        dhsa::EmbeddedService::Start(e);
    if (!started.ok()) {
      std::fprintf(stderr, "dhsa_load: %s\n", started.status().ToString().c_str());
      return 3;
    }
    service = *std::move(started);
    o.target = service->router_address();
  }
  o.client.timeout = std::chrono::seconds(60);
  const dhsa::load::LoadReport report = dhsa::load::RunLoad(o);
  std::fputs(dhsa::load::FormatReport(o, report).c_str(), stdout);
  return report.wrong == 0 ? 0 : 1;
}
