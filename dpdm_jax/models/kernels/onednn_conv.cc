// Stride-1 2-D convolutions (NHWC activations, HWIO weights, float32) by oneDNN, as XLA FFI
// custom calls for XLA:CPU: the forward pass, the input gradient, and the weight gradient of each
// of E groups of rows (E = examples when DP-SGD needs per-example gradients).
//
// Built at first use by dpdm_jax/models/onednn.py (g++ against jaxlib's FFI headers and the
// system's libdnnl, oneDNN 2.x or 3.x). Activations stay in XLA's NHWC layout (no reorders);
// only the small weight tensors are reordered into the layout the kernel prefers. Primitives are
// built once per shape and cached.
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;
using Dt = memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One convolution's geometry: x (n, h, w, ci) * k (kh, kw, ci, co) -> y (n, ho, wo, co).
struct Geometry {
  int64_t n, h, w, ci, co, kh, kw, pt, pb, pl, pr;
  int64_t ho() const { return h + pt + pb - kh + 1; }
  int64_t wo() const { return w + pl + pr - kw + 1; }
  std::string Key(char kind) const {
    std::string key(1, kind);
    for (int64_t v : {n, h, w, ci, co, kh, kw, pt, pb, pl, pr}) key += "," + std::to_string(v);
    return key;
  }
  memory::desc Src() const { return {{n, ci, h, w}, Dt::f32, Tag::nhwc}; }
  memory::desc Dst() const { return {{n, co, ho(), wo()}, Dt::f32, Tag::nhwc}; }
  memory::desc WeightsHwio() const { return {{co, ci, kh, kw}, Dt::f32, Tag::hwio}; }
  memory::desc WeightsAny() const { return {{co, ci, kh, kw}, Dt::f32, Tag::any}; }
  memory::dims Strides() const { return {1, 1}; }
  memory::dims PadL() const { return {pt, pl}; }
  memory::dims PadR() const { return {pb, pr}; }
};

// Scratch memory is passed in by each call (user mode), so that XLA may run the same primitive
// from several threads at once (one per device on a multi-device host).
dnnl::primitive_attr Attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g) {
#if DNNL_VERSION_MAJOR >= 3
  return {Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.Src(),
          g.WeightsAny(), g.Dst(), g.Strides(), g.PadL(), g.PadR(), Attr()};
#else
  dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
                                    g.Src(), g.WeightsAny(), g.Dst(), g.Strides(), g.PadL(), g.PadR());
  return {d, Attr(), Engine()};
#endif
}

dnnl::reorder::primitive_desc ReorderPd(const memory::desc& from, const memory::desc& to) {
  return dnnl::reorder::primitive_desc(Engine(), from, Engine(), to, Attr());
}

struct Plan {
  dnnl::primitive conv;
  memory::desc scratchpad;
  memory::desc weights;     // the layout the kernel takes its weights in
  bool reorder_weights;     // whether that differs from HWIO
  dnnl::reorder to_kernel_layout;  // HWIO -> weights (forward, input gradient) or back (weight gradient)
  memory::desc reorder_scratchpad;
};

// A plan from a primitive descriptor: the kernel, its weights layout and the reorder to or from HWIO.
template <typename Primitive, typename Pd>
Plan MakePlan(const Pd& pd, const memory::desc& weights, const memory::desc& hwio, bool weights_out) {
  Plan p{Primitive(pd), pd.scratchpad_desc(), weights, weights != hwio, {}, {}};
  if (p.reorder_weights) {
    auto rpd = weights_out ? ReorderPd(weights, hwio) : ReorderPd(hwio, weights);
    p.to_kernel_layout = dnnl::reorder(rpd);
    p.reorder_scratchpad = rpd.scratchpad_desc();
  }
  return p;
}

std::mutex plans_mutex;
std::unordered_map<std::string, std::shared_ptr<Plan>> plans;

template <typename Build>
std::shared_ptr<Plan> GetPlan(const std::string& key, Build build) {
  std::lock_guard<std::mutex> lock(plans_mutex);
  auto it = plans.find(key);
  if (it != plans.end()) return it->second;
  auto plan = std::make_shared<Plan>(build());
  plans.emplace(key, plan);
  return plan;
}

Plan ForwardPlan(const Geometry& g) {
  auto pd = ForwardPd(g);
  return MakePlan<dnnl::convolution_forward>(pd, pd.weights_desc(), g.WeightsHwio(), false);
}

Plan InputGradPlan(const Geometry& g) {
  auto hint = ForwardPd(g);
#if DNNL_VERSION_MAJOR >= 3
  dnnl::convolution_backward_data::primitive_desc pd(Engine(), dnnl::algorithm::convolution_direct, g.Src(),
                                                     g.WeightsAny(), g.Dst(), g.Strides(), g.PadL(), g.PadR(), hint,
                                                     Attr());
#else
  dnnl::convolution_backward_data::desc d(dnnl::algorithm::convolution_direct, g.Src(), g.WeightsAny(), g.Dst(),
                                          g.Strides(), g.PadL(), g.PadR());
  dnnl::convolution_backward_data::primitive_desc pd(d, Attr(), Engine(), hint);
#endif
  return MakePlan<dnnl::convolution_backward_data>(pd, pd.weights_desc(), g.WeightsHwio(), false);
}

Plan WeightGradPlan(const Geometry& g) {
  auto hint = ForwardPd(g);
#if DNNL_VERSION_MAJOR >= 3
  dnnl::convolution_backward_weights::primitive_desc pd(Engine(), dnnl::algorithm::convolution_direct, g.Src(),
                                                        g.WeightsAny(), g.Dst(), g.Strides(), g.PadL(), g.PadR(),
                                                        hint, Attr());
#else
  dnnl::convolution_backward_weights::desc d(dnnl::algorithm::convolution_direct, g.Src(), g.WeightsAny(), g.Dst(),
                                             g.Strides(), g.PadL(), g.PadR());
  dnnl::convolution_backward_weights::primitive_desc pd(d, Attr(), Engine(), hint);
#endif
  return MakePlan<dnnl::convolution_backward_weights>(pd, pd.diff_weights_desc(), g.WeightsHwio(), true);
}

// Runs `plan`'s kernel with `args` (DNNL_ARG_* -> memory), reordering the HWIO weights `hwio`
// into the kernel's layout first (weights_in) or its result back into them (weights_out).
void Run(const Plan& plan, std::unordered_map<int, memory> args, int weights_arg, const memory& hwio,
         bool weights_out, dnnl::stream& stream) {
  memory kernel_weights = hwio;
  if (plan.reorder_weights) kernel_weights = memory(plan.weights, Engine());
  if (plan.reorder_weights && !weights_out) {
    memory scratch(plan.reorder_scratchpad, Engine());
    plan.to_kernel_layout.execute(stream, {{DNNL_ARG_FROM, hwio}, {DNNL_ARG_TO, kernel_weights},
                                           {DNNL_ARG_SCRATCHPAD, scratch}});
  }
  memory scratch(plan.scratchpad, Engine());
  args[weights_arg] = kernel_weights;
  args[DNNL_ARG_SCRATCHPAD] = scratch;
  plan.conv.execute(stream, args);
  if (plan.reorder_weights && weights_out) {
    memory reorder_scratch(plan.reorder_scratchpad, Engine());
    plan.to_kernel_layout.execute(stream, {{DNNL_ARG_FROM, kernel_weights}, {DNNL_ARG_TO, hwio},
                                           {DNNL_ARG_SCRATCHPAD, reorder_scratch}});
  }
  stream.wait();
}

// oneDNN reports failures as exceptions; XLA wants an error status, not a terminated process.
template <typename Body>
ffi::Error Guarded(Body body) {
  try {
    return body();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(e.what());
  }
}

// The passes that take the kernel k (kh, kw, ci, co) and one activation tensor to another: the
// forward pass (x -> y) and the input gradient (dy -> dx). x_dims: the x-shaped tensor's shape.
ffi::Error KernelPass(char kind, Plan (*build)(const Geometry&), ffi::AnyBuffer::Dimensions x_dims,
                      ffi::Buffer<ffi::F32>& k, float* x_like, float* y_like, int x_arg, int y_arg,
                      int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  return Guarded([&] {
    auto kd = k.dimensions();
    if (x_dims.size() != 4 || kd.size() != 4 || x_dims[3] != kd[2])
      return ffi::Error::InvalidArgument("conv: bad shapes");
    Geometry g{x_dims[0], x_dims[1], x_dims[2], x_dims[3], kd[3], kd[0], kd[1],
               pad_top, pad_bottom, pad_left, pad_right};
    auto plan = GetPlan(g.Key(kind), [&] { return build(g); });
    dnnl::stream stream(Engine());
    Run(*plan, {{x_arg, memory(g.Src(), Engine(), x_like)}, {y_arg, memory(g.Dst(), Engine(), y_like)}},
        DNNL_ARG_WEIGHTS, memory(g.WeightsHwio(), Engine(), k.typed_data()), false, stream);
    return ffi::Error::Success();
  });
}

// y = conv(x, k): x (n, h, w, ci), k (kh, kw, ci, co), y (n, ho, wo, co).
ffi::Error ConvForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> y,
                           int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  return KernelPass('f', ForwardPlan, x.dimensions(), k, x.typed_data(), y->typed_data(), DNNL_ARG_SRC,
                    DNNL_ARG_DST, pad_top, pad_bottom, pad_left, pad_right);
}

// dx = d/dx sum(dy * conv(x, k)): dy (n, ho, wo, co), k (kh, kw, ci, co), dx (n, h, w, ci).
ffi::Error ConvInputGradImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> dx,
                             int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  return KernelPass('d', InputGradPlan, dx->dimensions(), k, dx->typed_data(), dy.typed_data(),
                    DNNL_ARG_DIFF_SRC, DNNL_ARG_DIFF_DST, pad_top, pad_bottom, pad_left, pad_right);
}

// dk[e] = d/dk sum(dy[e] * conv(x[e], k)) for each of e groups of rows:
// x (e, n, h, w, ci), dy (e, n, ho, wo, co), dk (e, kh, kw, ci, co).
// examples_in_parallel: the groups are spread over the OpenMP threads, each group's kernel then
// runs on one thread (a group of DP-SGD is one example's K rows: too small to split well).
ffi::Error ConvWeightGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk,
                              int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                              int64_t examples_in_parallel) {
  return Guarded([&] {
    auto xd = x.dimensions(), kd = dk->dimensions();
    if (xd.size() != 5 || kd.size() != 5 || xd[0] != kd[0] || xd[4] != kd[3])
      return ffi::Error::InvalidArgument("conv weight gradient: bad shapes");
    Geometry g{xd[1], xd[2], xd[3], xd[4], kd[4], kd[1], kd[2], pad_top, pad_bottom, pad_left, pad_right};
    // oneDNN sizes a kernel's work split by the thread count at creation: a kernel that runs one
    // group per thread must be created for one thread.
    const bool parallel = examples_in_parallel && xd[0] > 1;
    auto plan = parallel ? GetPlan(g.Key('W'), [&] {
                  const int threads = omp_get_max_threads();
                  omp_set_num_threads(1);
                  Plan p = WeightGradPlan(g);
                  omp_set_num_threads(threads);
                  return p;
                })
                         : GetPlan(g.Key('w'), [&] { return WeightGradPlan(g); });
    const int64_t groups = xd[0], x_size = g.n * g.h * g.w * g.ci, dy_size = g.n * g.ho() * g.wo() * g.co,
                  k_size = g.kh * g.kw * g.ci * g.co;
    float *xs = x.typed_data(), *dys = dy.typed_data(), *dks = dk->typed_data();
    auto one_group = [&](int64_t e) {
      dnnl::stream stream(Engine());
      Run(*plan, {{DNNL_ARG_SRC, memory(g.Src(), Engine(), xs + e * x_size)},
                  {DNNL_ARG_DIFF_DST, memory(g.Dst(), Engine(), dys + e * dy_size)}},
          DNNL_ARG_DIFF_WEIGHTS, memory(g.WeightsHwio(), Engine(), dks + e * k_size), true, stream);
    };
    if (!parallel) {
      for (int64_t e = 0; e < groups; ++e) one_group(e);
      return ffi::Error::Success();
    }
    std::string failure;
    std::mutex failure_mutex;
#pragma omp parallel for schedule(static)
    for (int64_t e = 0; e < groups; ++e) {
      try {
        one_group(e);
      } catch (const std::exception& ex) {  // exceptions must not leave an OpenMP region
        std::lock_guard<std::mutex> lock(failure_mutex);
        failure = ex.what();
      }
    }
    if (!failure.empty()) return ffi::Error::Internal("oneDNN: " + failure);
    return ffi::Error::Success();
  });
}

}  // namespace

#define DPDM_CONV_HANDLER(name, impl)                                                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl,                                              \
                                ffi::Ffi::Bind()                                        \
                                    .Arg<ffi::Buffer<ffi::F32>>()                       \
                                    .Arg<ffi::Buffer<ffi::F32>>()                       \
                                    .Ret<ffi::Buffer<ffi::F32>>()                       \
                                    .Attr<int64_t>("pad_top")                           \
                                    .Attr<int64_t>("pad_bottom")                        \
                                    .Attr<int64_t>("pad_left")                          \
                                    .Attr<int64_t>("pad_right"));

DPDM_CONV_HANDLER(DpdmOnednnConvForward, ConvForwardImpl)
DPDM_CONV_HANDLER(DpdmOnednnConvInputGrad, ConvInputGradImpl)

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpdmOnednnConvWeightGrad, ConvWeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_bottom")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_right")
                                  .Attr<int64_t>("examples_in_parallel"));
