#include "services/common/wire.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

namespace dhsa {
namespace {

using ::testing::HasSubstr;

// A tensor of `shape` and `dtype` filled with random bytes.
Tensor RandomTensor(DType dtype, std::vector<int64_t> shape, std::mt19937_64& rng) {
  Tensor t = Tensor::Zeros(dtype, std::move(shape));
  for (uint8_t& b : t.bytes) b = static_cast<uint8_t>(rng());
  return t;
}

std::vector<v1::TensorPiece> Pieces(const Tensor& t, const std::string& name, int64_t piece_bytes) {
  std::vector<v1::TensorPiece> pieces;
  const absl::Status s = SendTensorPieces(t, name, piece_bytes, [&](v1::TensorPiece&& p) {
    pieces.push_back(std::move(p));
    return true;
  });
  EXPECT_TRUE(s.ok()) << s;
  return pieces;
}

class WireTest : public ::testing::Test {
 protected:
  WireTest() : seed_(std::random_device{}()), rng_(seed_) {}
  void SetUp() override { RecordProperty("seed", std::to_string(seed_)); }
  std::string Seed() const { return "seed " + std::to_string(seed_); }

  const uint64_t seed_;
  std::mt19937_64 rng_;
};

TEST(DTypeWire, RoundTripsAndRejectsUnspecified) {
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16}) {
    absl::StatusOr<DType> back = FromProtoDType(ToProtoDType(d));
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, d);
  }
  EXPECT_EQ(FromProtoDType(v1::DTYPE_UNSPECIFIED).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(FromProtoDType(static_cast<v1::DType>(42)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(WireTest, WholeTensorRoundTrip) {
  SCOPED_TRACE(Seed());
  const Tensor t = RandomTensor(DType::kBF16, {3, 7, 5}, rng_);
  v1::Tensor proto;
  TensorToProto(t, &proto);
  absl::StatusOr<Tensor> back = TensorFromProto(proto, "k");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->dtype, t.dtype);
  EXPECT_EQ(back->shape, t.shape);
  EXPECT_EQ(back->bytes, t.bytes);
}

TEST(TensorFromProto, RejectsBadShapesAndSizesNamingTheTensor) {
  v1::Tensor proto;
  proto.set_dtype(v1::DTYPE_FLOAT16);
  proto.add_shape(2);
  proto.add_shape(3);
  proto.set_data(std::string(11, '\0'));
  absl::Status s = TensorFromProto(proto, "v").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("'v'"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("12"));

  proto.set_shape(1, -3);
  EXPECT_EQ(TensorFromProto(proto, "v").status().code(), absl::StatusCode::kInvalidArgument);

  proto.set_shape(1, 3);
  proto.set_dtype(v1::DTYPE_UNSPECIFIED);
  s = TensorFromProto(proto, "v").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("'v'"));
}

TEST_F(WireTest, PiecesRoundTripOddSizes) {
  SCOPED_TRACE(Seed());
  struct Case {
    DType dtype;
    std::vector<int64_t> shape;
    int64_t piece_bytes;
  };
  const std::vector<Case> cases = {{DType::kF32, {1, 1, 1}, 1},
                                   {DType::kF16, {3, 5, 7}, 1},
                                   {DType::kBF16, {2, 97, 13}, 7},
                                   {DType::kF32, {5, 33, 3}, 7},
                                   {DType::kF16, {3, 1025, 129}, 7},
                                   {DType::kF32, {3, 1025, 769}, int64_t{4} << 20},
                                   {DType::kF32, {1, 3, 5}, int64_t{4} << 20}};
  for (const Case& c : cases) {
    const Tensor t = RandomTensor(c.dtype, c.shape, rng_);
    SCOPED_TRACE(ShapeString(c.shape) + " in pieces of " + std::to_string(c.piece_bytes));
    const std::vector<v1::TensorPiece> pieces = Pieces(t, "q", c.piece_bytes);
    const int64_t total = static_cast<int64_t>(t.bytes.size());
    EXPECT_EQ(static_cast<int64_t>(pieces.size()), (total + c.piece_bytes - 1) / c.piece_bytes);
    // Reserving the whole tensor up front, and growing from little or nothing as pieces arrive
    // (a tensor larger than the reservation cap).
    for (int64_t reserve : {TensorAssembler::kDefaultMaxReserveBytes, int64_t{1000}, int64_t{0}}) {
      SCOPED_TRACE("reserving at most " + std::to_string(reserve));
      TensorAssembler assembler("q", total, reserve);
      for (size_t i = 0; i < pieces.size(); ++i) {
        EXPECT_LE(static_cast<int64_t>(pieces[i].data().size()), c.piece_bytes);
        EXPECT_FALSE(assembler.complete());
        const absl::Status s = assembler.Add(pieces[i]);
        ASSERT_TRUE(s.ok()) << s;
      }
      EXPECT_TRUE(assembler.complete());
      absl::StatusOr<Tensor> back = assembler.Take();
      ASSERT_TRUE(back.ok()) << back.status();
      EXPECT_EQ(back->dtype, t.dtype);
      EXPECT_EQ(back->shape, t.shape);
      EXPECT_TRUE(back->bytes == t.bytes);
    }
  }
}

TEST(TensorPieces, ZeroByteTensorIsOnePieceWithShape) {
  const Tensor t = Tensor::Zeros(DType::kF16, {4, 0, 8});
  const std::vector<v1::TensorPiece> pieces = Pieces(t, "o", 16);
  ASSERT_EQ(pieces.size(), 1u);
  EXPECT_EQ(pieces[0].dtype(), v1::DTYPE_FLOAT16);
  EXPECT_EQ(pieces[0].shape_size(), 3);
  EXPECT_TRUE(pieces[0].data().empty());
  TensorAssembler assembler("o", 0);
  ASSERT_TRUE(assembler.Add(pieces[0]).ok());
  EXPECT_TRUE(assembler.complete());
  absl::StatusOr<Tensor> back = assembler.Take();
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->shape, t.shape);
}

TEST(TensorPieces, ClosedStreamIsUnavailable) {
  const Tensor t = Tensor::Zeros(DType::kF32, {10});
  int sent = 0;
  const absl::Status s = SendTensorPieces(t, "o", 8, [&](v1::TensorPiece&&) { return ++sent < 2; });
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(sent, 2);
  EXPECT_EQ(SendTensorPieces(t, "o", 0, [](v1::TensorPiece&&) { return true; }).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(TensorPieces, PieceSizeLeavesRoomUnderTheMessageLimit) {
  EXPECT_LT(PieceBytesForMessageLimit(64 << 10), 64 << 10);
  EXPECT_GT(PieceBytesForMessageLimit(64 << 10), 60 << 10);
  EXPECT_EQ(PieceBytesForMessageLimit(10), 1);
}

class AssemblerRejects : public WireTest {
 protected:
  void SetUp() override {
    WireTest::SetUp();
    tensor_ = RandomTensor(DType::kF32, {2, 3, 5}, rng_);  // 120 bytes.
    pieces_ = Pieces(tensor_, "k", 50);                    // 50 + 50 + 20.
    ASSERT_EQ(pieces_.size(), 3u);
  }
  static std::string Message(const absl::Status& s) { return std::string(s.message()); }

  Tensor tensor_;
  std::vector<v1::TensorPiece> pieces_;
};

TEST_F(AssemblerRejects, WrongName) {
  TensorAssembler a("v", 1000);
  const absl::Status s = a.Add(pieces_[0]);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(s), HasSubstr("'v'"));
  EXPECT_THAT(Message(s), HasSubstr("'k'"));
}

TEST_F(AssemblerRejects, FirstPieceWithoutDtypeOrAtNonZeroOffset) {
  TensorAssembler a("k", 1000);
  EXPECT_EQ(a.Add(pieces_[1]).code(), absl::StatusCode::kInvalidArgument);
  v1::TensorPiece no_dtype = pieces_[0];
  no_dtype.clear_dtype();
  EXPECT_EQ(a.Add(no_dtype).code(), absl::StatusCode::kInvalidArgument);
  v1::TensorPiece negative = pieces_[0];
  negative.set_shape(0, -2);
  EXPECT_EQ(a.Add(negative).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(AssemblerRejects, Gap) {
  TensorAssembler a("k", 1000);
  ASSERT_TRUE(a.Add(pieces_[0]).ok());
  const absl::Status s = a.Add(pieces_[2]);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(s), HasSubstr("offset 100"));
  EXPECT_THAT(Message(s), HasSubstr("byte 50"));
}

TEST_F(AssemblerRejects, DataPastTheDeclaredSize) {
  TensorAssembler a("k", 1000);
  ASSERT_TRUE(a.Add(pieces_[0]).ok());
  ASSERT_TRUE(a.Add(pieces_[1]).ok());
  v1::TensorPiece longer = pieces_[2];
  longer.mutable_data()->append("x");
  const absl::Status s = a.Add(longer);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(s), HasSubstr("120"));
  ASSERT_TRUE(a.Add(pieces_[2]).ok());
  EXPECT_EQ(a.Add(pieces_[2]).code(), absl::StatusCode::kInvalidArgument);  // Already complete.
}

TEST_F(AssemblerRejects, DeclaredSizeOverTheLimitBeforeAllocating) {
  TensorAssembler a("k", 119);
  const absl::Status s = a.Add(pieces_[0]);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(Message(s), HasSubstr("120"));
  EXPECT_THAT(Message(s), HasSubstr("119"));
  // A declared size far beyond memory is refused the same way (nothing is allocated).
  v1::TensorPiece huge = pieces_[0];
  huge.set_shape(0, int64_t{1} << 40);
  EXPECT_EQ(TensorAssembler("k", 1 << 20).Add(huge).code(), absl::StatusCode::kResourceExhausted);
  huge.set_shape(1, int64_t{1} << 40);
  EXPECT_EQ(TensorAssembler("k", 1 << 20).Add(huge).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(AssemblerRejects, Truncated) {
  TensorAssembler a("k", 1000);
  EXPECT_THAT(Message(a.Take().status()), HasSubstr("before any piece of tensor 'k'"));
  ASSERT_TRUE(a.Add(pieces_[0]).ok());
  ASSERT_TRUE(a.Add(pieces_[1]).ok());
  const absl::Status s = a.Take().status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(s), HasSubstr("stream ended after 100 of 120 bytes of tensor 'k'"));
}

}  // namespace
}  // namespace dhsa
