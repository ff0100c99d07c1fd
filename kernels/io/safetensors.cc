#include "kernels/io/safetensors.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"
#include "kernels/io/file.h"
#include "kernels/io/npy.h"
#include "nlohmann/json.hpp"

namespace dhsa {
namespace {

using json = nlohmann::json;

constexpr size_t kMaxDims = 64;
constexpr absl::string_view kMetadataKey = "__metadata__";
constexpr absl::string_view kAccepted = "accepted: F32, F16, BF16, F64 (read as float32)";

// Returns prod(shape) * itemsize as bytes, checking dims are non-negative and nothing overflows
// int64 (even the product of the nonzero dims, so later code can multiply in any order).
absl::StatusOr<uint64_t> CheckedByteSize(const std::vector<int64_t>& shape, size_t itemsize) {
  uint64_t product = itemsize;
  bool has_zero = false;
  for (int64_t d : shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("negative dimension ", d, " in shape ", ShapeString(shape)));
    }
    if (d == 0) {
      has_zero = true;
      continue;
    }
    if (__builtin_mul_overflow(product, static_cast<uint64_t>(d), &product) ||
        product > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return absl::InvalidArgumentError(
          absl::StrCat("shape ", ShapeString(shape), " is too large (its size overflows)"));
    }
  }
  return has_zero ? 0 : product;
}

absl::string_view SafetensorsDType(DType d) {
  switch (d) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
  }
  return "?";
}

// A name from the file, safe to print.
std::string Quoted(absl::string_view s) {
  constexpr size_t kMax = 100;
  std::string out = absl::StrCat("'", absl::CHexEscape(s.substr(0, kMax)));
  absl::StrAppend(&out, s.size() > kMax ? "...'" : "'");
  return out;
}

// A non-negative JSON integer, or an error naming `what`.
absl::StatusOr<uint64_t> GetUnsigned(const json& v, absl::string_view what) {
  if (!v.is_number_unsigned()) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " must be a non-negative integer, got ",
        v.is_number_integer() ? absl::StrCat(v.get<int64_t>()) : std::string(v.type_name())));
  }
  return v.get<uint64_t>();
}

struct Entry {
  std::string name;
  size_t itemsize = 0;
  bool from_f64 = false;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;
  uint64_t end = 0;
};

// Validates one tensor entry of the header (the data section holds `data_size` bytes).
absl::StatusOr<Entry> ParseEntry(const std::string& name, const json& info, uint64_t data_size) {
  const std::string where = absl::StrCat("tensor ", Quoted(name));
  if (!info.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": header entry must be an object, got ", info.type_name()));
  }
  Entry e;
  e.name = name;

  const auto dt = info.find("dtype");
  if (dt == info.end() || !dt->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": missing or non-string \"dtype\""));
  }
  const std::string& dtype = dt->get_ref<const std::string&>();
  if (dtype == "F32") {
    e.dtype = DType::kF32;
    e.itemsize = 4;
  } else if (dtype == "F16") {
    e.dtype = DType::kF16;
    e.itemsize = 2;
  } else if (dtype == "BF16") {
    e.dtype = DType::kBF16;
    e.itemsize = 2;
  } else if (dtype == "F64") {
    e.dtype = DType::kF32;
    e.itemsize = 8;
    e.from_f64 = true;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(where, " has unsupported dtype ", Quoted(dtype), "; ", kAccepted));
  }

  const auto sh = info.find("shape");
  if (sh == info.end() || !sh->is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": missing \"shape\" (an array of non-negative integers)"));
  }
  if (sh->size() > kMaxDims) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": shape has ", sh->size(), " dimensions; at most ", kMaxDims));
  }
  for (const json& d : *sh) {
    absl::StatusOr<uint64_t> v = GetUnsigned(d, absl::StrCat(where, ": each shape entry"));
    if (!v.ok()) return v.status();
    if (*v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": dimension ", *v, " is too large"));
    }
    e.shape.push_back(static_cast<int64_t>(*v));
  }

  const auto off = info.find("data_offsets");
  if (off == info.end() || !off->is_array() || off->size() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": \"data_offsets\" must be an array [begin, end]"));
  }
  DHSA_ASSIGN_OR_RETURN(e.begin, GetUnsigned((*off)[0], absl::StrCat(where, ": data_offsets[0]")));
  DHSA_ASSIGN_OR_RETURN(e.end, GetUnsigned((*off)[1], absl::StrCat(where, ": data_offsets[1]")));
  if (e.begin > e.end || e.end > data_size) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": data_offsets [", e.begin, ", ", e.end,
                                                   ") is not a range inside the data section of ",
                                                   data_size, " bytes"));
  }

  absl::StatusOr<uint64_t> need = CheckedByteSize(e.shape, e.itemsize);
  if (!need.ok())
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", need.status().message()));
  if (e.end - e.begin != *need) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": data_offsets span ", e.end - e.begin,
                                                   " bytes but shape ", ShapeString(e.shape),
                                                   " of ", dtype, " needs ", *need));
  }
  return e;
}

absl::StatusOr<SafetensorsFile> ParseImpl(absl::string_view bytes, absl::string_view name) {
  if (bytes.size() < 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": not a .safetensors file (", bytes.size(),
                     " bytes; it must start with an 8-byte header length)"));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(bytes[i]);
  if (header_len > bytes.size() - 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": .safetensors header length ", header_len, " runs past the end of the file (",
        bytes.size() - 8, " bytes follow the length field); is this a .safetensors file?"));
  }
  const absl::string_view header = bytes.substr(8, header_len);
  const absl::string_view data = bytes.substr(8 + header_len);

  json j;
  try {
    j = json::parse(header.begin(), header.end());
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": .safetensors header is not valid JSON: ", e.what()));
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": .safetensors header must be a JSON object, got ", j.type_name()));
  }

  SafetensorsFile out;
  std::vector<Entry> entries;
  for (const auto& [key, value] : j.items()) {
    if (key == kMetadataKey) {
      if (!value.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(
            name, ": \"__metadata__\" must be an object of strings, got ", value.type_name()));
      }
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string()) {
          return absl::InvalidArgumentError(absl::StrCat(name, ": \"__metadata__\" value for ",
                                                         Quoted(mk), " must be a string, got ",
                                                         mv.type_name()));
        }
        out.metadata.emplace(mk, mv.get<std::string>());
      }
      continue;
    }
    absl::StatusOr<Entry> e = ParseEntry(key, value, data.size());
    if (!e.ok()) return absl::InvalidArgumentError(absl::StrCat(name, ": ", e.status().message()));
    entries.push_back(*std::move(e));
  }

  // No two non-empty tensors may share bytes.
  std::vector<const Entry*> order;
  for (const Entry& e : entries) {
    if (e.end > e.begin) order.push_back(&e);
  }
  std::sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  for (size_t i = 1; i < order.size(); ++i) {
    if (order[i]->begin < order[i - 1]->end) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": tensors ", Quoted(order[i - 1]->name), " [", order[i - 1]->begin,
                       ", ", order[i - 1]->end, ") and ", Quoted(order[i]->name), " [",
                       order[i]->begin, ", ", order[i]->end, ") overlap in the data section"));
    }
  }

  // Everything is validated; the copies below total at most data.size() bytes.
  for (Entry& e : entries) {
    const absl::string_view src = data.substr(e.begin, e.end - e.begin);
    Tensor t;
    t.dtype = e.dtype;
    t.shape = std::move(e.shape);
    if (e.from_f64) {
      const size_t n = src.size() / 8;
      t.bytes.resize(n * 4);
      for (size_t i = 0; i < n; ++i) {
        double v;
        std::memcpy(&v, src.data() + 8 * i, 8);
        const float f = static_cast<float>(v);
        std::memcpy(t.bytes.data() + 4 * i, &f, 4);
      }
    } else {
      t.bytes.assign(reinterpret_cast<const uint8_t*>(src.data()),
                     reinterpret_cast<const uint8_t*>(src.data()) + src.size());
    }
    out.tensors.emplace(std::move(e.name), std::move(t));
  }
  return out;
}

absl::StatusOr<std::string> SerializeImpl(const SafetensorsFile& f) {
  json header = json::object();
  if (!f.metadata.empty()) {
    json meta = json::object();
    for (const auto& [k, v] : f.metadata) meta[k] = v;
    header[std::string(kMetadataKey)] = std::move(meta);
  }
  uint64_t offset = 0;
  for (const auto& [name, t] : f.tensors) {
    if (name == kMetadataKey) {
      return absl::InvalidArgumentError(
          "cannot write .safetensors: a tensor may not be named \"__metadata__\"");
    }
    if (t.shape.size() > kMaxDims) {
      return absl::InvalidArgumentError(absl::StrCat("cannot write .safetensors: tensor ",
                                                     Quoted(name), " has ", t.shape.size(),
                                                     " dimensions (at most ", kMaxDims, ")"));
    }
    absl::StatusOr<uint64_t> need = CheckedByteSize(t.shape, DTypeSize(t.dtype));
    if (!need.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("cannot write .safetensors: tensor ",
                                                     Quoted(name), ": ", need.status().message()));
    }
    if (t.bytes.size() != *need) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cannot write .safetensors: tensor ", Quoted(name), " holds ", t.bytes.size(),
          " bytes but shape ", ShapeString(t.shape), " of ", DTypeName(t.dtype), " needs ", *need));
    }
    json info = json::object();
    info["dtype"] = std::string(SafetensorsDType(t.dtype));
    info["shape"] = t.shape;
    info["data_offsets"] = json::array({offset, offset + *need});
    header[name] = std::move(info);
    offset += *need;
  }

  std::string text;
  try {
    text = header.dump();
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot write .safetensors: a tensor name or metadata string is not valid UTF-8 (",
        e.what(), ")"));
  }
  text.append((8 - text.size() % 8) % 8, ' ');

  std::string out;
  out.reserve(8 + text.size() + offset);
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out += text;
  for (const auto& [name, t] : f.tensors) {
    out.append(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
  }
  return out;
}

}  // namespace

absl::StatusOr<SafetensorsFile> ParseSafetensors(absl::string_view bytes, absl::string_view name) {
  try {
    return ParseImpl(bytes, name);
  } catch (const std::exception& e) {  // Defensive: nothing above should throw.
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": malformed .safetensors file: ", e.what()));
  }
}

absl::StatusOr<std::string> SerializeSafetensors(const SafetensorsFile& f) {
  try {
    return SerializeImpl(f);
  } catch (const std::exception& e) {  // Defensive: nothing above should throw.
    return absl::InvalidArgumentError(absl::StrCat("cannot write .safetensors: ", e.what()));
  }
}

absl::StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path) {
  DHSA_ASSIGN_OR_RETURN(const std::string bytes, ReadFileToString(path));
  return ParseSafetensors(bytes, path);
}

absl::Status WriteSafetensors(const std::string& path, const SafetensorsFile& f) {
  absl::StatusOr<std::string> bytes = SerializeSafetensors(f);
  if (!bytes.ok()) {
    return absl::Status(bytes.status().code(), absl::StrCat(path, ": ", bytes.status().message()));
  }
  return WriteFileAtomically(path, *bytes);
}

absl::StatusOr<Tensor> ReadTensorFile(const std::string& path, absl::string_view tensor_name) {
  if (absl::EndsWithIgnoreCase(path, ".npy")) return ReadNpy(path);
  if (!absl::EndsWithIgnoreCase(path, ".safetensors")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot load '", path, "': unknown tensor file extension; use .npy or .safetensors"));
  }
  DHSA_ASSIGN_OR_RETURN(SafetensorsFile f, ReadSafetensors(path));
  if (tensor_name.empty() && f.tensors.size() == 1) return std::move(f.tensors.begin()->second);
  auto it = f.tensors.find(std::string(tensor_name));
  if (it != f.tensors.end()) return std::move(it->second);
  std::string names;
  size_t listed = 0;
  for (const auto& [n, t] : f.tensors) {
    if (listed == 20) {
      absl::StrAppend(&names, ", ... (", f.tensors.size(), " in all)");
      break;
    }
    absl::StrAppend(&names, listed == 0 ? "" : ", ", Quoted(n));
    ++listed;
  }
  return absl::NotFoundError(absl::StrCat(path, " has no tensor named ", Quoted(tensor_name),
                                          "; it holds: ", names.empty() ? "(none)" : names));
}

}  // namespace dhsa
