#include "kernels/io/npy.h"

#include <dirent.h>
#include <sys/stat.h>
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

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/io/file.h"

namespace dhsa {
namespace {

using ::testing::HasSubstr;

// A fresh empty directory under the test temp dir, removed with its contents at scope exit.
class ScopedTempDir {
 public:
  ScopedTempDir() : path_(absl::StrCat(::testing::TempDir(), "/dhsa_npy_XXXXXX")) {
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

// Random tensor of `dtype` and `shape`, from a fresh seed (logged on failure).
Tensor RandomTensor(DType dtype, std::vector<int64_t> shape, std::mt19937* rng) {
  Tensor f32 = Tensor::Zeros(DType::kF32, shape);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  for (int64_t i = 0; i < f32.NumElements(); ++i) {
    StoreFromFloat(f32.data(), DType::kF32, static_cast<size_t>(i), dist(*rng));
  }
  return dtype == DType::kF32 ? f32 : f32.ConvertTo(dtype);
}

// A .npy file with the given version, header text (padded so the data is 16-aligned, then '\n')
// and raw data.
std::string MakeNpy(int major, absl::string_view dict, absl::string_view data, bool pad = true) {
  const size_t prefix = major == 1 ? 10 : 12;
  std::string header(dict);
  if (pad) {
    while ((prefix + header.size() + 1) % 16 != 0) header.push_back(' ');
    header.push_back('\n');
  }
  std::string out = "\x93NUMPY";
  out.push_back(static_cast<char>(major));
  out.push_back('\0');
  for (size_t i = 0; i < prefix - 8; ++i) {
    out.push_back(static_cast<char>((header.size() >> (8 * i)) & 0xff));
  }
  absl::StrAppend(&out, header, data);
  return out;
}

std::string FloatBytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4);
}

TEST(NpyTest, RoundTripsRandomF32AndF16) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  const std::vector<std::vector<int64_t>> shapes = {{3, 97, 64}, {1}, {0, 5}, {}, {7, 1, 13, 2}};
  for (DType dtype : {DType::kF32, DType::kF16}) {
    for (const auto& shape : shapes) {
      SCOPED_TRACE(absl::StrCat(DTypeName(dtype), " ", ShapeString(shape)));
      const Tensor t = RandomTensor(dtype, shape, &rng);
      absl::StatusOr<std::string> bytes = SerializeNpy(t);
      ASSERT_TRUE(bytes.ok()) << bytes.status();
      // v1.0 header, data 64-byte aligned, header ends in '\n'.
      ASSERT_GE(bytes->size(), 10u);
      EXPECT_EQ(bytes->substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
      const size_t hlen = static_cast<uint8_t>((*bytes)[8]) | static_cast<uint8_t>((*bytes)[9])
                                                                  << 8;
      EXPECT_EQ((10 + hlen) % 64, 0u);
      EXPECT_EQ((*bytes)[10 + hlen - 1], '\n');
      EXPECT_THAT(bytes->substr(10, hlen),
                  HasSubstr(dtype == DType::kF32 ? "'descr': '<f4'" : "'descr': '<f2'"));
      absl::StatusOr<Tensor> back = ParseNpy(*bytes, "mem.npy");
      ASSERT_TRUE(back.ok()) << back.status();
      EXPECT_EQ(back->dtype, dtype);
      EXPECT_EQ(back->shape, shape);
      EXPECT_EQ(back->bytes, t.bytes);
    }
  }
}

TEST(NpyTest, ShapeTextMatchesNumpy) {
  absl::StatusOr<std::string> a = SerializeNpy(Tensor::Zeros(DType::kF32, {3}));
  absl::StatusOr<std::string> b = SerializeNpy(Tensor::Zeros(DType::kF32, {}));
  absl::StatusOr<std::string> c = SerializeNpy(Tensor::Zeros(DType::kF16, {2, 3}));
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_THAT(*a, HasSubstr("'shape': (3,)"));
  EXPECT_THAT(*b, HasSubstr("'shape': ()"));
  EXPECT_THAT(*c, HasSubstr("'shape': (2, 3)"));
  EXPECT_THAT(*a, HasSubstr("'fortran_order': False"));
}

TEST(NpyTest, FileRoundTrip) {
  ScopedTempDir tmp;
  const std::string& dir = tmp.path();
  std::mt19937 rng(std::random_device{}());
  const Tensor t = RandomTensor(DType::kF16, {5, 3}, &rng);
  const std::string path = dir + "/x.npy";
  ASSERT_TRUE(WriteNpy(path, t).ok());
  absl::StatusOr<Tensor> back = ReadNpy(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->bytes, t.bytes);
  EXPECT_EQ(back->shape, t.shape);
  EXPECT_EQ(ListDir(dir), std::vector<std::string>{"x.npy"});
}

TEST(NpyTest, RejectsBFloat16OnWrite) {
  const Tensor t = Tensor::Zeros(DType::kBF16, {2});
  absl::StatusOr<std::string> bytes = SerializeNpy(t);
  ASSERT_EQ(bytes.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bytes.status().message(), HasSubstr("npy has no bfloat16; use .safetensors"));
  ScopedTempDir tmp;
  const std::string& dir = tmp.path();
  EXPECT_EQ(WriteNpy(dir + "/b.npy", t).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(ListDir(dir).empty());
}

TEST(NpyTest, RejectsInconsistentTensorOnWrite) {
  Tensor t = Tensor::Zeros(DType::kF32, {2, 3});
  t.bytes.pop_back();
  EXPECT_EQ(SerializeNpy(t).status().code(), absl::StatusCode::kInvalidArgument);
  Tensor neg;
  neg.shape = {-1};
  EXPECT_EQ(SerializeNpy(neg).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(NpyTest, ParsesHandMadeV1Header) {
  const std::vector<float> v = {1, 2, 3, 4, 5, 6};
  // Keys in another order, double quotes, no trailing comma, odd spacing.
  const std::string bytes =
      MakeNpy(1, "{\"shape\":(2,3) ,'fortran_order' : False,'descr':'<f4'}", FloatBytes(v));
  absl::StatusOr<Tensor> t = ParseNpy(bytes, "hand.npy");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->dtype, DType::kF32);
  EXPECT_EQ(t->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(t->ToFloats(), v);
}

TEST(NpyTest, ParsesV2AndV3Headers) {
  const std::vector<float> v = {0.5f, -1.5f, 2.0f};
  for (int major : {2, 3}) {
    const std::string bytes =
        MakeNpy(major, "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", FloatBytes(v));
    absl::StatusOr<Tensor> t = ParseNpy(bytes, "v.npy");
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->shape, std::vector<int64_t>{3});
    EXPECT_EQ(t->ToFloats(), v);
  }
}

TEST(NpyTest, ParsesScalarNativeOrderAndPython2Longs) {
  const std::vector<float> one = {7.25f};
  absl::StatusOr<Tensor> s = ParseNpy(
      MakeNpy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (), }", FloatBytes(one)),
      "s.npy");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_TRUE(s->shape.empty());
  EXPECT_EQ(s->Get(0), 7.25f);

  absl::StatusOr<Tensor> native = ParseNpy(
      MakeNpy(1, "{'descr': '=f4', 'fortran_order': False, 'shape': (1L,), }", FloatBytes(one)),
      "n.npy");
  ASSERT_TRUE(native.ok()) << native.status();
  EXPECT_EQ(native->Get(0), 7.25f);
}

TEST(NpyTest, ParsesFloat16) {
  const uint16_t h[2] = {FloatToHalf(1.5f), FloatToHalf(-0.25f)};
  absl::StatusOr<Tensor> t =
      ParseNpy(MakeNpy(1, "{'descr': '<f2', 'fortran_order': False, 'shape': (2,), }",
                       std::string(reinterpret_cast<const char*>(h), 4)),
               "h.npy");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->dtype, DType::kF16);
  EXPECT_EQ(t->ToFloats(), (std::vector<float>{1.5f, -0.25f}));
}

TEST(NpyTest, ConvertsFloat64ToFloat32) {
  const std::vector<double> d = {1.5, -2.25, 1e300, 0.1};
  const std::string data(reinterpret_cast<const char*>(d.data()), d.size() * 8);
  absl::StatusOr<Tensor> t = ParseNpy(
      MakeNpy(1, "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 2), }", data), "d.npy");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->dtype, DType::kF32);
  EXPECT_EQ(t->shape, (std::vector<int64_t>{2, 2}));
  const std::vector<float> f = t->ToFloats();
  EXPECT_EQ(f[0], 1.5f);
  EXPECT_EQ(f[1], -2.25f);
  EXPECT_TRUE(std::isinf(f[2]));
  EXPECT_EQ(f[3], 0.1f);
}

struct BadNpy {
  std::string what;
  std::string bytes;
  std::string message;  // Expected substring of the error.
};

std::vector<BadNpy> BadNpyCases() {
  const std::string f6 = FloatBytes({1, 2, 3, 4, 5, 6});
  const auto dict = [](absl::string_view descr, absl::string_view fortran,
                       absl::string_view shape) {
    return absl::StrCat("{'descr': '", descr, "', 'fortran_order': ", fortran, ", 'shape': ", shape,
                        ", }");
  };
  std::string long_len = MakeNpy(1, dict("<f4", "False", "(2, 3)"), f6);
  long_len[8] = '\xff';
  long_len[9] = '\x7f';
  std::string v2_huge = MakeNpy(2, dict("<f4", "False", "(2, 3)"), f6);
  v2_huge[8] = v2_huge[9] = v2_huge[10] = v2_huge[11] = '\xff';
  std::string bad_version = MakeNpy(1, dict("<f4", "False", "(2, 3)"), f6);
  bad_version[6] = '\x04';
  std::string bad_minor = MakeNpy(1, dict("<f4", "False", "(2, 3)"), f6);
  bad_minor[7] = '\x01';
  std::string deep = "{'descr': '<f4', 'fortran_order': False, 'shape': ";
  deep += std::string(200, '(') + std::string(200, ')') + "}";
  return {
      {"empty", "", "not a .npy file"},
      {"truncated magic", "\x93NUM", "not a .npy file"},
      {"wrong magic", "PK\x03\x04\x00\x00\x00\x00\x00\x00\x00\x00", "not a .npy file"},
      {"no header length", std::string("\x93NUMPY\x01\x00\x10", 9), "truncated"},
      {"header length past end", long_len, "runs past the end"},
      {"v2 header length past end", v2_huge, "runs past the end"},
      {"version 4.0", bad_version, "version 4.0"},
      {"version 1.1", bad_minor, "version 1.1"},
      {"not a dict", MakeNpy(1, "['descr', '<f4']", f6), "bad .npy header"},
      {"unterminated string", MakeNpy(1, "{'descr: '<f4'}", f6), "bad .npy header"},
      {"unterminated dict", MakeNpy(1, "{'descr': '<f4', 'fortran_order': False", f6, false),
       "bad .npy header"},
      {"garbage after dict", MakeNpy(1, dict("<f4", "False", "(2, 3)") + " x", f6),
       "unexpected text"},
      {"missing shape", MakeNpy(1, "{'descr': '<f4', 'fortran_order': False}", f6), "missing key"},
      {"extra key",
       MakeNpy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (6,), 'x': 1}", f6),
       "unexpected key"},
      {"duplicate key",
       MakeNpy(1, "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (6,)}", f6),
       "duplicate key"},
      {"fortran order", MakeNpy(1, dict("<f4", "True", "(2, 3)"), f6), "fortran_order is True"},
      {"fortran order not bool", MakeNpy(1, dict("<f4", "0", "(2, 3)"), f6), "fortran_order"},
      {"big-endian", MakeNpy(1, dict(">f4", "False", "(2, 3)"), f6), "big-endian dtype '>f4'"},
      {"int dtype", MakeNpy(1, dict("<i4", "False", "(2, 3)"), f6), "unsupported dtype '<i4'"},
      {"object dtype", MakeNpy(1, dict("|O", "False", "(2, 3)"), f6), "unsupported dtype '|O'"},
      {"byte-order-free f2", MakeNpy(1, dict("|f2", "False", "(12,)"), f6),
       "unsupported dtype '|f2'"},
      {"structured dtype",
       MakeNpy(1, "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (6,)}", f6),
       "structured"},
      {"too few bytes", MakeNpy(1, dict("<f4", "False", "(2, 4)"), f6),
       "data is 24 bytes but shape [2, 4] of '<f4' needs exactly 32 bytes"},
      {"trailing bytes", MakeNpy(1, dict("<f4", "False", "(5,)"), f6),
       "data is 24 bytes but shape [5] of '<f4' needs exactly 20 bytes"},
      {"negative dim", MakeNpy(1, dict("<f4", "False", "(-2, -3)"), f6), "negative dimension"},
      {"huge dims overflow", MakeNpy(1, dict("<f4", "False", "(4294967296, 4294967296, 0)"), ""),
       "too large"},
      {"dim beyond int64", MakeNpy(1, dict("<f4", "False", "(99999999999999999999,)"), f6),
       "integer too large"},
      {"shape not a tuple", MakeNpy(1, dict("<f4", "False", "(6)"), f6), "'shape' must be a tuple"},
      {"shape entry not int", MakeNpy(1, dict("<f4", "False", "(2, 'x')"), f6), "integers"},
      {"nested too deep", MakeNpy(1, deep, f6), "nested too deeply"},
  };
}

TEST(NpyTest, RejectsMalformedInputsWithInvalidArgument) {
  const std::vector<BadNpy> cases = BadNpyCases();
  ASSERT_GE(cases.size(), 12u);
  for (const BadNpy& c : cases) {
    SCOPED_TRACE(c.what);
    absl::StatusOr<Tensor> t = ParseNpy(c.bytes, "bad.npy");
    ASSERT_FALSE(t.ok());
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
    EXPECT_THAT(t.status().message(), HasSubstr("bad.npy"));
    EXPECT_THAT(t.status().message(), HasSubstr(c.message));
    EXPECT_EQ(std::string(t.status().message()).find('\n'), std::string::npos)
        << "error should be one line: " << t.status();
  }
}

// Truncations and byte flips of a valid file must give OK or InvalidArgument, nothing else (run
// under ASan/UBSan this also checks bounds).
TEST(NpyTest, SurvivesTruncationAndCorruption) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  absl::StatusOr<std::string> good = SerializeNpy(RandomTensor(DType::kF32, {3, 5}, &rng));
  ASSERT_TRUE(good.ok());
  for (size_t n = 0; n < good->size(); ++n) {
    absl::StatusOr<Tensor> t = ParseNpy(absl::string_view(*good).substr(0, n), "cut.npy");
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << n;
  }
  std::uniform_int_distribution<size_t> pos(0, good->size() - 1);
  std::uniform_int_distribution<int> byte(0, 255);
  for (int i = 0; i < 5000; ++i) {
    std::string b = *good;
    for (int k = 0; k < 3; ++k) b[pos(rng)] = static_cast<char>(byte(rng));
    absl::StatusOr<Tensor> t = ParseNpy(b, "flip.npy");
    if (!t.ok()) {
      EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
    } else {
      EXPECT_EQ(t->bytes.size(), static_cast<size_t>(t->NumElements()) * DTypeSize(t->dtype));
    }
  }
}

TEST(FileTest, WriteFileAtomicallyLeavesOnlyTheCompleteTarget) {
  ScopedTempDir tmp;
  const std::string& dir = tmp.path();
  const std::string path = dir + "/out.bin";
  std::string big(3 << 20, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 31 + 7);
  ASSERT_TRUE(WriteFileAtomically(path, big).ok());
  EXPECT_EQ(ListDir(dir), std::vector<std::string>{"out.bin"});
  absl::StatusOr<std::string> back = ReadFileToString(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(*back == big);

  // Overwrite with shorter contents: the old file is replaced whole.
  ASSERT_TRUE(WriteFileAtomically(path, "short").ok());
  EXPECT_EQ(*ReadFileToString(path), "short");
  EXPECT_EQ(ListDir(dir), std::vector<std::string>{"out.bin"});

  ASSERT_TRUE(WriteFileAtomically(path, "").ok());
  EXPECT_EQ(*ReadFileToString(path), "");
  EXPECT_EQ(ListDir(dir), std::vector<std::string>{"out.bin"});
}

TEST(FileTest, WriteToMissingDirectoryFailsCleanly) {
  ScopedTempDir tmp;
  const std::string& dir = tmp.path();
  const std::string path = dir + "/no/such/dir/out.npy";
  absl::Status s = WriteFileAtomically(path, "data");
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_THAT(s.message(), HasSubstr(path));
  EXPECT_TRUE(ListDir(dir).empty());
  EXPECT_FALSE(WriteNpy(path, Tensor::Zeros(DType::kF32, {1})).ok());
  EXPECT_EQ(WriteFileAtomically(dir + "/", "x").code(), absl::StatusCode::kInvalidArgument);
}

TEST(FileTest, ReadErrorsNameThePath) {
  ScopedTempDir tmp;
  const std::string& dir = tmp.path();
  const std::string missing = dir + "/missing.npy";
  absl::StatusOr<std::string> r = ReadFileToString(missing);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr(missing));
  EXPECT_THAT(r.status().message(), HasSubstr("No such file"));
  EXPECT_EQ(ReadNpy(missing).status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(ReadFileToString(dir).ok());
}

TEST(NpyNumpyTest, ReadsWhatNumpyWrote) {
  if (!NumpyAvailable()) GTEST_SKIP() << "numpy is not importable by /usr/bin/python3";
  ScopedTempDir tmp;
  const std::string& dir = tmp.path();
  const std::string script = dir + "/w.py";
  std::ofstream(script)
      << "import numpy as np, sys\n"
         "d = sys.argv[1]\n"
         "a = np.arange(2 * 3 * 5, dtype=np.float64).reshape(2, 3, 5) * 0.25 - 3\n"
         "np.save(d + '/f4.npy', a.astype(np.float32))\n"
         "np.save(d + '/f2.npy', a.astype(np.float16))\n"
         "np.save(d + '/f8.npy', a)\n"
         "np.save(d + '/s.npy', np.float32(2.5))\n"
         "np.save(d + '/e.npy', np.zeros((0, 7), np.float32))\n"
         "np.save(d + '/ft.npy', np.asfortranarray(a.astype(np.float32)))\n"
         "np.save(d + '/be.npy', a.astype('>f4'))\n";
  ASSERT_EQ(std::system(absl::StrCat("/usr/bin/python3 ", script, " ", dir).c_str()), 0);
  for (const char* name : {"f4.npy", "f2.npy", "f8.npy"}) {
    SCOPED_TRACE(name);
    absl::StatusOr<Tensor> t = ReadNpy(dir + "/" + name);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->dtype, std::string(name) == "f2.npy" ? DType::kF16 : DType::kF32);
    EXPECT_EQ(t->shape, (std::vector<int64_t>{2, 3, 5}));
    for (int64_t i = 0; i < 30; ++i) EXPECT_EQ(t->Get(i), static_cast<float>(i) * 0.25f - 3);
  }
  absl::StatusOr<Tensor> s = ReadNpy(dir + "/s.npy");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_TRUE(s->shape.empty());
  EXPECT_EQ(s->Get(0), 2.5f);
  absl::StatusOr<Tensor> e = ReadNpy(dir + "/e.npy");
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->shape, (std::vector<int64_t>{0, 7}));
  EXPECT_EQ(ReadNpy(dir + "/ft.npy").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadNpy(dir + "/be.npy").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(NpyNumpyTest, NumpyReadsWhatWeWrote) {
  if (!NumpyAvailable()) GTEST_SKIP() << "numpy is not importable by /usr/bin/python3";
  ScopedTempDir tmp;
  const std::string& dir = tmp.path();
  std::vector<float> v(4 * 3 * 7);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i) * 0.125f - 5;
  const Tensor f32 = Tensor::FromFloats({4, 3, 7}, v);
  ASSERT_TRUE(WriteNpy(dir + "/f4.npy", f32).ok());
  ASSERT_TRUE(WriteNpy(dir + "/f2.npy", f32.ConvertTo(DType::kF16)).ok());
  ASSERT_TRUE(WriteNpy(dir + "/one.npy", Tensor::FromFloats({1}, {9.5f})).ok());
  ASSERT_TRUE(WriteNpy(dir + "/s.npy", Tensor::FromFloats({}, {-1.0f})).ok());
  ASSERT_TRUE(WriteNpy(dir + "/e.npy", Tensor::Zeros(DType::kF32, {0, 5})).ok());
  const std::string script = dir + "/r.py";
  std::ofstream(script)
      << "import numpy as np, sys\n"
         "d = sys.argv[1]\n"
         "want = np.arange(4 * 3 * 7, dtype=np.float64).reshape(4, 3, 7) * 0.125 - 5\n"
         "a = np.load(d + '/f4.npy'); assert a.dtype == np.float32 and a.shape == (4, 3, 7)\n"
         "assert (a == want).all()\n"
         "b = np.load(d + '/f2.npy'); assert b.dtype == np.float16 and b.shape == (4, 3, 7)\n"
         "assert (b == want.astype(np.float16)).all()\n"
         "o = np.load(d + '/one.npy'); assert o.shape == (1,) and o[0] == 9.5\n"
         "s = np.load(d + '/s.npy'); assert s.shape == () and s == -1.0\n"
         "e = np.load(d + '/e.npy'); assert e.shape == (0, 5) and e.dtype == np.float32\n";
  EXPECT_EQ(std::system(absl::StrCat("/usr/bin/python3 ", script, " ", dir).c_str()), 0);
}

}  // namespace
}  // namespace dhsa
