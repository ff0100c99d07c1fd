// tinylm (../shared/data/tinylm/README.md): a byte-level decoder-only transformer trained on Python
// source, run in C++ with every layer's attention handed to a callback (our DHSA library in
// process, or the service), so that sparse attention is judged by the model's own loss.
//
// Architecture (README there): emb[byte] -> per layer: h = rms(x, n1); q = rope(wq h);
// k = rope(wk h); v = wv h; x += wo(attn(q, k, v)); h = rms(x, n2); x += w2(silu(w1 h) * w3 h)
// -> logits = head(rms(x, nf)). RMSNorm eps = float32 machine epsilon; rotary "halves" layout on
// the whole head dim; query head g uses KV head g / (n_head / n_kv_head).
#ifndef DHSA_BENCH_LM_TINYLM_H_
#define DHSA_BENCH_LM_TINYLM_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/common/tensor.h"

namespace dhsa {

struct TinyLmConfig {
  int64_t vocab = 256;
  int64_t n_layer = 4;
  int64_t d_model = 384;
  int64_t n_head = 6;
  int64_t n_kv_head = 2;
  int64_t head_dim = 64;
  int64_t d_ff = 1024;
  double rope_base = 10000.0;
};

// Weights as float32, row-major [out, in] for every Linear (y = x W^T).
struct TinyLmLayer {
  std::vector<float> n1, n2;          // [d_model]
  std::vector<float> wq, wk, wv, wo;  // [n_head*hd | n_kv_head*hd, d_model], wo [d_model, d]
  std::vector<float> w1, w3;          // [d_ff, d_model]
  std::vector<float> w2;              // [d_model, d_ff]
};

struct TinyLm {
  TinyLmConfig config;
  std::vector<float> emb;   // [vocab, d_model]
  std::vector<float> head;  // [vocab, d_model]
  std::vector<float> nf;    // [d_model]
  std::vector<TinyLmLayer> layers;
};

// Reads the model from a .safetensors file (kernels/io): the config from the `config` entry of
// its metadata, the tensors by name with their shapes checked. Errors name what is wrong.
absl::StatusOr<TinyLm> LoadTinyLm(const std::string& path);

// One layer's attention: q [n_head, L, hd], k and v [n_kv_head, L, hd] float32, after rotary, all
// positions 0..L-1 (causal); returns o [n_head, L, hd] float32.
using LayerAttention = std::function<absl::StatusOr<Tensor>(int64_t layer, const Tensor& q,
                                                            const Tensor& k, const Tensor& v)>;

// Called with each layer's q, k, v (after rotary) before its attention runs; may be empty.
using LayerTap =
    std::function<absl::Status(int64_t layer, const Tensor& q, const Tensor& k, const Tensor& v)>;

struct ForwardTimes {
  double attention = 0;  // Seconds in the attention callback.
  double other = 0;      // Everything else (matmuls, norms, rotary).
};

// Logits [L, vocab] (row t predicts byte t + 1) of `bytes`. Matmuls run on oneDNN's sgemm over
// `num_threads` threads.
absl::StatusOr<std::vector<float>> TinyLmForward(const TinyLm& model,
                                                 const std::vector<uint8_t>& bytes,
                                                 const LayerAttention& attention, int num_threads,
                                                 const LayerTap& tap = {},
                                                 ForwardTimes* times = nullptr);

// Bits per byte of bytes[t] for t in [first, L), each predicted by logits row t - 1 (first >= 1):
// the mean of -log2 softmax(logits[t - 1])[bytes[t]], computed in double.
double BitsPerByte(const std::vector<float>& logits, int64_t vocab,
                   const std::vector<uint8_t>& bytes, int64_t first);

}  // namespace dhsa

#endif  // DHSA_BENCH_LM_TINYLM_H_
