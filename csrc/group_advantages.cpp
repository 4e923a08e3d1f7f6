// Group-relative sentence advantages on CPU (reference.group_sentence_advantages): one task per group of
// `group_size` consecutive answers, sums in double, arithmetic in fp32 for fp16/bf16 rewards (fp64 for fp64), the
// result in the dtype of the rewards. With answer_mix = a != 0 each sentence's advantage is mixed with its answer's
// (reference.answer_advantages: the answer's mean sentence reward normalised over the answers of the group). With
// split_final the last sentence of every answer is normalised among the group's last sentences and every other
// sentence among the group's other sentences (two pools, each with its own mean and spread).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace sgrpo_native {
namespace {

at::Tensor group_advantages(const at::Tensor& rewards_in, const at::Tensor& num_sentences_in, int64_t group_size,
                            double eps, bool output_weighting, int64_t scale_code, bool cumulative,
                            double answer_mix, bool split_final) {
  TORCH_CHECK(rewards_in.dim() == 2 && rewards_in.device().is_cpu(), "rewards must be a CPU tensor [B, S_max]");
  const at::Tensor rewards = rewards_in.contiguous();
  const at::Tensor counts = num_sentences_in.to(at::kLong).contiguous();
  const int64_t batch = rewards.size(0), slots = rewards.size(1);
  TORCH_CHECK(group_size > 0 && batch % group_size == 0, "group_size must divide the batch");
  at::Tensor advantages = at::zeros_like(rewards);
  if (batch == 0 || slots == 0) return advantages;
  const int64_t* n = counts.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "sgrpo_group_advantages", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* r = rewards.data_ptr<scalar_t>();
    scalar_t* out = advantages.data_ptr<scalar_t>();
    at::parallel_for(0, batch / group_size, 1, [&](int64_t begin, int64_t end) {
      for (int64_t group = begin; group < end; ++group) {
        const int64_t first = group * group_size, last = first + group_size;
        auto exists = [&](int64_t row, int64_t s) { return s < n[row]; };
        // shift by the group's largest reward: the statistics are shift-invariant, and equal rewards then
        // centre to exactly 0 (a NaN or an empty group: no shift)
        T shift = -std::numeric_limits<T>::infinity();
        bool nan = false;
        for (int64_t row = first; row < last; ++row) {
          for (int64_t s = 0; s < slots; ++s) {
            if (!exists(row, s)) continue;
            const T value = static_cast<T>(r[row * slots + s]);
            nan |= std::isnan(value);
            shift = std::max(shift, value);
          }
        }
        if (nan || !std::isfinite(shift)) shift = T(0);
        // pool 1: an answer's last sentence under split_final; pool 0: every other existing sentence
        auto pool = [&](int64_t row, int64_t s) -> int { return split_final && s == n[row] - 1 ? 1 : 0; };
        auto members = [&](int64_t row, int p) -> int64_t {     // sentences of the row in pool p
          const int64_t count = std::min(n[row], slots);
          if (!split_final) return p == 0 ? count : 0;
          return p == 1 ? (count > 0 ? 1 : 0) : std::max<int64_t>(count - 1, 0);
        };
        auto weight = [&](int64_t row, int64_t s) -> T {
          if (!exists(row, s)) return T(0);
          return output_weighting ? T(1) / static_cast<T>(std::max<int64_t>(members(row, pool(row, s)), 1)) : T(1);
        };
        auto value = [&](int64_t row, int64_t s) -> T {
          return exists(row, s) ? static_cast<T>(r[row * slots + s]) - shift : T(0);
        };
        T mean[2] = {T(0), T(0)}, scale[2] = {T(1), T(1)};
        for (int p = 0; p < (split_final ? 2 : 1); ++p) {
          double total = 0, weighted = 0;
          for (int64_t row = first; row < last; ++row) {
            for (int64_t s = 0; s < slots; ++s) {
              if (pool(row, s) != p) continue;
              total += weight(row, s);
              weighted += static_cast<double>(weight(row, s) * value(row, s));
            }
          }
          const T total_weight = static_cast<T>(std::max(total, 1.0));
          mean[p] = static_cast<T>(weighted) / total_weight;
          if (scale_code != 0) {     // 1: the standard deviation, 2: with Bessel's correction
            double spread = 0;
            for (int64_t row = first; row < last; ++row) {
              for (int64_t s = 0; s < slots; ++s) {
                if (pool(row, s) != p) continue;
                const T centered = value(row, s) - mean[p];
                spread += static_cast<double>(weight(row, s) * centered * centered);
              }
            }
            const T count = scale_code == 2 ? std::max(total_weight - T(1), T(1)) : total_weight;
            scale[p] = std::sqrt(static_cast<T>(spread) / count) + static_cast<T>(eps);
          }
        }
        // the answer level: each answer's mean sentence reward, centred and scaled over the answers with a sentence
        auto row_mean = [&](int64_t row) -> T {
          double sum = 0;
          for (int64_t s = 0; s < std::min(n[row], slots); ++s) sum += static_cast<double>(r[row * slots + s]);
          return static_cast<T>(sum) / static_cast<T>(std::max<int64_t>(n[row], 1));
        };
        T answer_shift = T(0), answer_mean = T(0), answer_scale = T(1);
        if (answer_mix != 0) {
          T largest = -std::numeric_limits<T>::infinity();
          bool answer_nan = false;
          double answers = 0, answer_sum = 0, answer_spread = 0;
          for (int64_t row = first; row < last; ++row) {
            if (n[row] <= 0) continue;
            const T mean_reward = row_mean(row);
            answer_nan |= std::isnan(mean_reward);
            largest = std::max(largest, mean_reward);
            answers += 1;
          }
          if (!answer_nan && std::isfinite(largest)) answer_shift = largest;
          for (int64_t row = first; row < last; ++row) {
            if (n[row] > 0) answer_sum += static_cast<double>(row_mean(row) - answer_shift);
          }
          const T answer_total = static_cast<T>(std::max(answers, 1.0));
          answer_mean = static_cast<T>(answer_sum) / answer_total;
          if (scale_code != 0) {
            for (int64_t row = first; row < last; ++row) {
              if (n[row] <= 0) continue;
              const T centered = row_mean(row) - answer_shift - answer_mean;
              answer_spread += static_cast<double>(centered * centered);
            }
            const T count = scale_code == 2 ? std::max(answer_total - T(1), T(1)) : answer_total;
            answer_scale = std::sqrt(static_cast<T>(answer_spread) / count) + static_cast<T>(eps);
          }
        }
        const T keep = static_cast<T>(1.0 - answer_mix), mix = static_cast<T>(answer_mix);
        for (int64_t row = first; row < last; ++row) {
          const T answer_advantage =
              answer_mix != 0 && n[row] > 0 ? (row_mean(row) - answer_shift - answer_mean) / answer_scale : T(0);
          T running = T(0);
          for (int64_t s = slots - 1; s >= 0; --s) {     // cumulative: the sum from s to the answer's end
            const int p = pool(row, s);
            T advantage = exists(row, s) ? (value(row, s) - mean[p]) / scale[p] : T(0);
            if (cumulative) {
              running += advantage;
              advantage = exists(row, s) ? running : T(0);
            }
            if (answer_mix != 0 && exists(row, s)) advantage = keep * advantage + mix * answer_advantage;
            out[row * slots + s] = static_cast<scalar_t>(advantage);
          }
        }
      }
    });
  });
  return advantages;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sgrpo_native, m) {
  m.def("group_advantages(Tensor rewards, Tensor num_sentences, int group_size, float eps, bool output_weighting, "
        "int scale_code, bool cumulative, float answer_mix=0.0, bool split_final=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(sgrpo_native, CPU, m) {
  m.impl("group_advantages", &group_advantages);
}

}  // namespace sgrpo_native
