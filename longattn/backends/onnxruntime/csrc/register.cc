// The ai.longattn custom-op library for onnxruntime (lite custom-op API, CPU, float32).
//
// FlashAttention, HyperAttention and LinearAttention share one kernel: the node's `plan`
// attribute (the policy's length bands) picks the algorithm for the runtime key length, the
// op type only names the default when a plan is empty. Threads come from onnxruntime's
// intra-op pool (KernelContext_ParallelFor), so intra_op_num_threads governs them.
//
// Built against the onnxruntime 1.21 C API headers (ORT_API_VERSION 21): the C API is
// versioned and backward compatible, so the library loads in any onnxruntime >= 1.21. The API
// table is bound at registration (ORT_API_MANUAL_INIT), to whichever runtime loads us.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "attention.h"
#include "plan.h"

namespace longattn {
namespace {

float attr_float(const OrtApi* api, const OrtKernelInfo* info, const char* name, float fallback) {
  float v = fallback;
  if (OrtStatus* st = api->KernelInfoGetAttribute_float(info, name, &v)) { api->ReleaseStatus(st); return fallback; }
  return v;
}

int64_t attr_int(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t fallback) {
  int64_t v = fallback;
  if (OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, &v)) { api->ReleaseStatus(st); return fallback; }
  return v;
}

std::string attr_string(const OrtApi* api, const OrtKernelInfo* info, const char* name) {
  size_t size = 0;
  if (OrtStatus* st = api->KernelInfoGetAttribute_string(info, name, nullptr, &size)) {
    api->ReleaseStatus(st);
    return "";
  }
  std::string out(size, '\0');
  if (OrtStatus* st = api->KernelInfoGetAttribute_string(info, name, out.data(), &size)) {
    api->ReleaseStatus(st);
    return "";
  }
  if (!out.empty() && out.back() == '\0') out.pop_back();
  return out;
}

// Run fn(i) for i < total on onnxruntime's intra-op threads; the first exception is rethrown.
void parallel_for(OrtKernelContext* ctx, size_t total, const std::function<void(size_t)>& fn) {
  struct Job {
    const std::function<void(size_t)>* fn;
    std::mutex lock;
    std::string error;
  } job{&fn, {}, {}};
  auto trampoline = [](void* data, size_t i) {
    auto* j = static_cast<Job*>(data);
    try {
      (*j->fn)(i);
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> guard(j->lock);
      if (j->error.empty()) j->error = e.what();
    }
  };
  Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(ctx, trampoline, total, 0, &job));
  if (!job.error.empty()) throw std::runtime_error(job.error);
}

// The linear-attention settings the C++ kernel implements: the additive rule, normalised, with a
// fixed feature map (no calibrated feature_params). Others run exact attention.
bool linear_supported(const Band& band) {
  const std::string map = band.string("feature_map", "elu");
  if (map != "elu" && map != "relu" && map != "identity" && map != "favor" && map != "taylor2" && map != "none")
    return false;
  if (band.string("update_rule", "add") != "add" || band.number("normalize", 1) == 0) return false;
  if (band.strings.count("feature_params") || band.numbers.count("feature_params") || band.numbers.count("beta"))
    return false;
  return !(map == "none" && band.number("sink_tokens", 0) == 0 && band.number("local_window", 0) == 0);
}

template <const char* DefaultKind>
struct AttentionOp {
  float scale = 1.f;
  bool causal = false;
  std::vector<Band> bands;

  AttentionOp(const OrtApi* api, const OrtKernelInfo* info) {
    scale = attr_float(api, info, "scale", 1.f);
    causal = attr_int(api, info, "causal", 0) != 0;
    const std::string plan = attr_string(api, info, "plan");
    if (!plan.empty()) bands = PlanReader(plan).read();
    if (bands.empty()) bands.push_back(Band{DefaultKind});
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& q, const Ort::Custom::Tensor<float>& k,
                      const Ort::Custom::Tensor<float>& v, const Ort::Custom::Tensor<float>& mask,
                      Ort::Custom::Tensor<float>& out) {
    try {
      run(ctx, q, k, v, mask, out);
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {
      return Ort::Status{(std::string("ai.longattn: ") + e.what()).c_str(), ORT_RUNTIME_EXCEPTION};
    }
  }

  void run(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& q, const Ort::Custom::Tensor<float>& k,
           const Ort::Custom::Tensor<float>& v, const Ort::Custom::Tensor<float>& mask,
           Ort::Custom::Tensor<float>& out) {
    const auto &qs = q.Shape(), &ks = k.Shape(), &vs = v.Shape();
    if (qs.size() != 4 || ks.size() != 4 || vs.size() != 4)
      throw std::runtime_error("q, k and v must be 4-D (batch, heads, length, dim)");
    const int64_t B = qs[0], Hq = qs[1], Sq = qs[2], D = qs[3], Hkv = ks[1], Sk = ks[2], Dv = vs[3];
    if (ks[0] != B || vs[0] != B || ks[3] != D || vs[1] != Hkv || vs[2] != Sk || Hkv == 0 || Hq % Hkv)
      throw std::runtime_error("q " + q.Shape2Str() + ", k " + k.Shape2Str() + ", v " + v.Shape2Str() +
                               " do not fit together (Hq must be a multiple of Hkv)");
    const int64_t groups = Hq / Hkv;
    // the additive mask, broadcast to (B, Hq, Sq, Sk) by strides; a one-element mask is a
    // constant shift of every score, which softmax ignores
    const auto& ms = mask.Shape();
    const float* mask_data = mask.NumberOfElement() > 1 ? mask.Data() : nullptr;
    int64_t mstride[4] = {0, 0, 0, 0};
    if (mask_data) {
      if (ms.size() > 4) throw std::runtime_error("mask of rank > 4");
      const int64_t full[4] = {B, Hq, Sq, Sk};
      int64_t stride = 1;
      for (int i = (int)ms.size() - 1, a = 3; i >= 0; --i, --a) {
        if (ms[i] != 1 && ms[i] != full[a])
          throw std::runtime_error("mask " + mask.Shape2Str() + " does not broadcast to the scores");
        mstride[a] = ms[i] == 1 ? 0 : stride;
        stride *= ms[i];
      }
    }
    float* o = out.Allocate({B, Hq, Sq, Dv});
    const float *qd = q.Data(), *kd = k.Data(), *vd = v.Data();
    const Band& band = band_for_length(bands, Sk);
    const std::string& kind = band.kind;
    auto head_mask = [&](int64_t b, int64_t h, int64_t q0) {
      MaskView view;
      if (mask_data) {
        view.data = mask_data + b * mstride[0] + h * mstride[1] + q0 * mstride[2];
        view.stride_q = mstride[2];
        view.stride_k = mstride[3];
      }
      return view;
    };
    const bool approximate = (kind == "hyper" || kind == "linear");
    if (approximate && mask_data) throw std::runtime_error(kind + " takes no mask; the rewriter uses flash for such sites");
    // NaN or inf anywhere (a mask's -inf aside): eager's NaN rows, from plain exact arithmetic, for every kind
    if (!all_finite(qd, B * Hq * Sq * D) || !all_finite(kd, B * Hkv * Sk * D) || !all_finite(vd, B * Hkv * Sk * Dv) ||
        (mask_data && !all_finite(mask_data, (int64_t)mask.NumberOfElement(), true))) {
      parallel_for(ctx, (size_t)(B * Hq), [&](size_t item) {
        const int64_t b = item / Hq, h = item % Hq, hk = h / groups;
        plain_attention(qd + item * Sq * D, kd + (b * Hkv + hk) * Sk * D, vd + (b * Hkv + hk) * Sk * Dv, Sq, Sk,
                        (int)D, (int)Dv, scale, head_mask(b, h, 0), causal, o + item * Sq * Dv);
      });
      return;
    }
    if (kind == "hyper" && Sk >= (int64_t)band.number("min_seq_len", 4096) && !(causal && Sq > Sk)) {
      // defaults are the PyTorch kernel's (longattn/kernels/hyper/__init__.py)
      HyperParams p;
      p.block_size = std::max<int64_t>(1, (int64_t)band.number("block_size", 256));
      p.sample_size = std::max<int64_t>(0, (int64_t)band.number("sample_size", 256));
      p.lsh_bits = (int64_t)band.number("lsh_bits", 7);
      p.min_seq_len = (int64_t)band.number("min_seq_len", 4096);
      p.sink_tokens = std::max<int64_t>(0, (int64_t)band.number("sink_tokens", 64));
      p.local_window = std::max<int64_t>(0, (int64_t)band.number("local_window", 256));
      p.seed = (uint64_t)band.number("seed", 0);
      const std::string variant = band.string("variant", "default");
      if (variant != "default" && variant != "paper" && variant != "null")
        throw std::runtime_error("hyper variant '" + variant + "' is not one of default, paper");
      p.paper = variant == "paper";
      // unset: the variant's own (pattern.py, resolve_sampling): importance for default, uniform for paper
      const std::string sampling = band.string("sampling", "null");
      if (sampling != "uniform" && sampling != "importance" && sampling != "null")
        throw std::runtime_error("hyper sampling '" + sampling + "' is not one of uniform, importance");
      if (p.paper && sampling == "importance")
        throw std::runtime_error("hyper variant 'paper' samples uniformly; sampling 'importance' needs 'default'");
      p.importance = sampling == "importance" || (sampling == "null" && !p.paper);
      parallel_for(ctx, (size_t)(B * Hkv), [&](size_t item) {
        thread_local Workspace ws;
        const int64_t b = item / Hkv, hk = item % Hkv;
        hyper_attention_heads(qd + (b * Hq + hk * groups) * Sq * D, (int)groups, Sq, kd + (b * Hkv + hk) * Sk * D,
                              vd + (b * Hkv + hk) * Sk * Dv, Sk, (int)D, (int)Dv, scale, causal, p, item + 1,
                              o + (b * Hq + hk * groups) * Sq * Dv, ws);
      });
      return;
    }
    if (kind == "linear" && linear_supported(band)) {
      // defaults are the PyTorch kernel's (longattn/kernels/linear/__init__.py)
      LinearParams p;
      p.feature_map = band.string("feature_map", "elu");
      p.num_features = std::max<int64_t>(1, (int64_t)band.number("num_features", 256));
      p.sink_tokens = std::max<int64_t>(0, (int64_t)band.number("sink_tokens", 0));
      p.local_window = std::max<int64_t>(0, (int64_t)band.number("local_window", 0));
      p.eps = (float)band.number("eps", 1e-6);
      p.seed = (uint64_t)band.number("seed", 0);
      parallel_for(ctx, (size_t)(B * Hkv), [&](size_t item) {
        thread_local Workspace ws;
        const int64_t b = item / Hkv, hk = item % Hkv;
        linear_attention_heads(qd + (b * Hq + hk * groups) * Sq * D, (int)groups, Sq, kd + (b * Hkv + hk) * Sk * D,
                               vd + (b * Hkv + hk) * Sk * Dv, Sk, (int)D, (int)Dv, scale, causal, p, item + 1,
                               o + (b * Hq + hk * groups) * Sq * Dv, ws);
      });
      return;
    }
    // exact attention also stands in for linear-attention settings this library does not implement
    // (see linear_supported), as the node's ONNX function body does
    // exact (flash, exact, and hyper below min_seq_len keys): keys packed once per K/V head,
    // then query blocks of every head in parallel
    int64_t ldkt = round_up(std::max<int64_t>(Sk, 1), 32);
    std::unique_ptr<float[]> packed(new float[(size_t)(B * Hkv) * D * ldkt]);  // filled by the packing below
    parallel_for(ctx, (size_t)(B * Hkv), [&](size_t item) {
      pack_keys_panels(kd + item * Sk * D, D, Sk, (int)D, packed.get() + item * D * ldkt);
    });
    const int64_t qblocks = (Sq + kRowBlock - 1) / kRowBlock;
    parallel_for(ctx, (size_t)(B * Hq * qblocks), [&](size_t item) {
      thread_local Workspace ws;
      const int64_t blk = item % qblocks, bh = item / qblocks, b = bh / Hq, h = bh % Hq, hk = h / groups;
      const int64_t q0 = blk * kRowBlock, rows = std::min<int64_t>(kRowBlock, Sq - q0);
      attend_rows(qd + ((b * Hq + h) * Sq + q0) * D, D, rows, (int)D, scale,
                  packed.get() + (b * Hkv + hk) * D * ldkt, ldkt, vd + (b * Hkv + hk) * Sk * Dv, Dv, Sk, (int)Dv,
                  head_mask(b, h, q0), causal, q0, Sk - Sq, o + ((b * Hq + h) * Sq + q0) * Dv, Dv, nullptr, ws);
    });
  }
};

constexpr char kFlash[] = "flash";
constexpr char kHyper[] = "hyper";
constexpr char kLinear[] = "linear";

}  // namespace
}  // namespace longattn

extern "C" {

OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // a runtime older than the headers: nothing we can do
  Ort::InitApi(api);
  static std::once_flag once;
  static std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>> ops;
  static std::unique_ptr<Ort::CustomOpDomain> domain;
  try {
    std::call_once(once, [] {
      using namespace longattn;
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<AttentionOp<kFlash>>("FlashAttention", "CPUExecutionProvider"));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<AttentionOp<kHyper>>("HyperAttention", "CPUExecutionProvider"));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<AttentionOp<kLinear>>("LinearAttention", "CPUExecutionProvider"));
      domain = std::make_unique<Ort::CustomOpDomain>("ai.longattn");
      for (auto& op : ops) domain->Add(op.get());
    });
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

}  // extern "C"
