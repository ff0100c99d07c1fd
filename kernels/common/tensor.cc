#include "kernels/common/tensor.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace dhsa {

Tensor Tensor::Zeros(DType dtype, std::vector<int64_t> shape) {
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.bytes.assign(static_cast<size_t>(t.NumElements()) * DTypeSize(dtype), 0);
  return t;
}

Tensor Tensor::Uninitialized(DType dtype, std::vector<int64_t> shape) {
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.bytes.resize(static_cast<size_t>(t.NumElements()) * DTypeSize(dtype));
  return t;
}

Tensor Tensor::FromFloats(std::vector<int64_t> shape, const std::vector<float>& values) {
  Tensor t = Zeros(DType::kF32, std::move(shape));
  std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
  return t;
}

int64_t Tensor::NumElements() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

Tensor Tensor::ConvertTo(DType to) const {
  Tensor out = Zeros(to, shape);
  const int64_t n = NumElements();
  for (int64_t i = 0; i < n; ++i) StoreFromFloat(out.data(), to, static_cast<size_t>(i), Get(i));
  return out;
}

std::vector<float> Tensor::ToFloats() const {
  std::vector<float> out(static_cast<size_t>(NumElements()));
  for (size_t i = 0; i < out.size(); ++i) out[i] = Get(static_cast<int64_t>(i));
  return out;
}

Tensor SliceTokens(const Tensor& t, int64_t begin, int64_t end) {
  const int64_t heads = t.shape[0], len = t.shape[1], d = t.shape[2];
  const size_t row = static_cast<size_t>(d) * DTypeSize(t.dtype);
  Tensor out = Tensor::Zeros(t.dtype, {heads, end - begin, d});
  for (int64_t h = 0; h < heads; ++h) {
    std::memcpy(out.bytes.data() + static_cast<size_t>(h * (end - begin)) * row,
                t.bytes.data() + static_cast<size_t>(h * len + begin) * row,
                static_cast<size_t>(end - begin) * row);
  }
  return out;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::StatusOr<HeadsView> HeadsView::Of(const Tensor& t, absl::string_view name) {
  if (t.shape.size() != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " must be 3-D [heads, len, dim]; got shape ", ShapeString(t.shape)));
  }
  if (t.bytes.size() != static_cast<size_t>(t.NumElements()) * DTypeSize(t.dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(name, " holds ", t.bytes.size(),
                                                   " bytes but its shape and dtype need ",
                                                   t.NumElements() * DTypeSize(t.dtype)));
  }
  HeadsView v;
  v.data = t.data();
  v.dtype = t.dtype;
  v.heads = t.shape[0];
  v.len = t.shape[1];
  v.dim = t.shape[2];
  return v;
}

void HeadsView::Row(int64_t h, int64_t t, float* out) const {
  const size_t base = Index(h, t);
  if (dtype == DType::kF32) {
    std::memcpy(out, static_cast<const char*>(data) + 4 * base, 4 * static_cast<size_t>(dim));
    return;
  }
  for (int64_t c = 0; c < dim; ++c)
    out[c] = LoadAsFloat(data, dtype, base + static_cast<size_t>(c));
}

}  // namespace dhsa
