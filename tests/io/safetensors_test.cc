#include "kernels/io/safetensors.h"

#include <dirent.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/io/npy.h"

namespace dhsa {
namespace {

using ::testing::HasSubstr;

// A fresh empty directory under the test temp dir, removed with its contents at scope exit.
class ScopedTempDir {
 public:
  ScopedTempDir() : path_(absl::StrCat(::testing::TempDir(), "/dhsa_st_XXXXXX")) {
    EXPECT_NE(::mkdtemp(path_.data()), nullptr) << std::strerror(errno);
  }
  ~ScopedTempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n != "." && n != "..") out.push_back(n);
  }
  ::closedir(d);
  return out;
}

bool NumpyAvailable() {
  return std::system("/usr/bin/python3 -c 'import numpy' >/dev/null 2>&1") == 0;
}

Tensor RandomTensor(DType dtype, std::vector<int64_t> shape, std::mt19937* rng) {
  Tensor f32 = Tensor::Zeros(DType::kF32, shape);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  for (int64_t i = 0; i < f32.NumElements(); ++i) {
    StoreFromFloat(f32.data(), DType::kF32, static_cast<size_t>(i), dist(*rng));
  }
  return dtype == DType::kF32 ? f32 : f32.ConvertTo(dtype);
}

// 8-byte little-endian length + header + data.
std::string MakeSt(absl::string_view header, absl::string_view data) {
  std::string out;
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  absl::StrAppend(&out, header, data);
  return out;
}

uint64_t HeaderLen(absl::string_view bytes) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  return n;
}

std::string FloatBytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4);
}

TEST(SafetensorsTest, RoundTripsRandomF32F16BF16) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  SafetensorsFile f;
  f.metadata = {{"format", "pt"}, {"note", "odd shapes \"quoted\" \xc3\xa9"}};
  const std::vector<std::vector<int64_t>> shapes = {{3, 97, 64}, {1}, {0, 5}, {}, {5, 1, 3}};
  const std::vector<std::pair<DType, std::string>> dtypes = {
      {DType::kF32, "f32"}, {DType::kF16, "f16"}, {DType::kBF16, "bf16"}};
  for (const auto& [dtype, dname] : dtypes) {
    for (size_t i = 0; i < shapes.size(); ++i) {
      f.tensors[absl::StrCat(dname, ".t", i)] = RandomTensor(dtype, shapes[i], &rng);
    }
  }
  absl::StatusOr<std::string> bytes = SerializeSafetensors(f);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  ASSERT_GE(bytes->size(), 8u);
  const uint64_t n = HeaderLen(*bytes);
  EXPECT_EQ(n % 8, 0u);
  ASSERT_LE(8 + n, bytes->size());
  absl::StatusOr<SafetensorsFile> back = ParseSafetensors(*bytes, "mem.safetensors");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->metadata, f.metadata);
  ASSERT_EQ(back->tensors.size(), f.tensors.size());
  for (const auto& [name, t] : f.tensors) {
    SCOPED_TRACE(name);
    auto it = back->tensors.find(name);
    ASSERT_NE(it, back->tensors.end());
    EXPECT_EQ(it->second.dtype, t.dtype);
    EXPECT_EQ(it->second.shape, t.shape);
    EXPECT_EQ(it->second.bytes, t.bytes);
  }
  // Data laid out in name order, contiguously.
  std::string expected_data;
  for (const auto& [name, t] : f.tensors) {
    expected_data.append(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
  }
  EXPECT_TRUE(bytes->substr(8 + n) == expected_data);
}

TEST(SafetensorsTest, EmptyFileRoundTrips) {
  absl::StatusOr<std::string> bytes = SerializeSafetensors({});
  ASSERT_TRUE(bytes.ok());
  absl::StatusOr<SafetensorsFile> back = ParseSafetensors(*bytes, "e.safetensors");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(back->tensors.empty());
  EXPECT_TRUE(back->metadata.empty());
}

TEST(SafetensorsTest, ParsesHandMadeFile) {
  // Entries out of name order, data not in name order, padded header, metadata.
  const std::vector<float> a = {1, 2, 3, 4, 5, 6};
  const uint16_t h[3] = {FloatToHalf(0.5f), FloatToHalf(-1.0f), FloatToHalf(2.0f)};
  const uint16_t bf[2] = {FloatToBFloat16(3.0f), FloatToBFloat16(-0.125f)};
  std::string data = std::string(reinterpret_cast<const char*>(h), 6) + FloatBytes(a) +
                     std::string(reinterpret_cast<const char*>(bf), 4);
  const std::string header =
      "{\"z\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[0,6]},"
      " \"a\": {\"shape\": [2, 3], \"dtype\": \"F32\", \"data_offsets\": [6, 30]},"
      " \"__metadata__\": {\"k\": \"v\"},"
      " \"m\": {\"dtype\": \"BF16\", \"shape\": [1, 2], \"data_offsets\": [30, 34]},"
      " \"empty\": {\"dtype\": \"F32\", \"shape\": [0, 4], \"data_offsets\": [34, 34]}}     ";
  absl::StatusOr<SafetensorsFile> f = ParseSafetensors(MakeSt(header, data), "hand.safetensors");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->metadata.at("k"), "v");
  ASSERT_EQ(f->tensors.size(), 4u);
  EXPECT_EQ(f->tensors.at("a").ToFloats(), a);
  EXPECT_EQ(f->tensors.at("a").shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(f->tensors.at("z").dtype, DType::kF16);
  EXPECT_EQ(f->tensors.at("z").ToFloats(), (std::vector<float>{0.5f, -1.0f, 2.0f}));
  EXPECT_EQ(f->tensors.at("m").dtype, DType::kBF16);
  EXPECT_EQ(f->tensors.at("m").ToFloats(), (std::vector<float>{3.0f, -0.125f}));
  EXPECT_EQ(f->tensors.at("empty").NumElements(), 0);
}

TEST(SafetensorsTest, ConvertsFloat64ToFloat32) {
  const std::vector<double> d = {1.5, -2.25, 1e-3, 1e300};
  const std::string data(reinterpret_cast<const char*>(d.data()), 32);
  absl::StatusOr<SafetensorsFile> f = ParseSafetensors(
      MakeSt(R"({"x": {"dtype": "F64", "shape": [2, 2], "data_offsets": [0, 32]}})", data),
      "d.safetensors");
  ASSERT_TRUE(f.ok()) << f.status();
  const Tensor& x = f->tensors.at("x");
  EXPECT_EQ(x.dtype, DType::kF32);
  EXPECT_EQ(x.bytes.size(), 16u);
  EXPECT_EQ(x.Get(0), 1.5f);
  EXPECT_EQ(x.Get(1), -2.25f);
  EXPECT_EQ(x.Get(2), 1e-3f);
  EXPECT_TRUE(std::isinf(x.Get(3)));
}

struct BadSt {
  std::string what;
  std::string bytes;
  std::string message;
};

std::vector<BadSt> BadStCases() {
  const std::string d24 = FloatBytes({1, 2, 3, 4, 5, 6});
  const auto one = [&](absl::string_view dtype, absl::string_view shape, absl::string_view offs) {
    return MakeSt(absl::StrCat(R"({"t": {"dtype": ")", dtype, R"(", "shape": )", shape,
                               R"(, "data_offsets": )", offs, "}}"),
                  d24);
  };
  std::string past_end = MakeSt(R"({})", "");
  past_end[0] = '\x40';
  std::string huge_len = MakeSt(R"({})", "");
  for (int i = 0; i < 8; ++i) huge_len[i] = '\xff';
  return {
      {"empty", "", "not a .safetensors file"},
      {"seven bytes", std::string(7, '\0'), "not a .safetensors file"},
      {"header length past end", past_end, "runs past the end"},
      {"header length 2^64-1", huge_len, "runs past the end"},
      {"zero-length header", MakeSt("", d24), "not valid JSON"},
      {"bad JSON", MakeSt(R"({"t": {"dtype": "F32",)", d24), "not valid JSON"},
      {"invalid UTF-8 in JSON", MakeSt("{\"\xff\": 1}", d24), "not valid JSON"},
      {"JSON array", MakeSt(R"([1, 2])", d24), "must be a JSON object"},
      {"entry not object", MakeSt(R"({"t": 3})", d24), "must be an object"},
      {"unknown dtype", one("I32", "[6]", "[0, 24]"), "tensor 't' has unsupported dtype 'I32'"},
      {"missing dtype", MakeSt(R"({"t": {"shape": [6], "data_offsets": [0, 24]}})", d24), "dtype"},
      {"missing shape", MakeSt(R"({"t": {"dtype": "F32", "data_offsets": [0, 24]}})", d24),
       "shape"},
      {"negative dim", one("F32", "[-6]", "[0, 24]"), "non-negative integer, got -6"},
      {"fractional dim", one("F32", "[6.0]", "[0, 24]"), "non-negative integer"},
      {"huge dims overflow", one("F32", "[4294967296, 4294967296, 0]", "[0, 0]"), "too large"},
      {"dim beyond int64", one("F32", "[18446744073709551615]", "[0, 24]"), "too large"},
      {"offsets out of range", one("F32", "[7]", "[0, 28]"), "not a range inside"},
      {"offsets reversed", one("F32", "[0]", "[24, 0]"), "not a range inside"},
      {"offsets huge", one("F32", "[1]", "[18446744073709551612, 18446744073709551616]"),
       "data_offsets[1]"},
      {"offsets wrong arity", one("F32", "[6]", "[0, 24, 24]"), "data_offsets"},
      {"offsets size mismatch", one("F32", "[5]", "[0, 24]"), "span 24 bytes"},
      {"overlapping tensors",
       MakeSt(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                  "b": {"dtype": "F32", "shape": [3], "data_offsets": [12, 24]}})",
              d24),
       "overlap"},
      {"identical ranges",
       MakeSt(R"({"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
                  "b": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}})",
              d24),
       "overlap"},
      {"metadata not object", MakeSt(R"({"__metadata__": "x"})", ""), "__metadata__"},
      {"metadata value not string", MakeSt(R"({"__metadata__": {"k": 1}})", ""), "__metadata__"},
  };
}

TEST(SafetensorsTest, RejectsMalformedInputsWithInvalidArgument) {
  const std::vector<BadSt> cases = BadStCases();
  ASSERT_GE(cases.size(), 12u);
  for (const BadSt& c : cases) {
    SCOPED_TRACE(c.what);
    absl::StatusOr<SafetensorsFile> f = ParseSafetensors(c.bytes, "bad.safetensors");
    ASSERT_FALSE(f.ok());
    EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument) << f.status();
    EXPECT_THAT(f.status().message(), HasSubstr("bad.safetensors"));
    EXPECT_THAT(f.status().message(), HasSubstr(c.message));
  }
}

TEST(SafetensorsTest, SurvivesTruncationAndCorruption) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  SafetensorsFile f;
  f.tensors["a"] = RandomTensor(DType::kF32, {2, 3}, &rng);
  f.tensors["b"] = RandomTensor(DType::kBF16, {4}, &rng);
  f.metadata["m"] = "v";
  absl::StatusOr<std::string> good = SerializeSafetensors(f);
  ASSERT_TRUE(good.ok());
  for (size_t n = 0; n < good->size(); ++n) {
    absl::StatusOr<SafetensorsFile> t =
        ParseSafetensors(absl::string_view(*good).substr(0, n), "cut.safetensors");
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << n;
  }
  std::uniform_int_distribution<size_t> pos(0, good->size() - 1);
  std::uniform_int_distribution<int> byte(0, 255);
  for (int i = 0; i < 5000; ++i) {
    std::string b = *good;
    for (int k = 0; k < 2; ++k) b[pos(rng)] = static_cast<char>(byte(rng));
    absl::StatusOr<SafetensorsFile> t = ParseSafetensors(b, "flip.safetensors");
    if (!t.ok()) {
      EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
    }
  }
}

TEST(SafetensorsTest, SerializeRejectsBadInput) {
  SafetensorsFile f;
  f.tensors["x"] = Tensor::Zeros(DType::kF32, {3});
  f.tensors["x"].bytes.resize(5);
  EXPECT_EQ(SerializeSafetensors(f).status().code(), absl::StatusCode::kInvalidArgument);

  SafetensorsFile g;
  g.tensors["__metadata__"] = Tensor::Zeros(DType::kF32, {1});
  EXPECT_EQ(SerializeSafetensors(g).status().code(), absl::StatusCode::kInvalidArgument);

  SafetensorsFile h;
  h.tensors["bad\xff"] = Tensor::Zeros(DType::kF32, {1});
  absl::StatusOr<std::string> s = SerializeSafetensors(h);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.status().message(), HasSubstr("UTF-8"));
}

TEST(SafetensorsTest, FileRoundTripAndReadTensorFile) {
  ScopedTempDir tmp;
  const std::string& dir = tmp.path();
  std::mt19937 rng(std::random_device{}());
  SafetensorsFile f;
  f.tensors["q"] = RandomTensor(DType::kBF16, {2, 5, 3}, &rng);
  f.tensors["k"] = RandomTensor(DType::kF16, {2, 7, 3}, &rng);
  const std::string path = dir + "/qk.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, f).ok());
  EXPECT_EQ(ListDir(dir), std::vector<std::string>{"qk.safetensors"});

  absl::StatusOr<SafetensorsFile> back = ReadSafetensors(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->tensors.at("q").bytes, f.tensors.at("q").bytes);

  absl::StatusOr<Tensor> k = ReadTensorFile(path, "k");
  ASSERT_TRUE(k.ok()) << k.status();
  EXPECT_EQ(k->dtype, DType::kF16);
  EXPECT_EQ(k->bytes, f.tensors.at("k").bytes);

  absl::StatusOr<Tensor> missing = ReadTensorFile(path, "v");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("'k', 'q'"));

  const std::string npy = dir + "/v.npy";
  ASSERT_TRUE(WriteNpy(npy, f.tensors.at("k")).ok());
  absl::StatusOr<Tensor> v = ReadTensorFile(npy, "ignored");
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->bytes, f.tensors.at("k").bytes);

  SafetensorsFile single;
  single.tensors["only"] = Tensor::FromFloats({2}, {1.0f, 2.0f});
  ASSERT_TRUE(WriteSafetensors(dir + "/one.safetensors", single).ok());
  absl::StatusOr<Tensor> only = ReadTensorFile(dir + "/one.safetensors", "");
  ASSERT_TRUE(only.ok()) << only.status();
  EXPECT_EQ(only->ToFloats(), (std::vector<float>{1.0f, 2.0f}));

  EXPECT_EQ(ReadTensorFile(dir + "/x.bin", "q").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadTensorFile(dir + "/nope.safetensors", "q").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_FALSE(WriteSafetensors(dir + "/no/dir/x.safetensors", f).ok());
}

// numpy has no safetensors reader, so the scripts below implement the format in a few lines of
// json + numpy (the same layout the reference safetensors library uses).
TEST(SafetensorsNumpyTest, ReadsWhatPythonWrote) {
  if (!NumpyAvailable()) GTEST_SKIP() << "numpy is not importable by /usr/bin/python3";
  ScopedTempDir tmp;
  const std::string& dir = tmp.path();
  const std::string script = dir + "/w.py";
  std::ofstream(script)
      << "import json, struct, sys, numpy as np\n"
         "a = (np.arange(3 * 4 * 5, dtype=np.float64).reshape(3, 4, 5) * 0.25 - 7)\n"
         "ts = {'a32': a.astype('<f4'), 'b16': a.astype('<f2'), 'c64': a,\n"
         "      'd16': (a.astype('<f4').view('<u4') >> 16).astype('<u2')}\n"
         "dt = {'a32': 'F32', 'b16': 'F16', 'c64': 'F64', 'd16': 'BF16'}\n"
         "h, data = {'__metadata__': {'src': 'numpy'}}, b''\n"
         "for k in sorted(ts):\n"
         "    b = ts[k].tobytes()\n"
         "    h[k] = {'dtype': dt[k], 'shape': list(a.shape),\n"
         "            'data_offsets': [len(data), len(data) + len(b)]}\n"
         "    data += b\n"
         "hs = json.dumps(h).encode()\n"
         "hs += b' ' * (-len(hs) % 8)\n"
         "open(sys.argv[1], 'wb').write(struct.pack('<Q', len(hs)) + hs + data)\n";
  const std::string path = dir + "/py.safetensors";
  ASSERT_EQ(std::system(absl::StrCat("/usr/bin/python3 ", script, " ", path).c_str()), 0);
  absl::StatusOr<SafetensorsFile> f = ReadSafetensors(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->metadata.at("src"), "numpy");
  for (const char* name : {"a32", "b16", "c64", "d16"}) {
    SCOPED_TRACE(name);
    const Tensor& t = f->tensors.at(name);
    EXPECT_EQ(t.shape, (std::vector<int64_t>{3, 4, 5}));
    for (int64_t i = 0; i < 60; ++i) EXPECT_EQ(t.Get(i), static_cast<float>(i) * 0.25f - 7);
  }
  EXPECT_EQ(f->tensors.at("b16").dtype, DType::kF16);
  EXPECT_EQ(f->tensors.at("d16").dtype, DType::kBF16);
  EXPECT_EQ(f->tensors.at("c64").dtype, DType::kF32);
}

TEST(SafetensorsNumpyTest, PythonReadsWhatWeWrote) {
  if (!NumpyAvailable()) GTEST_SKIP() << "numpy is not importable by /usr/bin/python3";
  ScopedTempDir tmp;
  const std::string& dir = tmp.path();
  std::vector<float> v(2 * 3 * 9);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i) * 0.5f - 9;
  const Tensor f32 = Tensor::FromFloats({2, 3, 9}, v);
  SafetensorsFile f;
  f.tensors["x32"] = f32;
  f.tensors["x16"] = f32.ConvertTo(DType::kF16);
  f.tensors["xbf"] = f32.ConvertTo(DType::kBF16);
  f.tensors["e"] = Tensor::Zeros(DType::kF32, {0, 5});
  f.metadata["who"] = "dhsa";
  const std::string path = dir + "/ours.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, f).ok());
  const std::string script = dir + "/r.py";
  std::ofstream(script)
      << "import json, struct, sys, numpy as np\n"
         "raw = open(sys.argv[1], 'rb').read()\n"
         "(n,) = struct.unpack('<Q', raw[:8]); assert n % 8 == 0\n"
         "h = json.loads(raw[8:8 + n]); data = raw[8 + n:]\n"
         "assert h['__metadata__'] == {'who': 'dhsa'}\n"
         "want = np.arange(54, dtype=np.float64).reshape(2, 3, 9) * 0.5 - 9\n"
         "def get(k, dt):\n"
         "    b, e = h[k]['data_offsets']\n"
         "    return np.frombuffer(data[b:e], dtype=dt).reshape(h[k]['shape'])\n"
         "assert h['x32']['dtype'] == 'F32' and (get('x32', '<f4') == want).all()\n"
         "assert h['x16']['dtype'] == 'F16' and (get('x16', '<f2') == want).all()\n"
         "bf = (get('xbf', '<u2').astype('<u4') << 16).view('<f4')\n"
         "assert h['xbf']['dtype'] == 'BF16' and (bf == want).all()\n"
         "assert h['e']['shape'] == [0, 5] and get('e', '<f4').shape == (0, 5)\n"
         "ends = sorted((v['data_offsets'] for k, v in h.items() if k != '__metadata__'))\n"
         "assert ends[-1][1] == len(data)\n";
  EXPECT_EQ(std::system(absl::StrCat("/usr/bin/python3 ", script, " ", path).c_str()), 0);
}

}  // namespace
}  // namespace dhsa
