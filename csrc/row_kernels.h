// Passes A and C on one row of logits, vectorised with at::vec::Vectorized (AVX2, AVX-512 or NEON, whichever the
// extension is built for; scalar otherwise). A row is read once per pass: pass A takes its maximum, then
// exp-sums it (the second read comes from cache: a row of 32k floats fits in L2); pass C writes the gradient.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace sgrpo_native {

// The result of pass A for one row.
template <typename acc_t>
struct RowScores {
  acc_t logp;
  acc_t lse;
  acc_t entropy;
};

// Sums accumulate in vector lanes over blocks of this many elements, then in double: fp32 sums of a 150k
// vocabulary keep about 1e-7 relative error instead of sqrt(V) ulps.
constexpr int64_t kBlock = 1024;

// exp of a vector: PyTorch's exp_u20 for fp32 (a degree-5 polynomial, at most 20 ulp, what its own softmax uses;
// about twice as fast as Sleef's 1-ulp exp here), the 1-ulp exp for fp64. exp_u20 does not propagate NaN:
// callers take the exact exp for rows whose maximum (pass A) or lse (pass C) is not finite, so that a NaN or
// +inf logit gives NaN results as in the other backends.
template <typename acc_t>
at::vec::Vectorized<acc_t> fast_exp(const at::vec::Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

template <typename acc_t>
acc_t nan_max(acc_t a, acc_t b) {
  return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<acc_t>::quiet_NaN() : (a > b ? a : b);
}

// max_i z_i of a row, NaN if any element is NaN.
template <typename acc_t>
acc_t row_max(const acc_t* z, int64_t vocab) {
  using Vec = at::vec::Vectorized<acc_t>;
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  int64_t i = 0;
  if (vocab >= Vec::size()) {
    Vec lanes(-std::numeric_limits<acc_t>::infinity());
    for (; i + Vec::size() <= vocab; i += Vec::size()) {
      lanes = at::vec::maximum(lanes, Vec::loadu(z + i));   // propagates NaN
    }
    acc_t values[Vec::size()];
    lanes.store(values);
    for (int64_t k = 0; k < Vec::size(); ++k) best = nan_max(best, values[k]);
  }
  for (; i < vocab; ++i) best = nan_max(best, z[i]);
  return best;
}

// Pass A: log-softmax of z / T at `id`, the logsumexp and (if `with_entropy`) the entropy, from a row `z`
// (accumulator dtype). H = lse − Σ p · (z / T), with p · z taken as 0 where p = 0 (a −inf logit).
template <typename acc_t>
RowScores<acc_t> score_row(const acc_t* z, int64_t vocab, int64_t id, acc_t inv_temperature, bool with_entropy) {
  using Vec = at::vec::Vectorized<acc_t>;
  const acc_t shift = row_max(z, vocab) * inv_temperature;
  const bool exact = !std::isfinite(shift);     // a NaN or ±inf logit: the exact exp, which propagates NaN
  const Vec scale(inv_temperature), shift_vec(shift), zero(acc_t(0));
  double total = 0.0, weighted = 0.0;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t stop = std::min(vocab, start + kBlock);
    Vec sum_lanes(acc_t(0)), weighted_lanes(acc_t(0));
    int64_t i = start;
    for (; i + Vec::size() <= stop; i += Vec::size()) {
      const Vec scaled = Vec::loadu(z + i) * scale;
      const Vec e = exact ? (scaled - shift_vec).exp() : fast_exp(scaled - shift_vec);
      sum_lanes = sum_lanes + e;
      if (with_entropy) {
        weighted_lanes = weighted_lanes + Vec::blendv(zero, e * scaled, e > zero);
      }
    }
    acc_t sums[Vec::size()], weights[Vec::size()];
    sum_lanes.store(sums);
    weighted_lanes.store(weights);
    for (int64_t k = 0; k < Vec::size(); ++k) {
      total += sums[k];
      weighted += weights[k];
    }
    for (; i < stop; ++i) {
      const acc_t scaled = z[i] * inv_temperature;
      const acc_t e = std::exp(scaled - shift);
      total += e;
      if (with_entropy && e > 0) weighted += e * scaled;
    }
  }
  RowScores<acc_t> scores;
  scores.lse = shift + static_cast<acc_t>(std::log(total));
  scores.logp = z[id] * inv_temperature - scores.lse;
  scores.entropy = with_entropy ? scores.lse - static_cast<acc_t>(weighted / total) : acc_t(0);
  return scores;
}

// Pass C: out = (coef · (onehot(id) − p) − entropy_coef · p (log p + H)) / T for a row `z` (accumulator dtype),
// written to `out` (scalar_t). `out` may be the memory z was read from (in place: each vector is loaded before
// it is stored, and z[id] is saved first). Reduced-precision outputs go through `scratch` (kBlock elements).
template <typename acc_t, typename scalar_t>
void gradient_row(const acc_t* z, scalar_t* out, int64_t vocab, int64_t id, acc_t inv_temperature, acc_t lse,
                  acc_t coef, acc_t entropy_coef, acc_t entropy, bool with_entropy, acc_t* scratch) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr bool direct = std::is_same_v<acc_t, scalar_t>;
  const acc_t z_id = z[id];
  const bool exact = !std::isfinite(lse);      // NaN/inf rows: the exact exp, which propagates NaN
  const Vec scale(inv_temperature), lse_vec(lse), minus_coef(-coef), zero(acc_t(0));
  const Vec entropy_vec(entropy), minus_entropy_coef(-entropy_coef);
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t stop = std::min(vocab, start + kBlock);
    int64_t i = start;
    for (; i + Vec::size() <= stop; i += Vec::size()) {
      const Vec log_p = Vec::loadu(z + i) * scale - lse_vec;
      const Vec p = exact ? log_p.exp() : fast_exp(log_p);
      Vec gradient = minus_coef * p;
      if (with_entropy) {
        gradient = gradient + Vec::blendv(zero, minus_entropy_coef * p * (log_p + entropy_vec), p > zero);
      }
      if constexpr (direct) {
        (gradient * scale).store(out + i);
      } else {
        (gradient * scale).store(scratch + (i - start));
      }
    }
    for (; i < stop; ++i) {
      const acc_t log_p = z[i] * inv_temperature - lse;
      const acc_t p = std::exp(log_p);
      acc_t gradient = -coef * p;
      if (with_entropy && p > 0) gradient -= entropy_coef * p * (log_p + entropy);
      if constexpr (direct) {
        out[i] = gradient * inv_temperature;
      } else {
        scratch[i - start] = gradient * inv_temperature;
      }
    }
    if constexpr (!direct) at::vec::convert(scratch, out + start, stop - start);
  }
  // the onehot term at the target, from the saved logit (the row may have been overwritten)
  const acc_t log_p = z_id * inv_temperature - lse;
  const acc_t p = std::exp(log_p);
  acc_t gradient = coef - coef * p;
  if (with_entropy && p > 0) gradient -= entropy_coef * p * (log_p + entropy);
  out[id] = static_cast<scalar_t>(gradient * inv_temperature);
}

}  // namespace sgrpo_native
