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

// exp of a vector, as accurate as the logits need: the 1-ulp exp for fp64; for fp32 PyTorch's exp_u20 (a
// degree-5 polynomial, what its own CPU softmax uses; measured here at most 3.7e-7 relative error above
// exp(-80), twice as fast as Sleef's exp); for bf16/fp16 logits (`reduced`) its fexp_u20 (degree 3, at most
// 1.1e-4 relative, below half an fp16 ulp and 70 times below a bf16 ulp). The polynomials do not propagate NaN:
// callers take the exact exp for rows whose maximum (pass A) or lse (pass C) is not finite, so that a NaN or
// +inf logit gives NaN results as in the other backends.
template <typename acc_t, bool reduced>
at::vec::Vectorized<acc_t> fast_exp(const at::vec::Vectorized<acc_t>& x) {
  if constexpr (!std::is_same_v<acc_t, float>) {
    return x.exp();
  } else if constexpr (reduced) {
    return x.fexp_u20();
  } else {
    return x.exp_u20();
  }
}

template <typename acc_t>
acc_t nan_max(acc_t a, acc_t b) {
  return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<acc_t>::quiet_NaN() : (a > b ? a : b);
}

// One vector of the accumulator dtype from Vectorized<acc_t>::size() elements at `z` (bf16/fp16 are widened in
// registers: the row is never copied to an fp32 buffer).
template <typename acc_t, typename scalar_t>
at::vec::Vectorized<acc_t> load_acc(const scalar_t* z) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return at::vec::Vectorized<acc_t>::loadu(z);
  } else {
    at::vec::Vectorized<float> out;
    at::vec::load_to_float(z, out);
    return out;
  }
}

// max_i z_i of a row, NaN if any element is NaN.
template <typename acc_t, typename scalar_t>
acc_t row_max(const scalar_t* z, int64_t vocab) {
  using Vec = at::vec::Vectorized<acc_t>;
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  int64_t i = 0;
  if (vocab >= Vec::size()) {
    Vec lanes(-std::numeric_limits<acc_t>::infinity());
    for (; i + Vec::size() <= vocab; i += Vec::size()) {
      lanes = at::vec::maximum(lanes, load_acc<acc_t>(z + i));   // propagates NaN
    }
    acc_t values[Vec::size()];
    lanes.store(values);
    for (int64_t k = 0; k < Vec::size(); ++k) best = nan_max(best, values[k]);
  }
  for (; i < vocab; ++i) best = nan_max(best, static_cast<acc_t>(z[i]));
  return best;
}

// Pass A: log-softmax of z / T at `id`, the logsumexp and (if `with_entropy`) the entropy, from a row `z`
// (accumulator dtype). With a = z / T − m (m the row's maximum of z / T) and e = exp(a):
// lse = m + log Σ e, H = log Σ e − Σ e · a / Σ e, with e · a taken as 0 where e = 0 (a −inf logit).
template <typename acc_t, typename scalar_t>
RowScores<acc_t> score_row(const scalar_t* z, int64_t vocab, int64_t id, acc_t inv_temperature, bool with_entropy) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr bool reduced = !std::is_same_v<scalar_t, acc_t>;
  const acc_t shift = row_max<acc_t>(z, vocab) * inv_temperature;
  const bool exact = !std::isfinite(shift);     // a NaN or ±inf logit: the exact exp, which propagates NaN
  const Vec scale(inv_temperature), minus_shift(-shift), zero(acc_t(0));
  double total = 0.0, weighted = 0.0;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t stop = std::min(vocab, start + kBlock);
    Vec sum_lanes(acc_t(0)), weighted_lanes(acc_t(0));
    int64_t i = start;
    for (; i + Vec::size() <= stop; i += Vec::size()) {
      const Vec shifted = at::vec::fmadd(load_acc<acc_t>(z + i), scale, minus_shift);
      const Vec e = exact ? shifted.exp() : fast_exp<acc_t, reduced>(shifted);
      sum_lanes = sum_lanes + e;
      if (with_entropy) {
        weighted_lanes = weighted_lanes + Vec::blendv(zero, e * shifted, e > zero);
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
      const acc_t shifted = static_cast<acc_t>(z[i]) * inv_temperature - shift;
      const acc_t e = std::exp(shifted);
      total += e;
      if (with_entropy && e > 0) weighted += e * shifted;
    }
  }
  RowScores<acc_t> scores;
  const double log_total = std::log(total);
  scores.lse = shift + static_cast<acc_t>(log_total);
  scores.logp = static_cast<acc_t>(z[id]) * inv_temperature - scores.lse;
  // a NaN row stays NaN (shift is NaN there, and the sums with it)
  scores.entropy = with_entropy ? static_cast<acc_t>(log_total - weighted / total) + (shift - shift) : acc_t(0);
  return scores;
}

// Pass C: out = (coef · (onehot(id) − p) − entropy_coef · p (log p + H)) / T for a row `z`, written to `out` (same
// dtype). `out` may be the memory z was read from (in place: each vector is loaded before it is stored, and z[id]
// is saved first). bf16/fp16 rows are widened in registers and narrowed a block at a time.
template <typename acc_t, typename scalar_t>
void gradient_row(const scalar_t* z, scalar_t* out, int64_t vocab, int64_t id, acc_t inv_temperature, acc_t lse,
                  acc_t coef, acc_t entropy_coef, acc_t entropy, bool with_entropy) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr bool reduced = !std::is_same_v<acc_t, scalar_t>;
  const acc_t z_id = static_cast<acc_t>(z[id]);
  const bool exact = !std::isfinite(lse);      // NaN/inf rows: the exact exp, which propagates NaN
  const Vec scale(inv_temperature), minus_lse(-lse), minus_coef(-coef), zero(acc_t(0));
  const Vec entropy_vec(entropy), minus_entropy_coef(-entropy_coef);
  auto gradient_of = [&](const Vec& logits) {
    const Vec log_p = at::vec::fmadd(logits, scale, minus_lse);
    const Vec p = exact ? log_p.exp() : fast_exp<acc_t, reduced>(log_p);
    Vec gradient = minus_coef * p;
    if (with_entropy) {
      gradient = gradient + Vec::blendv(zero, minus_entropy_coef * p * (log_p + entropy_vec), p > zero);
    }
    return gradient * scale;
  };
  // reduced outputs: a block of fp32 gradients in `scratch` (L1), then narrowed in one pass: faster here than
  // narrowing two vectors at a time inside the exp loop
  alignas(64) acc_t scratch[reduced ? kBlock : 1];
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t stop = std::min(vocab, start + kBlock);
    int64_t i = start;
    for (; i + Vec::size() <= stop; i += Vec::size()) {
      const Vec gradient = gradient_of(load_acc<acc_t>(z + i));
      if constexpr (reduced) {
        gradient.store(scratch + (i - start));
      } else {
        gradient.store(out + i);
      }
    }
    for (; i < stop; ++i) {
      const acc_t log_p = static_cast<acc_t>(z[i]) * inv_temperature - lse;
      const acc_t p = std::exp(log_p);
      acc_t gradient = -coef * p;
      if (with_entropy && p > 0) gradient -= entropy_coef * p * (log_p + entropy);
      if constexpr (reduced) {
        scratch[i - start] = gradient * inv_temperature;
      } else {
        out[i] = gradient * inv_temperature;
      }
    }
    if constexpr (reduced) at::vec::convert(scratch, out + start, stop - start);
  }
  // the onehot term at the target, from the saved logit (the row may have been overwritten)
  const acc_t log_p = z_id * inv_temperature - lse;
  const acc_t p = std::exp(log_p);
  acc_t gradient = coef - coef * p;
  if (with_entropy && p > 0) gradient -= entropy_coef * p * (log_p + entropy);
  out[id] = static_cast<scalar_t>(gradient * inv_temperature);
}

}  // namespace sgrpo_native
