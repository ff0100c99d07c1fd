#include "services/router/pieces.h"

#include <algorithm>
#include <utility>

#include "services/common/wire.h"

namespace dhsa::router {

PieceStream::PieceStream(std::shared_ptr<const Tensor> source, int64_t row_begin, int64_t row_end,
                         std::string name, int64_t piece_bytes)
    : source_(std::move(source)),
      row_begin_(row_begin),
      rows_(row_end - row_begin),
      name_(std::move(name)),
      piece_bytes_(std::max<int64_t>(1, piece_bytes)) {
  const int64_t dim = source_->shape.size() > 2 ? source_->shape[2] : 1;
  row_bytes_ = dim * static_cast<int64_t>(DTypeSize(source_->dtype));
  total_ = source_->shape[0] * rows_ * row_bytes_;
}

bool PieceStream::Next(v1::TensorPiece* piece) {
  if (started_ && offset_ >= total_) return false;
  piece->Clear();
  piece->set_name(name_);
  if (!started_) {
    piece->set_dtype(ToProtoDType(source_->dtype));
    piece->add_shape(source_->shape[0]);
    piece->add_shape(rows_);
    if (source_->shape.size() > 2) piece->add_shape(source_->shape[2]);
    started_ = true;
  }
  piece->set_offset(offset_);
  const int64_t n = std::min(piece_bytes_, total_ - offset_);
  std::string* data = piece->mutable_data();
  data->resize(static_cast<size_t>(n));
  // Byte `offset` of the slice is in head offset / head_bytes at byte offset % head_bytes; each
  // head's rows are contiguous in the source.
  const int64_t head_bytes = rows_ * row_bytes_;
  const int64_t len = source_->shape[1];
  const uint8_t* src = source_->bytes.data();
  int64_t done = 0;
  while (done < n) {
    const int64_t at = offset_ + done;
    const int64_t head = at / head_bytes, within = at % head_bytes;
    const int64_t run = std::min(n - done, head_bytes - within);
    std::copy_n(src + head * len * row_bytes_ + row_begin_ * row_bytes_ + within, run,
                data->data() + done);
    done += run;
  }
  offset_ += n;
  return true;
}

}  // namespace dhsa::router
