// GroupNorm, optionally followed by SiLU, on NHWC float32 activations, as XLA FFI custom calls
// for XLA:CPU: the forward pass and its gradient. Every row (example or noise draw) is normalised
// on its own, so nothing crosses rows (DP-SGD's per-example gradients need exactly that).
//
// Per row, over P = H * W positions and C channels in G groups of C / G:
//   mean_g, var_g over the group's P * C / G values (sums of x and x^2 in float over blocks of 64
//   positions, added in float64; var clipped at 0),
//   a_c = scale_c / sqrt(var_g + eps), b_c = bias_c - mean_g * a_c, t = a_c x + b_c,
//   y = t (silu = 0) or t * sigmoid(t) (silu = 1).
// The gradient, for dy = dL/dy: dt = dy (or dy * sigmoid(t) (1 + t (1 - sigmoid(t)))), then
//   dbias_c = sum_p dt, dscale_c = rstd_g (sum_p dt x - mean_g sum_p dt)   (per row: the caller sums),
//   dx = a_c dt + u_g x + v_g with u_g = -rstd_g^2 S2_g / m, v_g = -rstd_g S1_g / m - u_g mean_g,
//   S1_g = sum_{c in g} scale_c dbias_c, S2_g = sum_{c in g} scale_c dscale_c, m = P C / G.
// Two passes over the row each way, C the contiguous (vectorised) axis; rows spread over OpenMP
// threads. Built by dpdm_jax/models/onednn.py together with the convolutions.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// glibc's vectorised expf (libmvec), which <cmath> only declares under -ffast-math: declared here
// so that the SiLU loops vectorise without fast-math's other effects on the process.
extern "C" float expf(float) __attribute__((simd("notinbranch")));

namespace {

struct Shape {
  int64_t rows, positions, channels, groups;
  int64_t group_size() const { return channels / groups; }
};

ffi::Error CheckShape(ffi::Buffer<ffi::F32>& x, int64_t channels, int64_t groups, Shape* shape) {
  auto d = x.dimensions();
  if (d.size() < 4) return ffi::Error::InvalidArgument("group norm: x must be (..., H, W, C)");
  const int64_t c = d[d.size() - 1];
  if (c != channels || groups < 1 || c % groups != 0)
    return ffi::Error::InvalidArgument("group norm: channels do not match scale or groups");
  int64_t rows = 1;
  for (size_t i = 0; i + 3 < d.size(); ++i) rows *= d[i];
  *shape = {rows, d[d.size() - 3] * d[d.size() - 2], c, groups};
  return ffi::Error::Success();
}

#if defined(__x86_64__)
#define DPDM_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DPDM_VECTOR_CLONES
#endif

constexpr int64_t kBlock = 64;  // positions summed in float before adding into float64

// Per-row mean and 1/sqrt(var + eps) of each group (block sums in float, totals in float64).
DPDM_VECTOR_CLONES
void RowStats(const float* x, const Shape& s, float eps, float* mean, float* rstd) {
  const int64_t c = s.channels, cg = s.group_size();
  std::vector<double> s1(c, 0.0), s2(c, 0.0);
  std::vector<float> f1(c), f2(c);
  // float sums over blocks of positions, added into float64 totals.
  for (int64_t p0 = 0; p0 < s.positions; p0 += kBlock) {
    float* __restrict a1 = f1.data();
    float* __restrict a2 = f2.data();
    for (int64_t i = 0; i < c; ++i) a1[i] = 0.0f, a2[i] = 0.0f;
    for (int64_t p = p0; p < std::min(p0 + kBlock, s.positions); ++p) {
      const float* __restrict xp = x + p * c;
#pragma omp simd
      for (int64_t i = 0; i < c; ++i) {
        a1[i] += xp[i];
        a2[i] += xp[i] * xp[i];
      }
    }
    for (int64_t i = 0; i < c; ++i) s1[i] += a1[i], s2[i] += a2[i];
  }
  const double m = static_cast<double>(s.positions * cg);
  for (int64_t g = 0; g < s.groups; ++g) {
    double a = 0.0, b = 0.0;
    for (int64_t i = g * cg; i < (g + 1) * cg; ++i) a += s1[i], b += s2[i];
    const double mu = a / m, var = std::max(b / m - mu * mu, 0.0);
    mean[g] = static_cast<float>(mu);
    rstd[g] = static_cast<float>(1.0 / std::sqrt(var + eps));
  }
}

void Coefficients(const float* scale, const float* bias, const float* mean, const float* rstd, const Shape& s,
                  float* a, float* b) {
  const int64_t cg = s.group_size();
  for (int64_t i = 0; i < s.channels; ++i) {
    const int64_t g = i / cg;
    a[i] = scale[i] * rstd[g];
    b[i] = bias[i] - mean[g] * a[i];
  }
}

DPDM_VECTOR_CLONES
void RowForward(const float* x, const float* a, const float* b, const Shape& s, bool silu, float* y) {
  const int64_t c = s.channels;
  for (int64_t p = 0; p < s.positions; ++p) {
    const float* xp = x + p * c;
    float* yp = y + p * c;
    if (silu) {
#pragma omp simd
      for (int64_t i = 0; i < c; ++i) {
        const float t = a[i] * xp[i] + b[i];
        yp[i] = t / (1.0f + expf(-t));
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < c; ++i) yp[i] = a[i] * xp[i] + b[i];
    }
  }
}

// Pass 1: dt into dx (scratch), per-channel sums of dt and dt * x. Pass 2: dx = a dt + u x + v.
DPDM_VECTOR_CLONES
void RowBackward(const float* x, const float* dy, const float* scale, const float* a, const float* b,
                 const float* mean, const float* rstd, const Shape& s, bool silu, float* dx, float* dscale,
                 float* dbias) {
  const int64_t c = s.channels, cg = s.group_size();
  std::vector<double> sdt(c, 0.0), sdtx(c, 0.0);
  std::vector<float> f1(c), f2(c);
  for (int64_t p0 = 0; p0 < s.positions; p0 += kBlock) {
    float* __restrict a1 = f1.data();
    float* __restrict a2 = f2.data();
    for (int64_t i = 0; i < c; ++i) a1[i] = 0.0f, a2[i] = 0.0f;
    for (int64_t p = p0; p < std::min(p0 + kBlock, s.positions); ++p) {
      const float *__restrict xp = x + p * c, *__restrict dyp = dy + p * c;
      float* __restrict dtp = dx + p * c;
      if (silu) {
#pragma omp simd
        for (int64_t i = 0; i < c; ++i) {
          const float t = a[i] * xp[i] + b[i];
          const float sig = 1.0f / (1.0f + expf(-t));
          const float dt = dyp[i] * sig * (1.0f + t * (1.0f - sig));
          dtp[i] = dt;
          a1[i] += dt;
          a2[i] += dt * xp[i];
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < c; ++i) {
          const float dt = dyp[i];
          dtp[i] = dt;
          a1[i] += dt;
          a2[i] += dt * xp[i];
        }
      }
    }
    for (int64_t i = 0; i < c; ++i) sdt[i] += a1[i], sdtx[i] += a2[i];
  }
  const double m = static_cast<double>(s.positions * cg);
  std::vector<float> u(c), v(c);
  for (int64_t g = 0; g < s.groups; ++g) {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t i = g * cg; i < (g + 1) * cg; ++i) {
      const double ds = rstd[g] * (sdtx[i] - mean[g] * sdt[i]);
      dbias[i] = static_cast<float>(sdt[i]);
      dscale[i] = static_cast<float>(ds);
      s1 += scale[i] * sdt[i];
      s2 += scale[i] * ds;
    }
    const double r = rstd[g], ug = -r * r * s2 / m, vg = -r * s1 / m - ug * mean[g];
    for (int64_t i = g * cg; i < (g + 1) * cg; ++i) u[i] = static_cast<float>(ug), v[i] = static_cast<float>(vg);
  }
  for (int64_t p = 0; p < s.positions; ++p) {
    const float* xp = x + p * c;
    float* dxp = dx + p * c;
#pragma omp simd
    for (int64_t i = 0; i < c; ++i) dxp[i] = a[i] * dxp[i] + u[i] * xp[i] + v[i];
  }
}

// y, mean, rstd = group_norm(x; scale, bias) [then SiLU]: x, y (..., H, W, C); mean, rstd (rows, G).
ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                       ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                       ffi::ResultBuffer<ffi::F32> rstd, int64_t groups, float epsilon, int64_t silu) {
  Shape s;
  if (auto e = CheckShape(x, static_cast<int64_t>(scale.element_count()), groups, &s); e.failure()) return e;
  if (bias.element_count() != s.channels || y->element_count() != x.element_count() ||
      mean->element_count() != s.rows * groups || rstd->element_count() != s.rows * groups)
    return ffi::Error::InvalidArgument("group norm: bias, y or statistics do not match x");
  const int64_t size = s.positions * s.channels;
  const float *xs = x.typed_data(), *sc = scale.typed_data(), *bi = bias.typed_data();
  float *ys = y->typed_data(), *ms = mean->typed_data(), *rs = rstd->typed_data();
#pragma omp parallel
  {
    std::vector<float> a(s.channels), b(s.channels);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < s.rows; ++r) {
      RowStats(xs + r * size, s, epsilon, ms + r * groups, rs + r * groups);
      Coefficients(sc, bi, ms + r * groups, rs + r * groups, s, a.data(), b.data());
      RowForward(xs + r * size, a.data(), b.data(), s, silu != 0, ys + r * size);
    }
  }
  return ffi::Error::Success();
}

// dx (like x), dscale and dbias per row (rows, C) from x, scale, bias, mean, rstd and dy.
ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                        ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                        ffi::ResultBuffer<ffi::F32> dbias, int64_t groups, int64_t silu) {
  Shape s;
  if (auto e = CheckShape(x, static_cast<int64_t>(scale.element_count()), groups, &s); e.failure()) return e;
  // Every buffer must hold exactly x's rows: a mismatch (e.g. dy mapped over more rows than x)
  // would otherwise leave part of dx unwritten.
  if (bias.element_count() != s.channels || dy.element_count() != x.element_count() ||
      dx->element_count() != x.element_count() || mean.element_count() != s.rows * groups ||
      rstd.element_count() != s.rows * groups || dscale->element_count() != s.rows * s.channels ||
      dbias->element_count() != s.rows * s.channels)
    return ffi::Error::InvalidArgument("group norm gradient: dy, statistics or outputs do not match x");
  const int64_t size = s.positions * s.channels, c = s.channels;
  const float *xs = x.typed_data(), *sc = scale.typed_data(), *bi = bias.typed_data(), *ms = mean.typed_data(),
              *rs = rstd.typed_data(), *dys = dy.typed_data();
  float *dxs = dx->typed_data(), *dss = dscale->typed_data(), *dbs = dbias->typed_data();
#pragma omp parallel
  {
    std::vector<float> a(c), b(c);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < s.rows; ++r) {
      Coefficients(sc, bi, ms + r * groups, rs + r * groups, s, a.data(), b.data());
      RowBackward(xs + r * size, dys + r * size, sc, a.data(), b.data(), ms + r * groups, rs + r * groups, s,
                  silu != 0, dxs + r * size, dss + r * c, dbs + r * c);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpdmGroupNormForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("silu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpdmGroupNormBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("silu"));
