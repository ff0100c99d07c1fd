// Streaming a block of rows of a [heads, len, dim] tensor as TensorPieces without copying it
// first: the pieces are cut from the source as they are sent (an async writer pulls them one at a
// time).
#ifndef DHSA_SERVICES_ROUTER_PIECES_H_
#define DHSA_SERVICES_ROUTER_PIECES_H_

#include <cstdint>
#include <memory>
#include <string>

#include "dhsa/v1/tensor.pb.h"
#include "kernels/common/tensor.h"

namespace dhsa::router {

// The tensor rows [row_begin, row_end) of `source` [heads, len, dim] (or [heads, len]), i.e.
// [heads, row_end - row_begin, dim], as pieces named `name` of at most `piece_bytes` data bytes.
class PieceStream {
 public:
  PieceStream(std::shared_ptr<const Tensor> source, int64_t row_begin, int64_t row_end,
              std::string name, int64_t piece_bytes);

  // Fills the next piece; false once every byte has been handed out.
  bool Next(v1::TensorPiece* piece);
  int64_t total_bytes() const { return total_; }

 private:
  std::shared_ptr<const Tensor> source_;
  int64_t row_begin_;
  int64_t rows_;
  std::string name_;
  int64_t piece_bytes_;
  int64_t row_bytes_ = 0;  // Bytes of one row (dim elements).
  int64_t total_ = 0;
  int64_t offset_ = 0;
  bool started_ = false;
};

}  // namespace dhsa::router

#endif  // DHSA_SERVICES_ROUTER_PIECES_H_
