// Table-driven bad input through the public API of a real embedded service (router + 2 workers on
// loopback): every malformed request gets the documented status code and a message naming what is
// wrong, nothing is stored (neither the router's view nor the workers' KV bytes change), and the
// service keeps serving (a good decode on another sequence succeeds after every case, and a fresh
// prefill at the end equals the in-process reference).
#include <grpcpp/create_channel.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "dhsa/v1/attention.grpc.pb.h"
#include "dhsa/v1/worker.grpc.pb.h"
#include "gtest/gtest.h"
#include "services/common/config.h"
#include "services/common/server.h"
#include "services/common/wire.h"
#include "tests/router/service_test_util.h"

namespace dhsa::reliability_test {
namespace {

using ::dhsa::router_test::Harness;
using ::dhsa::router_test::Inputs;
using ::dhsa::router_test::MakeInputs;
using ::dhsa::router_test::Rows;
using ::dhsa::router_test::SmallConfig;
using ::dhsa::testing::FreshSeed;

constexpr int kHq = 4, kHkv = 2, kDim = 32, kLayers = 2, kTokens = 40;
constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

// What a case can use: stubs, a fresh empty sequence of kLayers layers ("victim") and one whose
// layer 0 holds keys ("probe"), and well-formed inputs for kTokens tokens.
struct Ctx {
  v1::Attention::Stub* stub;
  v1::Attention::Stub* big_stub;  // Sends messages up to 64 MiB (the server's limit is 4 MiB).
  std::string victim, probe;
  Inputs in;
  Tensor q1, k1, v1;
  v1::SequenceConfig good_config;
};

grpc::Status Create(const Ctx& c, const std::string& id, const v1::SequenceConfig& config) {
  v1::CreateSequenceRequest request;
  request.set_sequence_id(id);
  *request.mutable_config() = config;
  v1::CreateSequenceResponse response;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  return c.stub->CreateSequence(&context, request, &response);
}

// Writes `messages` on a Prefill stream (stopping at the first failed write), half-closes unless
// `cancel_after` is set (then the client cancels instead), reads every response, returns the end.
grpc::Status RawPrefill(v1::Attention::Stub* stub, const std::vector<v1::PrefillRequest>& messages,
                        bool cancel_after = false) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub->Prefill(&context);
  for (const v1::PrefillRequest& m : messages) {
    if (!stream->Write(m)) break;
  }
  if (cancel_after) {
    context.TryCancel();
  } else {
    stream->WritesDone();
  }
  v1::PrefillResponse response;
  while (stream->Read(&response)) {
  }
  return stream->Finish();
}

grpc::Status RawDecode(v1::Attention::Stub* stub, const v1::DecodeRequest& request) {
  v1::DecodeResponse response;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  return stub->Decode(&context, request, &response);
}

v1::PrefillRequest Header(const std::string& id, int layer, int64_t tokens) {
  v1::PrefillRequest r;
  r.mutable_header()->set_sequence_id(id);
  r.mutable_header()->set_layer(layer);
  r.mutable_header()->set_num_tokens(tokens);
  return r;
}

// The tensor as Prefill pieces of at most `piece_bytes` bytes.
std::vector<v1::PrefillRequest> Pieces(const Tensor& t, const std::string& name,
                                       int64_t piece_bytes = 1 << 20) {
  std::vector<v1::PrefillRequest> out;
  absl::Status s = SendTensorPieces(t, name, piece_bytes, [&](v1::TensorPiece&& p) {
    v1::PrefillRequest r;
    *r.mutable_piece() = std::move(p);
    out.push_back(std::move(r));
    return true;
  });
  EXPECT_TRUE(s.ok()) << s;
  return out;
}

std::vector<v1::PrefillRequest> Concat(std::vector<std::vector<v1::PrefillRequest>> parts) {
  std::vector<v1::PrefillRequest> out;
  for (auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

// A well-formed prefill of `id`'s `layer` with q, k, v, after `edit` has changed the messages.
grpc::Status EditedPrefill(const Ctx& c, const std::string& id, int layer, const Tensor& q,
                           const Tensor& k, const Tensor& v,
                           const std::function<void(std::vector<v1::PrefillRequest>&)>& edit) {
  std::vector<v1::PrefillRequest> m =
      Concat({{Header(id, layer, q.shape[1])}, Pieces(q, "q"), Pieces(k, "k"), Pieces(v, "v")});
  edit(m);
  return RawPrefill(c.stub, m);
}

v1::DecodeRequest GoodDecode(const Ctx& c, const std::string& id, int layer) {
  v1::DecodeRequest r;
  r.set_sequence_id(id);
  r.set_layer(layer);
  TensorToProto(c.q1, r.mutable_q());
  TensorToProto(c.k1, r.mutable_k());
  TensorToProto(c.v1, r.mutable_v());
  return r;
}

// A float32 tensor with element `index` set to `value`.
Tensor WithValue(Tensor t, int64_t index, float value) {
  static_cast<float*>(t.data())[index] = value;
  return t;
}

struct Case {
  std::string name;
  std::function<grpc::Status(const Ctx&)> run;
  grpc::StatusCode code;
  std::string message;  // A substring the status message must hold.
};

std::vector<Case> Cases() {
  std::vector<Case> cases;
  auto add = [&](std::string name, grpc::StatusCode code, std::string message,
                 std::function<grpc::Status(const Ctx&)> run) {
    cases.push_back({std::move(name), std::move(run), code, std::move(message)});
  };
  using C = grpc::StatusCode;
  auto create_with = [](std::function<void(v1::SequenceConfig&)> edit, std::string id = "") {
    return [edit, id](const Ctx& c) {
      v1::SequenceConfig config = c.good_config;
      edit(config);
      return Create(c, id, config);
    };
  };

  // CreateSequence: shapes, dtypes, parameters, ids.
  add("zero layers", C::INVALID_ARGUMENT, "num_layers must be in [1, 4096]; got 0",
      create_with([](auto& s) { s.set_num_layers(0); }));
  add("absurd layers", C::INVALID_ARGUMENT, "num_layers must be in [1, 4096]; got 1000000",
      create_with([](auto& s) { s.set_num_layers(1000000); }));
  add("zero q heads", C::INVALID_ARGUMENT, "q_heads and kv_heads must be in [1, 4096]",
      create_with([](auto& s) { s.set_q_heads(0); }));
  add("negative kv heads", C::INVALID_ARGUMENT, "q_heads and kv_heads must be in [1, 4096]",
      create_with([](auto& s) { s.set_kv_heads(-2); }));
  add("huge q heads", C::INVALID_ARGUMENT, "q_heads and kv_heads must be in [1, 4096]",
      create_with([](auto& s) { s.set_q_heads(1 << 30); }));
  add("Hq % Hkv != 0", C::INVALID_ARGUMENT, "q_heads (6) must be a multiple of kv_heads (4)",
      create_with([](auto& s) {
        s.set_q_heads(6);
        s.set_kv_heads(4);
      }));
  add("zero head dim", C::INVALID_ARGUMENT, "head_dim must be in [1, 512]; got 0",
      create_with([](auto& s) { s.set_head_dim(0); }));
  add("huge head dim", C::INVALID_ARGUMENT, "head_dim must be in [1, 512]; got 513",
      create_with([](auto& s) { s.set_head_dim(513); }));
  add("unknown dtype", C::INVALID_ARGUMENT, "unknown dtype value 99",
      create_with([](auto& s) { s.set_dtype(static_cast<v1::DType>(99)); }));
  add("negative budget", C::INVALID_ARGUMENT, "budget must be positive; got -5",
      create_with([](auto& s) { s.mutable_params()->set_budget(-5); }));
  add("budget below sink + local", C::INVALID_ARGUMENT, "must be >= sink + local",
      create_with([](auto& s) { s.mutable_params()->set_budget(20); }));
  add("absurd budget", C::INVALID_ARGUMENT, "budget must be at most",
      create_with([](auto& s) { s.mutable_params()->set_budget(kInt64Max); }));
  add("absurd sink and local", C::INVALID_ARGUMENT, "must be at most", create_with([](auto& s) {
        s.mutable_params()->set_sink(kInt64Max / 2 + 7);
        s.mutable_params()->set_local(kInt64Max / 2 + 7);
        s.mutable_params()->set_budget(kInt64Max);
      }));
  add("negative sink", C::INVALID_ARGUMENT, "sink must be >= 0",
      create_with([](auto& s) { s.mutable_params()->set_sink(-1); }));
  add("NaN scale", C::INVALID_ARGUMENT, "scale must be a finite positive number",
      create_with([](auto& s) { s.mutable_params()->set_scale(std::nanf("")); }));
  add("unknown policy", C::INVALID_ARGUMENT, "unknown policy value 77",
      create_with([](auto& s) { s.mutable_params()->set_policy(static_cast<v1::Policy>(77)); }));
  add("oracle policy", C::INVALID_ARGUMENT, "oracle_topk is evaluation-only",
      create_with([](auto& s) { s.mutable_params()->set_policy(v1::POLICY_ORACLE_TOPK); }));
  add("id with spaces", C::INVALID_ARGUMENT, "may hold only letters, digits",
      create_with([](auto&) {}, "has spaces"));
  add("id too long", C::INVALID_ARGUMENT, "sequence id must have 1 to 128 characters; got 129",
      create_with([](auto&) {}, std::string(129, 'a')));
  add("duplicate id", C::INVALID_ARGUMENT, "is already in use",
      [](const Ctx& c) { return Create(c, c.victim, c.good_config); });

  // Prefill: ids, layers, sizes, stream structure.
  add("prefill of an unknown sequence", C::NOT_FOUND, "no sequence 'ghost'", [](const Ctx& c) {
    return EditedPrefill(c, "ghost", 0, c.in.q, c.in.k, c.in.v, [](auto&) {});
  });
  add("prefill with an empty id", C::INVALID_ARGUMENT, "sequence_id is empty",
      [](const Ctx& c) { return EditedPrefill(c, "", 0, c.in.q, c.in.k, c.in.v, [](auto&) {}); });
  add("prefill of layer -1", C::INVALID_ARGUMENT, "layer -1 is outside [0, 2)", [](const Ctx& c) {
    return EditedPrefill(c, c.victim, -1, c.in.q, c.in.k, c.in.v, [](auto&) {});
  });
  add("prefill of layer num_layers", C::INVALID_ARGUMENT, "layer 2 is outside [0, 2)",
      [](const Ctx& c) {
        return EditedPrefill(c, c.victim, 2, c.in.q, c.in.k, c.in.v, [](auto&) {});
      });
  add("zero tokens", C::INVALID_ARGUMENT, "num_tokens must be in [1, 16777216]; got 0",
      [](const Ctx& c) { return RawPrefill(c.stub, {Header(c.victim, 0, 0)}); });
  add("absurd tokens", C::INVALID_ARGUMENT,
      "num_tokens must be in [1, 16777216]; got 1099511627776",
      [](const Ctx& c) { return RawPrefill(c.stub, {Header(c.victim, 0, int64_t{1} << 40)}); });
  add("empty stream", C::INVALID_ARGUMENT, "the Prefill stream ended before the header",
      [](const Ctx& c) { return RawPrefill(c.stub, {}); });
  add("piece before the header", C::INVALID_ARGUMENT,
      "the first Prefill message must be a PrefillHeader",
      [](const Ctx& c) { return RawPrefill(c.stub, Pieces(c.in.q, "q")); });
  add("two headers", C::INVALID_ARGUMENT, "expected a piece of tensor 'q' after the header",
      [](const Ctx& c) {
        return RawPrefill(c.stub, {Header(c.victim, 0, kTokens), Header(c.victim, 0, kTokens)});
      });
  add("stream ends after the header", C::INVALID_ARGUMENT,
      "the Prefill stream ended before tensor 'q' was complete",
      [](const Ctx& c) { return RawPrefill(c.stub, {Header(c.victim, 0, kTokens)}); });
  add("stream truncated inside v", C::INVALID_ARGUMENT,
      "the Prefill stream ended before tensor 'v' was complete", [](const Ctx& c) {
        return EditedPrefill(c, c.victim, 0, c.in.q, c.in.k, c.in.v, [](auto& m) {
          std::string* data = m.back().mutable_piece()->mutable_data();
          data->resize(data->size() / 2);
        });
      });
  add("client cancels mid-stream", C::CANCELLED, "", [](const Ctx& c) {
    std::vector<v1::PrefillRequest> m =
        Concat({{Header(c.victim, 0, kTokens)}, Pieces(c.in.q, "q"), Pieces(c.in.k, "k")});
    return RawPrefill(c.stub, m, /*cancel_after=*/true);
  });
  add("k before q", C::INVALID_ARGUMENT, "expected a piece of tensor 'q', got one of 'k'",
      [](const Ctx& c) {
        return RawPrefill(c.stub, Concat({{Header(c.victim, 0, kTokens)}, Pieces(c.in.k, "k")}));
      });
  add("q in float16", C::INVALID_ARGUMENT,
      "tensor 'q' must be float32 [4, 40, 32]; got float16 [4, 40, 32]", [](const Ctx& c) {
        return EditedPrefill(c, c.victim, 0, c.in.q.ConvertTo(DType::kF16), c.in.k, c.in.v,
                             [](auto&) {});
      });
  add("k in bfloat16", C::INVALID_ARGUMENT, "tensor 'k' must be float32 [2, 40, 32]; got bfloat16",
      [](const Ctx& c) {
        return EditedPrefill(c, c.victim, 0, c.in.q, c.in.k.ConvertTo(DType::kBF16), c.in.v,
                             [](auto&) {});
      });
  add("q with kv heads", C::INVALID_ARGUMENT,
      "tensor 'q' must be float32 [4, 40, 32]; got float32 [2, 40, 32]", [](const Ctx& c) {
        return EditedPrefill(c, c.victim, 0, c.in.k, c.in.k, c.in.v, [](auto&) {});
      });
  add("v one token short", C::INVALID_ARGUMENT, "tensor 'v' must be float32 [2, 40, 32]",
      [](const Ctx& c) {
        return EditedPrefill(c, c.victim, 0, c.in.q, c.in.k, Rows(c.in.v, 0, kTokens - 1),
                             [](auto&) {});
      });
  add("piece dtype unset", C::INVALID_ARGUMENT, "dtype is not set", [](const Ctx& c) {
    return EditedPrefill(c, c.victim, 0, c.in.q, c.in.k, c.in.v,
                         [](auto& m) { m[1].mutable_piece()->set_dtype(v1::DTYPE_UNSPECIFIED); });
  });
  add("negative size in a shape", C::INVALID_ARGUMENT, "got float32 [4, -40, 32]",
      [](const Ctx& c) {
        return EditedPrefill(c, c.victim, 0, c.in.q, c.in.k, c.in.v,
                             [](auto& m) { m[1].mutable_piece()->set_shape(1, -kTokens); });
      });
  add("more bytes than the shape", C::INVALID_ARGUMENT, "runs past its declared size of 20480",
      [](const Ctx& c) {
        return EditedPrefill(c, c.victim, 0, c.in.q, c.in.k, c.in.v,
                             [](auto& m) { m[1].mutable_piece()->mutable_data()->append(4, 'x'); });
      });
  add("first piece at offset 8", C::INVALID_ARGUMENT,
      "first piece of tensor 'q' has offset 8; expected 0", [](const Ctx& c) {
        return EditedPrefill(c, c.victim, 0, c.in.q, c.in.k, c.in.v,
                             [](auto& m) { m[1].mutable_piece()->set_offset(8); });
      });
  add("pieces out of order", C::INVALID_ARGUMENT, "does not continue at byte 4096",
      [](const Ctx& c) {
        std::vector<v1::PrefillRequest> m = Concat({{Header(c.victim, 0, kTokens)},
                                                    Pieces(c.in.q, "q", 4096),
                                                    Pieces(c.in.k, "k"),
                                                    Pieces(c.in.v, "v")});
        std::swap(m[2], m[3]);
        return RawPrefill(c.stub, m);
      });
  add("NaN in q", C::INVALID_ARGUMENT, "q holds a non-finite value (nan)", [](const Ctx& c) {
    return EditedPrefill(c, c.victim, 0, WithValue(c.in.q, 777, std::nanf("")), c.in.k, c.in.v,
                         [](auto&) {});
  });
  add("+Inf in k", C::INVALID_ARGUMENT, "k holds a non-finite value (inf)", [](const Ctx& c) {
    return EditedPrefill(c, c.victim, 0, c.in.q,
                         WithValue(c.in.k, 5, std::numeric_limits<float>::infinity()), c.in.v,
                         [](auto&) {});
  });
  add("-Inf in v (last element)", C::INVALID_ARGUMENT, "v holds a non-finite value (-inf)",
      [](const Ctx& c) {
        return EditedPrefill(
            c, c.victim, 0, c.in.q, c.in.k,
            WithValue(c.in.v, c.in.v.NumElements() - 1, -std::numeric_limits<float>::infinity()),
            [](auto&) {});
      });
  add("NaN in float16 k", C::INVALID_ARGUMENT, "k holds a non-finite value", [](const Ctx& c) {
    // A float16 sequence (created here; nothing may be stored for it either).
    v1::SequenceConfig config = c.good_config;
    config.set_dtype(v1::DTYPE_FLOAT16);
    grpc::Status created = Create(c, c.victim + "-f16", config);
    if (!created.ok()) return created;
    Tensor k = c.in.k.ConvertTo(DType::kF16);
    reinterpret_cast<uint16_t*>(k.bytes.data())[100] = 0x7e00;  // A float16 NaN.
    return EditedPrefill(c, c.victim + "-f16", 0, c.in.q.ConvertTo(DType::kF16), k,
                         c.in.v.ConvertTo(DType::kF16), [](auto&) {});
  });
  add("oversized prefill message", C::RESOURCE_EXHAUSTED, "larger than max", [](const Ctx& c) {
    // One piece of 5 MiB: above the server's 4 MiB message limit.
    const int64_t tokens = (5 << 20) / (kHq * kDim * 4) + 1;
    std::mt19937_64 rng(1);
    const Inputs big = MakeInputs(rng, kHq, kHkv, tokens, kDim);
    std::vector<v1::PrefillRequest> m =
        Concat({{Header(c.victim, 0, tokens)}, Pieces(big.q, "q", 8 << 20)});
    return RawPrefill(c.big_stub, m);
  });

  add("declared tensor of 128 TiB", C::INVALID_ARGUMENT,
      "the Prefill stream ended before tensor 'q' was complete", [](const Ctx& c) {
        // The largest shapes the limits allow: q is 2^47 bytes. The router must not allocate what
        // a client only declares.
        v1::SequenceConfig config = c.good_config;
        config.set_q_heads(4096);
        config.set_kv_heads(4096);
        config.set_head_dim(512);
        grpc::Status created = Create(c, c.victim + "-f16", config);
        if (!created.ok()) return created;
        const int64_t tokens = int64_t{1} << 24;
        v1::PrefillRequest piece;
        piece.mutable_piece()->set_name("q");
        piece.mutable_piece()->set_dtype(v1::DTYPE_FLOAT32);
        for (int64_t s : {int64_t{4096}, tokens, int64_t{512}}) piece.mutable_piece()->add_shape(s);
        piece.mutable_piece()->set_data(std::string(1 << 16, '\0'));
        return RawPrefill(c.stub, {Header(c.victim + "-f16", 0, tokens), piece});
      });

  // Decode.
  add("decode before prefill", C::FAILED_PRECONDITION, "before any prefill of that layer",
      [](const Ctx& c) { return RawDecode(c.stub, GoodDecode(c, c.victim, 1)); });
  add("decode of an unknown sequence", C::NOT_FOUND, "no sequence 'ghost'",
      [](const Ctx& c) { return RawDecode(c.stub, GoodDecode(c, "ghost", 0)); });
  add("decode of layer 7", C::INVALID_ARGUMENT, "layer 7 is outside [0, 2)",
      [](const Ctx& c) { return RawDecode(c.stub, GoodDecode(c, c.probe, 7)); });
  add("decode with two query rows", C::INVALID_ARGUMENT,
      "tensor 'q' must be float32 [4, 1, 32]; got float32 [4, 2, 32]", [](const Ctx& c) {
        v1::DecodeRequest r = GoodDecode(c, c.probe, 0);
        TensorToProto(Rows(c.in.q, 0, 2), r.mutable_q());
        return RawDecode(c.stub, r);
      });
  add("decode byte count short", C::INVALID_ARGUMENT,
      "tensor 'k' holds 252 bytes but its shape [2, 1, 32] and dtype float32 need 256",
      [](const Ctx& c) {
        v1::DecodeRequest r = GoodDecode(c, c.probe, 0);
        r.mutable_k()->mutable_data()->resize(252);
        return RawDecode(c.stub, r);
      });
  add("decode with no bytes", C::INVALID_ARGUMENT, "tensor 'v' holds 0 bytes", [](const Ctx& c) {
    v1::DecodeRequest r = GoodDecode(c, c.probe, 0);
    r.mutable_v()->clear_data();
    return RawDecode(c.stub, r);
  });
  add("decode dtype unset", C::INVALID_ARGUMENT, "tensor 'q': dtype is not set", [](const Ctx& c) {
    v1::DecodeRequest r = GoodDecode(c, c.probe, 0);
    r.mutable_q()->set_dtype(v1::DTYPE_UNSPECIFIED);
    return RawDecode(c.stub, r);
  });
  add("decode negative shape", C::INVALID_ARGUMENT, "has a negative size", [](const Ctx& c) {
    v1::DecodeRequest r = GoodDecode(c, c.probe, 0);
    r.mutable_q()->set_shape(0, -4);
    return RawDecode(c.stub, r);
  });
  add("decode absurd shape", C::INVALID_ARGUMENT, "is too large", [](const Ctx& c) {
    v1::DecodeRequest r = GoodDecode(c, c.probe, 0);
    r.mutable_q()->set_shape(0, int64_t{1} << 40);
    r.mutable_q()->set_shape(1, int64_t{1} << 40);
    return RawDecode(c.stub, r);
  });
  add("decode with float16 tensors", C::INVALID_ARGUMENT, "tensor 'q' must be float32 [4, 1, 32]",
      [](const Ctx& c) {
        v1::DecodeRequest r = GoodDecode(c, c.probe, 0);
        TensorToProto(c.q1.ConvertTo(DType::kF16), r.mutable_q());
        return RawDecode(c.stub, r);
      });
  add("decode NaN in q", C::INVALID_ARGUMENT, "q holds a non-finite value", [](const Ctx& c) {
    v1::DecodeRequest r = GoodDecode(c, c.probe, 0);
    TensorToProto(WithValue(c.q1, 3, std::nanf("")), r.mutable_q());
    return RawDecode(c.stub, r);
  });
  add("decode Inf in v", C::INVALID_ARGUMENT, "v holds a non-finite value", [](const Ctx& c) {
    v1::DecodeRequest r = GoodDecode(c, c.probe, 0);
    TensorToProto(WithValue(c.v1, 0, std::numeric_limits<float>::infinity()), r.mutable_v());
    return RawDecode(c.stub, r);
  });
  add("oversized decode message", C::RESOURCE_EXHAUSTED, "larger than max", [](const Ctx& c) {
    v1::DecodeRequest r = GoodDecode(c, c.probe, 0);
    r.mutable_q()->mutable_data()->resize(5 << 20);
    return RawDecode(c.big_stub, r);
  });

  // Info and release.
  add("info of an unknown sequence", C::NOT_FOUND, "no sequence 'ghost'", [](const Ctx& c) {
    v1::GetSequenceInfoRequest r;
    r.set_sequence_id("ghost");
    v1::SequenceInfo info;
    grpc::ClientContext context;
    return c.stub->GetSequenceInfo(&context, r, &info);
  });
  add("release of an unknown sequence", C::NOT_FOUND, "no sequence 'ghost'", [](const Ctx& c) {
    v1::ReleaseSequenceRequest r;
    r.set_sequence_id("ghost");
    v1::ReleaseSequenceResponse response;
    grpc::ClientContext context;
    return c.stub->ReleaseSequence(&context, r, &response);
  });
  return cases;
}

// KV bytes and stripes the workers hold, summed, from their Stats.
struct WorkerTotals {
  int64_t held_bytes = 0;
  int64_t stripes = 0;
  bool operator==(const WorkerTotals& o) const {
    return held_bytes == o.held_bytes && stripes == o.stripes;
  }
};

WorkerTotals Totals(const std::vector<std::unique_ptr<v1::Worker::Stub>>& workers) {
  WorkerTotals t;
  for (const auto& w : workers) {
    v1::StatsResponse stats;
    grpc::ClientContext context;
    const grpc::Status s = w->Stats(&context, v1::StatsRequest(), &stats);
    EXPECT_TRUE(s.ok()) << s.error_message();
    t.held_bytes += stats.held_bytes();
    t.stripes += stats.stripes();
  }
  return t;
}

TEST(BadInputTest, EveryMalformedRequestGetsItsCodeAndMessageAndStoresNothing) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  Harness h = Harness::Start(2, /*stripe_tokens=*/64);
  ASSERT_NE(h.client, nullptr);
  const DhsaConfig config = SmallConfig(Policy::kDhsa);

  auto channel = h.client->channel();
  auto stub = v1::Attention::NewStub(channel);
  grpc::ChannelArguments big_args;
  big_args.SetMaxSendMessageSize(64 << 20);
  auto big_stub = v1::Attention::NewStub(grpc::CreateCustomChannel(
      h.service->router_address(), grpc::InsecureChannelCredentials(), big_args));
  std::vector<std::unique_ptr<v1::Worker::Stub>> workers;
  for (int w = 0; w < h.service->num_workers(); ++w) {
    workers.push_back(v1::Worker::NewStub(
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", h.service->worker(w).port()),
                            grpc::InsecureChannelCredentials())));
  }

  Ctx c;
  c.stub = stub.get();
  c.big_stub = big_stub.get();
  c.in = MakeInputs(rng, kHq, kHkv, kTokens, kDim);
  c.q1 = Rows(c.in.q, 0, 1);
  c.k1 = Rows(c.in.k, 0, 1);
  c.v1 = Rows(c.in.v, 0, 1);
  c.good_config.set_num_layers(kLayers);
  c.good_config.set_q_heads(kHq);
  c.good_config.set_kv_heads(kHkv);
  c.good_config.set_head_dim(kDim);
  c.good_config.set_dtype(v1::DTYPE_FLOAT32);
  DhsaConfigToProto(config, c.good_config.mutable_params());

  // The probe holds 300 tokens in layer 0 across both workers.
  Sequence probe = h.Create(config, kLayers, kHq, kHkv, kDim, DType::kF32, "probe");
  c.probe = probe.id();
  const Inputs probe_in = MakeInputs(rng, kHq, kHkv, 300, kDim);
  ASSERT_TRUE(probe.Prefill(0, probe_in.q, probe_in.k, probe_in.v).ok());
  int64_t probe_length = 300;

  const std::vector<Case> cases = Cases();
  ASSERT_GE(cases.size(), 40u);
  int index = 0;
  for (const Case& k : cases) {
    SCOPED_TRACE(k.name);
    c.victim = absl::StrCat("victim-", index++);
    ASSERT_TRUE(Create(c, c.victim, c.good_config).ok());
    const WorkerTotals before = Totals(workers);

    const grpc::Status got = k.run(c);
    EXPECT_EQ(got.error_code(), k.code) << got.error_message();
    EXPECT_NE(got.error_message().find(k.message), std::string::npos)
        << "message: " << got.error_message() << "\nexpected to contain: " << k.message;

    // Nothing stored: the victim is empty, the workers hold what they held, the probe is as it was.
    for (const std::string& id : {c.victim, c.victim + "-f16"}) {
      absl::StatusOr<v1::SequenceInfo> info = h.client->Attach(id).Info();
      if (id != c.victim && info.status().code() == absl::StatusCode::kNotFound) continue;
      ASSERT_TRUE(info.ok()) << info.status();
      for (int64_t len : info->layer_lengths()) EXPECT_EQ(len, 0) << id;
      EXPECT_EQ(info->kv_bytes(), 0) << id;
    }
    // A failed call may still be undoing what it sent to the workers when the client hears back;
    // give the rollback a moment before comparing.
    WorkerTotals after = Totals(workers);
    for (int wait = 0; wait < 50 && !(after == before); ++wait) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      after = Totals(workers);
    }
    EXPECT_EQ(after.held_bytes, before.held_bytes);
    EXPECT_EQ(after.stripes, before.stripes);
    absl::StatusOr<v1::SequenceInfo> probe_info = probe.Info();
    ASSERT_TRUE(probe_info.ok()) << probe_info.status();
    EXPECT_EQ(probe_info->layer_lengths(0), probe_length);

    // Still serving: a good decode on the probe.
    absl::StatusOr<DecodeOutput> decoded = probe.Decode(0, c.q1, c.k1, c.v1);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(decoded->length, ++probe_length);
  }

  // After everything, a fresh sequence's prefill equals the in-process reference.
  Sequence fresh = h.Create(config, 1, kHq, kHkv, kDim, DType::kF32, "fresh");
  const Inputs in = MakeInputs(rng, kHq, kHkv, 257, kDim);
  absl::StatusOr<PrefillOutput> got = fresh.Prefill(0, in.q, in.k, in.v, true);
  ASSERT_TRUE(got.ok()) << got.status();
  absl::StatusOr<AttendResult> want = AttendReference(in.q, in.k, in.v, config);
  ASSERT_TRUE(want.ok());
  router_test::ExpectMatches(*got, *want, true, "after the bad requests");
}

}  // namespace
}  // namespace dhsa::reliability_test
