// Selections shaped like the router's at q_block 16 (sink, local window, many short chunks) for
// the plan/pair-count tests and the host-side benchmark of the selection stage.
#ifndef DHSA_TESTS_ROUTER_SELECT_ROUTER_LIKE_H_
#define DHSA_TESTS_ROUTER_SELECT_ROUTER_LIKE_H_

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/selection/selection.h"

namespace dhsa::router {

// Entries (KV head, block) of queries [t0, lk): [0, e) when e <= budget, else the sink, the local
// window ending at e and random chunks of 4-16 keys between them until about `budget` keys.
inline Selection RouterLikeSelection(std::mt19937_64& rng, int64_t hkv, int64_t group, int64_t t0,
                                     int64_t lk, int64_t q_block, int64_t budget = 2048,
                                     int64_t sink = 128, int64_t local = 256) {
  Selection s;
  s.block_size = q_block;
  s.first_block = t0 / q_block;
  s.num_blocks = (lk - 1) / q_block - s.first_block + 1;
  s.num_heads = hkv;
  s.group = group;
  s.spans.resize(static_cast<size_t>(hkv * s.num_blocks));
  for (int64_t h = 0; h < hkv; ++h) {
    for (int64_t b = 0; b < s.num_blocks; ++b) {
      const int64_t e = std::min(lk, (s.first_block + b + 1) * q_block);
      std::vector<Span> spans;
      if (e <= budget) {
        spans.push_back({0, e});
      } else {
        spans.push_back({0, sink});
        spans.push_back({e - local, e});
        const int64_t lo = sink, hi = e - local;
        int64_t keys = sink + local;
        while (keys < budget && hi - lo > 16) {
          const int64_t len = 4 + static_cast<int64_t>(rng() % 13);
          const int64_t a = lo + static_cast<int64_t>(rng() % static_cast<uint64_t>(hi - lo - len));
          spans.push_back({a, a + len});
          keys += len;
        }
      }
      s.At(h, b) = NormaliseSpans(std::move(spans));
    }
  }
  return s;
}

}  // namespace dhsa::router

#endif  // DHSA_TESTS_ROUTER_SELECT_ROUTER_LIKE_H_
