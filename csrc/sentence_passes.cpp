// Pass B of the native backend: per-sentence sums over the tokens, the per-sentence terms of every objective,
// and the per-token coefficient c_t = ∂loss/∂logp_t. The same arithmetic as ops/torch/passes.py (the tests hold
// both to reference.py); here as three loops over tokens or sentence slots instead of a few dozen ATen ops.
// Float inputs are flat contiguous tensors in the accumulator dtype (fp32, or fp64 for fp64 logits); the
// per-sentence sums are fp64. Token loops run serially so that sums do not depend on thread timing.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>

namespace sgrpo_native {
namespace {

enum Objective : int64_t { kPpoClip = 0, kCispo = 1, kSapo = 2, kGeoMean = 3, kVespo = 4 };
enum KlEstimator : int64_t { kK3 = 0, kK1 = 1, kK2 = 2, kAbs = 3 };

constexpr double kVespoMinLogWeight = -18.420680743952367;   // log(1e-8), TRL's lower bound of VESPO's log w

template <typename T>
const T* optional_data(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? tensor->data_ptr<T>() : nullptr;
}

template <typename T>
T* optional_mutable(std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? tensor->data_ptr<T>() : nullptr;
}

// NaN-propagating min / max / clamp (torch.minimum, torch.maximum, torch.clamp).
template <typename T>
T nan_min(T a, T b) { return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<T>::quiet_NaN() : std::min(a, b); }
template <typename T>
T nan_max(T a, T b) { return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<T>::quiet_NaN() : std::max(a, b); }
template <typename T>
T clamp(T x, T low, T high) { return std::isnan(x) ? x : std::min(std::max(x, low), high); }

// reference.k3: e^x − x − 1 cancels near 0 (fp32: 0 or ±1.2e-7 for 5e-9 at |x| = 1e-4), so below |x| = 1/2
// its Taylor series x² Σ_j x^j / (j + 2)! to x¹⁷ in Horner form (below fp64 rounding there), expm1(x) − x beyond.
constexpr double kK3Series[16] = {1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320,
                                  1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600,
                                  1.0 / 6227020800.0, 1.0 / 87178291200.0, 1.0 / 1307674368000.0,
                                  1.0 / 20922789888000.0, 1.0 / 355687428096000.0};   // 1/k!, k = 2 .. 17

template <typename T>
T k3(T x) {
  if (!(std::abs(x) < T(0.5))) return std::expm1(x) - x;     // and NaN
  T series = T(0);
  for (int j = 15; j >= 0; --j) series = series * x + static_cast<T>(kK3Series[j]);
  return x * x * series;
}

template <typename T>
T kl_value(T x, int64_t estimator) {          // reference.kl_estimate at x = ref − logp
  switch (estimator) {
    case kK1: return -x;
    case kK2: return T(0.5) * x * x;
    case kAbs: return std::abs(x);
    default: return k3(x);
  }
}

template <typename T>
T kl_slope(T x, int64_t estimator) {          // ∂kl/∂logp
  switch (estimator) {
    case kK1: return T(1);
    case kK2: return -x;
    case kAbs: return x > 0 ? T(-1) : (x < 0 ? T(1) : T(0));
    default: return -std::expm1(x);           // 1 − e^x, without its cancellation near 0
  }
}

// geo_mean's clip of a token log-ratio by the sign of its sentence's advantage; returns (kept, clipped).
template <typename T>
std::pair<T, bool> geo_clip(T delta, T advantage, T eps_low, T eps_high) {
  const T upper = delta > eps_high ? eps_high : delta;
  const T lower = delta < -eps_low ? -eps_low : delta;
  const T kept = advantage > 0 ? upper : (advantage < 0 ? lower : T(0));
  const bool clipped = (advantage > 0 && delta > eps_high) || (advantage < 0 && delta < -eps_low);
  return {kept, clipped};
}

// The listed tokens (all when `tokens` is absent) that are scored: calls visit(list_position, token, slot).
template <typename Visit>
void for_scored_tokens(const int64_t* segments, const int64_t* tokens, int64_t count, int64_t length,
                       int64_t num_slots, Visit visit) {
  for (int64_t k = 0; k < count; ++k) {
    const int64_t token = tokens ? tokens[k] : k;
    const int64_t segment = segments[token];
    if (segment >= 0) visit(k, token, (token / length) * num_slots + segment);
  }
}

void sentence_sums_(const at::Tensor& logp, const std::optional<at::Tensor>& old, const std::optional<at::Tensor>& ref,
                    const std::optional<at::Tensor>& weights, const at::Tensor& segment_ids,
                    const std::optional<at::Tensor>& tokens, int64_t num_slots, int64_t length, int64_t kl_estimator,
                    const std::optional<at::Tensor>& advantages, bool row_advantages, double eps_low, double eps_high,
                    at::Tensor& log_ratio, std::optional<at::Tensor> kl, std::optional<at::Tensor> logp_sum,
                    std::optional<at::Tensor> weight_sum, std::optional<at::Tensor> clipped_log_ratio,
                    std::optional<at::Tensor> clipped_tokens) {
  const int64_t count = tokens.has_value() ? tokens->numel() : segment_ids.numel();
  AT_DISPATCH_FLOATING_TYPES(logp.scalar_type(), "sgrpo_sentence_sums", [&] {
    const scalar_t *logp_data = logp.data_ptr<scalar_t>(), *old_data = optional_data<scalar_t>(old);
    const scalar_t *ref_data = optional_data<scalar_t>(ref), *weight_data = optional_data<scalar_t>(weights);
    const scalar_t* advantage_data = optional_data<scalar_t>(advantages);
    double *ratio_out = log_ratio.data_ptr<double>(), *kl_out = optional_mutable<double>(kl);
    double *logp_out = optional_mutable<double>(logp_sum), *weight_out = optional_mutable<double>(weight_sum);
    double *geo_out = optional_mutable<double>(clipped_log_ratio), *clip_out = optional_mutable<double>(clipped_tokens);
    const scalar_t low = static_cast<scalar_t>(eps_low), high = static_cast<scalar_t>(eps_high);
    for_scored_tokens(segment_ids.data_ptr<int64_t>(), optional_data<int64_t>(tokens), count, length, num_slots,
                      [&](int64_t, int64_t token, int64_t slot) {
      const scalar_t value = logp_data[token];
      if (old_data) {
        const scalar_t delta = value - old_data[token];
        ratio_out[slot] += static_cast<double>(delta);
        if (geo_out && advantage_data) {
          const auto [kept, clipped] = geo_clip(delta, advantage_data[row_advantages ? slot / num_slots : slot],
                                                low, high);
          geo_out[slot] += static_cast<double>(kept);
          clip_out[slot] += clipped ? 1.0 : 0.0;
        }
      }
      if (kl_out) kl_out[slot] += static_cast<double>(kl_value<scalar_t>(ref_data[token] - value, kl_estimator));
      const scalar_t weight = weight_data ? weight_data[token] : scalar_t(1);
      if (logp_out) logp_out[slot] += static_cast<double>(weight_data ? weight * value : value);
      if (weight_out) weight_out[slot] += static_cast<double>(weight);
    });
  });
}

struct TermOptions {
  int64_t objective, num_slots;
  bool row_advantages, ratio_mean, kl_mean, kl_weighted, has_delta, has_dual_clip;
  double eps_low, eps_high, beta, delta, clamp_log_ratio, clip_ratio_c, tau_pos, tau_neg, k_pos, lambda_pos, k_neg,
      lambda_neg;
};

// reference.policy_surrogate (ppo_clip, sapo) and its derivative with respect to log ρ.
template <typename T>
std::pair<T, T> surrogate_and_slope(T ratio, T advantage, const TermOptions& o) {
  if (o.objective == kSapo) {
    const T tau = static_cast<T>(advantage > 0 ? o.tau_pos : o.tau_neg);
    const T gate = T(1) / (T(1) + std::exp(-tau * (ratio - T(1))));
    return {gate * T(4) / tau * advantage, T(4) * gate * (T(1) - gate) * ratio * advantage};
  }
  T unclipped = ratio, unclipped_slope = ratio;
  if (o.has_delta) {
    const T delta = static_cast<T>(o.delta);
    unclipped = nan_min(ratio, delta);
    unclipped_slope = ratio <= delta ? ratio : T(0);
  }
  const T low = static_cast<T>(1 - o.eps_low), high = static_cast<T>(1 + o.eps_high);
  const T clipped = clamp(ratio, low, high);
  const T clipped_slope = (ratio >= low && ratio <= high) ? ratio : T(0);
  const T unclipped_term = unclipped * advantage, clipped_term = clipped * advantage;
  T surrogate = nan_min(unclipped_term, clipped_term);
  T slope = (unclipped_term < clipped_term ? unclipped_slope
             : unclipped_term > clipped_term ? clipped_slope
                                             : T(0.5) * (unclipped_slope + clipped_slope)) * advantage;
  if (o.has_dual_clip && advantage < 0) {      // where Â < 0: max(surrogate, c · Â)
    const T floor = static_cast<T>(o.clip_ratio_c) * advantage;
    slope = surrogate > floor ? slope : (surrogate < floor ? T(0) : T(0.5) * slope);
    surrogate = nan_max(surrogate, floor);
  }
  return {surrogate, slope};
}

template <typename T>
T vespo_weight(T log_ratio_sum, T log_is, T advantage, const TermOptions& o) {
  const T log_w = clamp(log_ratio_sum + log_is, static_cast<T>(kVespoMinLogWeight), static_cast<T>(o.clamp_log_ratio));
  const bool positive = advantage >= 0;
  const T k = static_cast<T>(positive ? o.k_pos : o.k_neg), lambda = static_cast<T>(positive ? o.lambda_pos : o.lambda_neg);
  const T phi = std::exp(lambda + k * log_w - lambda * std::exp(log_w));
  return std::isfinite(phi) ? phi : T(0);
}

void sentence_terms_(const at::Tensor& count, const at::Tensor& layout_weight, const at::Tensor& log_ratio_sum,
                     const std::optional<at::Tensor>& kl_sum, const std::optional<at::Tensor>& logp_sum,
                     const std::optional<at::Tensor>& weight_sum, const std::optional<at::Tensor>& clipped_log_ratio,
                     const std::optional<at::Tensor>& log_is, const at::Tensor& advantages, int64_t objective,
                     int64_t num_slots, bool row_advantages, bool ratio_mean, bool kl_mean, bool kl_weighted,
                     bool has_delta, bool has_dual_clip, double eps_low, double eps_high, double beta, double delta,
                     double clamp_log_ratio, double clip_ratio_c, double tau_pos, double tau_neg, double k_pos,
                     double lambda_pos, double k_neg, double lambda_neg, at::Tensor& weighted_loss,
                     at::Tensor& ratio_out, at::Tensor& ratio_coef, std::optional<at::Tensor> kl_coef,
                     std::optional<at::Tensor> weight_coef, std::optional<at::Tensor> clip_coef) {
  const TermOptions o{objective, num_slots, row_advantages, ratio_mean, kl_mean, kl_weighted, has_delta,
                      has_dual_clip, eps_low, eps_high, beta, delta, clamp_log_ratio, clip_ratio_c, tau_pos,
                      tau_neg, k_pos, lambda_pos, k_neg, lambda_neg};
  const int64_t total = count.numel();
  AT_DISPATCH_FLOATING_TYPES(layout_weight.scalar_type(), "sgrpo_sentence_terms", [&] {
    using T = scalar_t;
    const int32_t* counts = count.data_ptr<int32_t>();
    const T *weights = layout_weight.data_ptr<T>(), *advantage_data = advantages.data_ptr<T>();
    const double *ratio_sums = log_ratio_sum.data_ptr<double>(), *kl_sums = optional_data<double>(kl_sum);
    const double *logp_sums = optional_data<double>(logp_sum), *weight_sums = optional_data<double>(weight_sum);
    const double *geo_sums = optional_data<double>(clipped_log_ratio), *log_is_sums = optional_data<double>(log_is);
    T *loss_out = weighted_loss.data_ptr<T>(), *ratios = ratio_out.data_ptr<T>(), *shared_out = ratio_coef.data_ptr<T>();
    T *kl_out = optional_mutable<T>(kl_coef), *weight_out = optional_mutable<T>(weight_coef);
    T* clip_out = optional_mutable<T>(clip_coef);
    const T clamp_value = static_cast<T>(clamp_log_ratio);
    for (int64_t slot = 0; slot < total; ++slot) {
      const bool exists = counts[slot] > 0;
      const T divisor = static_cast<T>(std::max<int32_t>(counts[slot], 1));
      const T w = weights[slot];
      const T raw_log_ratio = static_cast<T>(ratio_sums[slot]);
      const T log_ratio = ratio_mean ? raw_log_ratio / divisor : raw_log_ratio;
      const bool inside = log_ratio >= -clamp_value && log_ratio <= clamp_value;
      const T ratio = std::exp(clamp(log_ratio, -clamp_value, clamp_value));
      const T advantage = exists ? advantage_data[row_advantages ? slot / num_slots : slot] : T(0);
      T per_token_slope = inside ? T(1) : T(0);
      if (ratio_mean) per_token_slope /= divisor;
      const bool has_mean_weight = weight_sums != nullptr;
      const T mean_weight = has_mean_weight ? static_cast<T>(weight_sums[slot]) / divisor : T(1);
      T loss, shared = T(0);
      if (objective == kCispo || objective == kVespo) {     // −sg(weight) · Â · mean_t q_t logp_t
        const T weight = objective == kCispo
            ? nan_min(ratio, static_cast<T>(eps_high))
            : vespo_weight(raw_log_ratio, log_is_sums ? static_cast<T>(log_is_sums[slot]) : T(0), advantage, o);
        loss = -weight * advantage * static_cast<T>(logp_sums[slot]) / divisor;
        weight_out[slot] = exists ? w * -weight * advantage / divisor : T(0);
      } else if (objective == kGeoMean) {                   // −Â · ρ_clip · mean_t q_t
        T geo_log_ratio = static_cast<T>(geo_sums[slot]), geo_slope = T(1);
        if (ratio_mean) {
          geo_log_ratio /= divisor;
          geo_slope /= divisor;
        }
        if (!(geo_log_ratio >= -clamp_value && geo_log_ratio <= clamp_value)) geo_slope = T(0);
        loss = -advantage * std::exp(clamp(geo_log_ratio, -clamp_value, clamp_value));
        if (has_mean_weight) loss *= mean_weight;
        clip_out[slot] = exists ? w * loss * geo_slope : T(0);
      } else {                                              // ℓ(ρ) · mean_t q_t
        const auto [surrogate, slope] = surrogate_and_slope(ratio, advantage, o);
        loss = -surrogate * mean_weight;
        shared = -slope * per_token_slope * mean_weight;
      }
      if (kl_sums) {
        T kl = static_cast<T>(kl_sums[slot]), kl_weight = static_cast<T>(beta);
        if (kl_mean) {
          kl /= divisor;
          kl_weight /= divisor;
        }
        if (kl_weighted) {                                  // β · ρ · KL: the gradient reaches ρ too
          shared += static_cast<T>(beta) * kl * ratio * per_token_slope;
          kl *= ratio;
          kl_weight *= ratio;
        }
        loss += static_cast<T>(beta) * kl;
        kl_out[slot] = exists ? w * kl_weight : T(0);
      }
      loss_out[slot] = exists ? w * loss : T(0);
      ratios[slot] = ratio;
      shared_out[slot] = exists ? w * shared : T(0);
    }
  });
}

void token_coefficients_(const at::Tensor& logp, const std::optional<at::Tensor>& ref,
                         const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& old,
                         const std::optional<at::Tensor>& advantages, bool row_advantages, const at::Tensor& segment_ids,
                         const std::optional<at::Tensor>& tokens, int64_t num_slots, int64_t length,
                         int64_t kl_estimator, double eps_low, double eps_high, const at::Tensor& ratio_coef,
                         const std::optional<at::Tensor>& kl_coef, const std::optional<at::Tensor>& weight_coef,
                         const std::optional<at::Tensor>& clip_coef, at::Tensor& coef) {
  const int64_t count = tokens.has_value() ? tokens->numel() : segment_ids.numel();
  AT_DISPATCH_FLOATING_TYPES(logp.scalar_type(), "sgrpo_token_coefficients", [&] {
    using T = scalar_t;
    const T *logp_data = logp.data_ptr<T>(), *ref_data = optional_data<T>(ref), *weight_data = optional_data<T>(weights);
    const T *old_data = optional_data<T>(old), *advantage_data = optional_data<T>(advantages);
    const T *shared = ratio_coef.data_ptr<T>(), *kl_factor = optional_data<T>(kl_coef);
    const T *weight_factor = optional_data<T>(weight_coef), *clip_factor = optional_data<T>(clip_coef);
    T* out = coef.data_ptr<T>();
    std::fill(out, out + count, T(0));
    const T low = static_cast<T>(eps_low), high = static_cast<T>(eps_high);
    for_scored_tokens(segment_ids.data_ptr<int64_t>(), optional_data<int64_t>(tokens), count, length, num_slots,
                      [&](int64_t position, int64_t token, int64_t slot) {
      T value = shared[slot];
      if (clip_factor) {     // geo_mean: only the tokens its clip left alone (none clipped without old)
        bool clipped = false;
        if (old_data) {
          clipped = geo_clip(logp_data[token] - old_data[token],
                             advantage_data[row_advantages ? slot / num_slots : slot], low, high).second;
        }
        value += clipped ? T(0) : clip_factor[slot];
      }
      if (weight_factor) value += weight_factor[slot] * (weight_data ? weight_data[token] : T(1));
      if (kl_factor) value += kl_factor[slot] * kl_slope<T>(ref_data[token] - logp_data[token], kl_estimator);
      out[position] = value;
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sgrpo_native, m) {
  m.def("sentence_sums_(Tensor logp, Tensor? old, Tensor? ref, Tensor? weights, Tensor segment_ids, Tensor? tokens, "
        "int num_slots, int length, int kl_estimator, Tensor? advantages, bool row_advantages, float eps_low, "
        "float eps_high, Tensor(a!) log_ratio, Tensor(b!)? kl, Tensor(c!)? logp_sum, Tensor(d!)? weight_sum, "
        "Tensor(e!)? clipped_log_ratio, Tensor(f!)? clipped_tokens) -> ()");
  m.def("sentence_terms_(Tensor count, Tensor layout_weight, Tensor log_ratio_sum, Tensor? kl_sum, Tensor? logp_sum, "
        "Tensor? weight_sum, Tensor? clipped_log_ratio, Tensor? log_is, Tensor advantages, int objective, "
        "int num_slots, bool row_advantages, bool ratio_mean, bool kl_mean, bool kl_weighted, bool has_delta, "
        "bool has_dual_clip, float eps_low, float eps_high, float beta, float delta, float clamp_log_ratio, "
        "float clip_ratio_c, float tau_pos, float tau_neg, float k_pos, float lambda_pos, float k_neg, "
        "float lambda_neg, Tensor(a!) weighted_loss, Tensor(b!) ratio, Tensor(c!) ratio_coef, Tensor(d!)? kl_coef, "
        "Tensor(e!)? weight_coef, Tensor(f!)? clip_coef) -> ()");
  m.def("token_coefficients_(Tensor logp, Tensor? ref, Tensor? weights, Tensor? old, Tensor? advantages, "
        "bool row_advantages, Tensor segment_ids, Tensor? tokens, int num_slots, int length, int kl_estimator, "
        "float eps_low, float eps_high, Tensor ratio_coef, Tensor? kl_coef, Tensor? weight_coef, Tensor? clip_coef, "
        "Tensor(a!) coef) -> ()");
}

TORCH_LIBRARY_IMPL(sgrpo_native, CPU, m) {
  m.impl("sentence_sums_", &sentence_sums_);
  m.impl("sentence_terms_", &sentence_terms_);
  m.impl("token_coefficients_", &token_coefficients_);
}

}  // namespace sgrpo_native
