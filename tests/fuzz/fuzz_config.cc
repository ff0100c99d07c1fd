// libFuzzer target: the ServiceConfig JSON file (LoadServiceConfigJson, what dhsa-router,
// dhsa-worker and dhsa serve read at start). Any text either loads (and then its default DHSA
// parameters are accepted or rejected with INVALID_ARGUMENT, and the config printed back as JSON
// loads to the same message) or is rejected with INVALID_ARGUMENT.
#include <google/protobuf/util/json_util.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "services/common/config.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

std::string TmpDir() {
  const char* dir = std::getenv("TMPDIR");
  return dir != nullptr && *dir != '\0' ? dir : "/tmp";
}

// The loader reads a file: each fuzz process writes its inputs to its own one.
const std::string& ScratchPath() {
  static const std::string path = absl::StrCat(TmpDir(), "/dhsa-fuzz-config-", getpid(), ".json");
  return path;
}

void Write(const std::string& text) {
  std::ofstream out(ScratchPath(), std::ios::binary | std::ios::trunc);
  out << text;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Write(std::string(reinterpret_cast<const char*>(data), size));
  absl::StatusOr<dhsa::v1::ServiceConfig> config = dhsa::LoadServiceConfigJson(ScratchPath());
  if (!config.ok()) {
    DHSA_FUZZ_CHECK(config.status().code() == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  absl::StatusOr<dhsa::DhsaConfig> params =
      dhsa::DhsaConfigFromProto(config->default_params(), dhsa::DhsaConfig{});
  if (!params.ok()) DHSA_FUZZ_CHECK(params.status().code() == absl::StatusCode::kInvalidArgument);

  std::string json;
  DHSA_FUZZ_CHECK(google::protobuf::util::MessageToJsonString(*config, &json).ok());
  Write(json);
  absl::StatusOr<dhsa::v1::ServiceConfig> back = dhsa::LoadServiceConfigJson(ScratchPath());
  DHSA_FUZZ_CHECK(back.ok());
  DHSA_FUZZ_CHECK(back->SerializeAsString() == config->SerializeAsString());
  return 0;
}
