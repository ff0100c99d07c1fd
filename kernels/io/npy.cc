#include "kernels/io/npy.h"

#include <cctype>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "kernels/common/status_macros.h"
#include "kernels/io/file.h"

namespace dhsa {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;
constexpr size_t kMaxDims = 64;  // NumPy 2's limit; also bounds the shape vector.
constexpr int kMaxNesting = 8;   // Of tuples/lists inside the header dict.
constexpr bool kLittleEndianHost = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;

constexpr absl::string_view kAccepted =
    "accepted: '<f4' (float32), '<f2' (float16), '<f8' (float64, read as float32)";

// A Python literal as it can appear in a .npy header.
struct PyValue {
  enum Kind { kStr, kBool, kNone, kInt, kTuple, kList };
  Kind kind = kNone;
  std::string str;
  bool boolean = false;
  int64_t integer = 0;
  std::vector<PyValue> items;
};

absl::string_view KindName(PyValue::Kind k) {
  switch (k) {
    case PyValue::kStr:
      return "a string";
    case PyValue::kBool:
      return "a bool";
    case PyValue::kNone:
      return "None";
    case PyValue::kInt:
      return "an integer";
    case PyValue::kTuple:
      return "a tuple";
    case PyValue::kList:
      return "a list";
  }
  return "?";
}

// Recursive-descent parser for the header dict, a Python literal such as
// "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }". Every access is bounds-checked.
class HeaderParser {
 public:
  explicit HeaderParser(absl::string_view text) : text_(text) {}

  // Parses the whole dict; fills `entries` (duplicate keys are an error).
  absl::Status ParseDict(std::vector<std::pair<std::string, PyValue>>* entries) {
    SkipSpace();
    if (!Consume('{')) return Error("expected '{' at the start of the header dict");
    for (;;) {
      SkipSpace();
      if (Consume('}')) break;
      if (entries->size() >= 16) return Error("too many keys in the header dict");
      PyValue key;
      DHSA_RETURN_IF_ERROR(ParseValue(&key, 0));
      if (key.kind != PyValue::kStr) {
        return Error(absl::StrCat("dict keys must be strings, got ", KindName(key.kind)));
      }
      SkipSpace();
      if (!Consume(':')) return Error("expected ':' after a dict key");
      PyValue value;
      DHSA_RETURN_IF_ERROR(ParseValue(&value, 0));
      for (const auto& e : *entries) {
        if (e.first == key.str) return Error(absl::StrCat("duplicate key '", key.str, "'"));
      }
      entries->emplace_back(std::move(key.str), std::move(value));
      SkipSpace();
      if (Consume(',')) continue;
      if (Consume('}')) break;
      return Error("expected ',' or '}' in the header dict");
    }
    SkipSpace();
    if (pos_ != text_.size()) return Error("unexpected text after the header dict");
    return absl::OkStatus();
  }

 private:
  absl::Status Error(absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(what, " (at offset ", pos_, ")"));
  }
  bool AtEnd() const { return pos_ >= text_.size(); }
  char Peek() const { return AtEnd() ? '\0' : text_[pos_]; }
  bool Consume(char c) {
    if (!AtEnd() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  bool ConsumeWord(absl::string_view w) {
    if (text_.substr(pos_, w.size()) != w) return false;
    const size_t end = pos_ + w.size();
    if (end < text_.size() &&
        (std::isalnum(static_cast<unsigned char>(text_[end])) || text_[end] == '_')) {
      return false;
    }
    pos_ = end;
    return true;
  }
  void SkipSpace() {
    while (!AtEnd() && (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' ||
                        text_[pos_] == '\r')) {
      ++pos_;
    }
  }

  absl::Status ParseValue(PyValue* out, int depth) {
    SkipSpace();
    if (AtEnd()) return Error("unexpected end of the header");
    const char c = Peek();
    if (c == '\'' || c == '"') return ParseString(out);
    if (c == '(' || c == '[') return ParseSequence(out, depth);
    if (c == '-' || c == '+' || (c >= '0' && c <= '9')) return ParseInt(out);
    if (ConsumeWord("True")) {
      out->kind = PyValue::kBool;
      out->boolean = true;
      return absl::OkStatus();
    }
    if (ConsumeWord("False")) {
      out->kind = PyValue::kBool;
      out->boolean = false;
      return absl::OkStatus();
    }
    if (ConsumeWord("None")) {
      out->kind = PyValue::kNone;
      return absl::OkStatus();
    }
    return Error(
        absl::StrCat("unexpected character '", absl::CHexEscape(absl::string_view(&c, 1)), "'"));
  }

  absl::Status ParseString(PyValue* out) {
    const char quote = text_[pos_++];
    out->kind = PyValue::kStr;
    for (;;) {
      if (AtEnd()) return Error("unterminated string");
      char c = text_[pos_++];
      if (c == quote) return absl::OkStatus();
      if (c == '\n') return Error("newline inside a string");
      if (c == '\\') {
        if (AtEnd()) return Error("unterminated string");
        c = text_[pos_++];
      }
      out->str.push_back(c);
    }
  }

  absl::Status ParseInt(PyValue* out) {
    bool negative = false;
    if (Consume('-')) {
      negative = true;
    } else {
      Consume('+');
    }
    SkipSpace();
    if (AtEnd() || !(Peek() >= '0' && Peek() <= '9')) return Error("expected digits");
    uint64_t v = 0;
    while (!AtEnd() && Peek() >= '0' && Peek() <= '9') {
      const uint64_t digit = static_cast<uint64_t>(text_[pos_++] - '0');
      if (v > (static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) - digit) / 10) {
        return Error("integer too large");
      }
      v = v * 10 + digit;
    }
    if (!Consume('L')) Consume('l');  // Python 2 longs, as old NumPy wrote them.
    out->kind = PyValue::kInt;
    out->integer = negative ? -static_cast<int64_t>(v) : static_cast<int64_t>(v);
    return absl::OkStatus();
  }

  absl::Status ParseSequence(PyValue* out, int depth) {
    if (depth >= kMaxNesting) return Error("tuples/lists nested too deeply");
    const char open = text_[pos_++];
    const char close = open == '(' ? ')' : ']';
    out->kind = open == '(' ? PyValue::kTuple : PyValue::kList;
    for (;;) {
      SkipSpace();
      if (Consume(close)) return absl::OkStatus();
      if (out->items.size() >= 1024) return Error("too many items in a tuple/list");
      PyValue item;
      DHSA_RETURN_IF_ERROR(ParseValue(&item, depth + 1));
      out->items.push_back(std::move(item));
      SkipSpace();
      if (Consume(',')) continue;
      if (Consume(close)) {
        // "(3)" is the integer 3 in Python, not a tuple.
        if (open == '(' && out->items.size() == 1) {
          PyValue inner = std::move(out->items[0]);
          *out = std::move(inner);
        }
        return absl::OkStatus();
      }
      return Error(absl::StrCat("expected ',' or '", std::string(1, close), "'"));
    }
  }

  absl::string_view text_;
  size_t pos_ = 0;
};

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

uint32_t LoadLE(const char* p, int n) {
  uint32_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

std::string Preview(absl::string_view header) {
  constexpr size_t kMax = 160;
  header = absl::StripTrailingAsciiWhitespace(header);
  std::string out = absl::CHexEscape(header.substr(0, kMax));
  if (header.size() > kMax) absl::StrAppend(&out, "...");
  return out;
}

absl::Status HeaderError(absl::string_view name, absl::string_view what, absl::string_view header) {
  return absl::InvalidArgumentError(
      absl::StrCat(name, ": bad .npy header: ", what, " [header: ", Preview(header), "]"));
}

}  // namespace

absl::StatusOr<Tensor> ParseNpy(absl::string_view bytes, absl::string_view name) {
  if (bytes.size() < kMagicLen + 2 || std::memcmp(bytes.data(), kMagic, kMagicLen) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": not a .npy file (", bytes.size(),
                     " bytes; a .npy file starts with \\x93NUMPY); write it with numpy.save"));
  }
  const int major = static_cast<uint8_t>(bytes[6]);
  const int minor = static_cast<uint8_t>(bytes[7]);
  size_t len_bytes;
  if (major == 1 && minor == 0) {
    len_bytes = 2;
  } else if ((major == 2 || major == 3) && minor == 0) {
    len_bytes = 4;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(name, ": unsupported .npy format version ",
                                                   major, ".", minor, "; accepted: 1.0, 2.0, 3.0"));
  }
  const size_t prefix = 8 + len_bytes;
  if (bytes.size() < prefix) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": truncated .npy file (", bytes.size(),
                                                   " bytes, header length field incomplete)"));
  }
  const uint64_t header_len = LoadLE(bytes.data() + 8, static_cast<int>(len_bytes));
  if (header_len > bytes.size() - prefix) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": .npy header length ", header_len, " runs past the end of the file (",
                     bytes.size() - prefix, " bytes follow the length field)"));
  }
  const absl::string_view header = bytes.substr(prefix, header_len);
  const absl::string_view data = bytes.substr(prefix + header_len);

  std::vector<std::pair<std::string, PyValue>> entries;
  if (absl::Status s = HeaderParser(header).ParseDict(&entries); !s.ok()) {
    return HeaderError(name, s.message(), header);
  }
  const PyValue* descr = nullptr;
  const PyValue* fortran = nullptr;
  const PyValue* shape_v = nullptr;
  for (const auto& [key, value] : entries) {
    if (key == "descr") {
      descr = &value;
    } else if (key == "fortran_order") {
      fortran = &value;
    } else if (key == "shape") {
      shape_v = &value;
    } else {
      return HeaderError(name,
                         absl::StrCat("unexpected key '", absl::CHexEscape(key),
                                      "'; expected exactly 'descr', 'fortran_order', 'shape'"),
                         header);
    }
  }
  if (descr == nullptr || fortran == nullptr || shape_v == nullptr) {
    return HeaderError(name, "missing key; expected 'descr', 'fortran_order' and 'shape'", header);
  }

  // dtype.
  if (descr->kind != PyValue::kStr) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": unsupported dtype: 'descr' is ",
                                                   KindName(descr->kind),
                                                   " (a structured or object array); ", kAccepted));
  }
  const std::string& d = descr->str;
  const bool little = d.size() == 3 && (d[0] == '<' || (d[0] == '=' && kLittleEndianHost));
  const bool big = d.size() == 3 && (d[0] == '>' || (d[0] == '=' && !kLittleEndianHost));
  const absl::string_view code = d.size() == 3 ? absl::string_view(d).substr(1) : "";
  if (big && (code == "f2" || code == "f4" || code == "f8")) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": big-endian dtype '", d,
                                                   "' is not supported; convert with arr.astype('<",
                                                   code, "') (", kAccepted, ")"));
  }
  size_t itemsize;
  if (little && code == "f4") {
    itemsize = 4;
  } else if (little && code == "f2") {
    itemsize = 2;
  } else if (little && code == "f8") {
    itemsize = 8;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": unsupported dtype '", absl::CHexEscape(d.substr(0, 32)), "'; ", kAccepted));
  }

  // Layout.
  if (fortran->kind != PyValue::kBool) {
    return HeaderError(
        name, absl::StrCat("'fortran_order' must be True or False, got ", KindName(fortran->kind)),
        header);
  }
  if (fortran->boolean) {
    return absl::InvalidArgumentError(
        absl::StrCat(name,
                     ": fortran_order is True (column-major data) but only C order is accepted; "
                     "save np.ascontiguousarray(arr)"));
  }

  // Shape.
  if (shape_v->kind != PyValue::kTuple) {
    return HeaderError(
        name, absl::StrCat("'shape' must be a tuple of integers, got ", KindName(shape_v->kind)),
        header);
  }
  if (shape_v->items.size() > kMaxDims) {
    return HeaderError(name,
                       absl::StrCat("shape has ", shape_v->items.size(), " dimensions; at most ",
                                    kMaxDims, " are accepted"),
                       header);
  }
  std::vector<int64_t> shape;
  shape.reserve(shape_v->items.size());
  for (const PyValue& item : shape_v->items) {
    if (item.kind != PyValue::kInt) {
      return HeaderError(
          name, absl::StrCat("'shape' entries must be integers, got ", KindName(item.kind)),
          header);
    }
    shape.push_back(item.integer);
  }
  absl::StatusOr<uint64_t> need = CheckedByteSize(shape, itemsize);
  if (!need.ok())
    return absl::InvalidArgumentError(absl::StrCat(name, ": ", need.status().message()));
  if (data.size() != *need) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": data is ", data.size(), " bytes but shape ", ShapeString(shape), " of '", d,
        "' needs exactly ", *need, " bytes (",
        data.size() < *need ? "file is truncated" : "trailing bytes after the data", ")"));
  }

  Tensor t;
  t.shape = std::move(shape);
  if (itemsize == 8) {
    const size_t n = data.size() / 8;
    t.dtype = DType::kF32;
    t.bytes.resize(n * 4);
    for (size_t i = 0; i < n; ++i) {
      double v;
      std::memcpy(&v, data.data() + 8 * i, 8);
      const float f = static_cast<float>(v);
      std::memcpy(t.bytes.data() + 4 * i, &f, 4);
    }
  } else {
    t.dtype = itemsize == 4 ? DType::kF32 : DType::kF16;
    t.bytes.assign(reinterpret_cast<const uint8_t*>(data.data()),
                   reinterpret_cast<const uint8_t*>(data.data()) + data.size());
  }
  return t;
}

absl::StatusOr<std::string> SerializeNpy(const Tensor& t) {
  absl::string_view descr;
  switch (t.dtype) {
    case DType::kF32:
      descr = "<f4";
      break;
    case DType::kF16:
      descr = "<f2";
      break;
    case DType::kBF16:
      return absl::InvalidArgumentError(
          "npy has no bfloat16; use .safetensors (or convert the tensor to float32)");
  }
  if (t.shape.size() > kMaxDims) {
    return absl::InvalidArgumentError(absl::StrCat("cannot write .npy: ", t.shape.size(),
                                                   " dimensions (at most ", kMaxDims, ")"));
  }
  DHSA_ASSIGN_OR_RETURN(const uint64_t need, CheckedByteSize(t.shape, DTypeSize(t.dtype)));
  if (t.bytes.size() != need) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot write .npy: tensor holds ", t.bytes.size(), " bytes but shape ",
                     ShapeString(t.shape), " of ", DTypeName(t.dtype), " needs ", need));
  }

  std::string shape = "(";
  for (size_t i = 0; i < t.shape.size(); ++i) {
    absl::StrAppend(&shape, i == 0 ? "" : ", ", t.shape[i]);
  }
  absl::StrAppend(&shape, t.shape.size() == 1 ? ",)" : ")");
  std::string dict =
      absl::StrCat("{'descr': '", descr, "', 'fortran_order': False, 'shape': ", shape, ", }");

  // Version 1.0 has a 2-byte header length; pad so the data starts 64-byte aligned.
  int version = 1;
  size_t prefix = 10;
  size_t total = (prefix + dict.size() + 1 + 63) / 64 * 64;
  if (total - prefix > 0xffff) {
    version = 2;
    prefix = 12;
    total = (prefix + dict.size() + 1 + 63) / 64 * 64;
  }
  const size_t header_len = total - prefix;
  dict.append(header_len - dict.size() - 1, ' ');
  dict.push_back('\n');

  std::string out;
  out.reserve(total + t.bytes.size());
  out.append(kMagic, kMagicLen);
  out.push_back(static_cast<char>(version));
  out.push_back('\0');
  for (size_t i = 0; i < prefix - 8; ++i) {
    out.push_back(static_cast<char>((header_len >> (8 * i)) & 0xff));
  }
  out += dict;
  out.append(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
  return out;
}

absl::StatusOr<Tensor> ReadNpy(const std::string& path) {
  DHSA_ASSIGN_OR_RETURN(const std::string bytes, ReadFileToString(path));
  return ParseNpy(bytes, path);
}

absl::Status WriteNpy(const std::string& path, const Tensor& t) {
  absl::StatusOr<std::string> bytes = SerializeNpy(t);
  if (!bytes.ok()) {
    return absl::Status(bytes.status().code(), absl::StrCat(path, ": ", bytes.status().message()));
  }
  return WriteFileAtomically(path, *bytes);
}

}  // namespace dhsa
