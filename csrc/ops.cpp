// The native backend's operators: pass A (token_scores_) and pass C (logits_gradient_) on CPU tensors,
// registered with torch.library (namespace sgrpo_native) so torch.compile sees them like any operator.
// Rows of [B, T, V] logits are addressed by their two strides (logits[:, :-1] works without a copy) with
// int64 offsets; the vocabulary must be contiguous. fp32/bf16/fp16 accumulate in fp32, fp64 in fp64.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "row_kernels.h"

namespace sgrpo_native {
namespace {

// Rows per task of at::parallel_for: a row is V elements (tens of thousands), so a few rows are enough work.
int64_t grain_for(int64_t vocab) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(vocab, 1));
}

// A fresh gradient buffer is hundreds of MB that the kernel faults in page by page on first write (4 KiB pages
// cost here about as much as writing the data twice). Asking for transparent huge pages on it makes those faults
// 512 times fewer; advisory only, harmless on memory already in use or where THP is off.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < int64_t(4 * kHuge)) return;
  const uintptr_t start = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t stop = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (stop > start) madvise(reinterpret_cast<void*>(start), stop - start, MADV_HUGEPAGE);
#endif
}

void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.device().is_cpu(), name, " must be a CPU tensor for the native backend");
  TORCH_CHECK(logits.dim() == 3, name, " must have shape [B, T, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(2) <= 1 || logits.stride(2) == 1, name,
              " must be contiguous along the vocabulary (last) dimension");
}

void token_scores_(const at::Tensor& logits, const at::Tensor& ids, const std::optional<at::Tensor>& rows,
                   double temperature, at::Tensor& logp, at::Tensor& lse, std::optional<at::Tensor> entropy) {
  check_logits(logits, "logits");
  const int64_t length = logits.size(1), vocab = logits.size(2);
  const int64_t batch_stride = logits.stride(0), time_stride = logits.stride(1);
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous(), "ids must be contiguous int64");
  TORCH_CHECK(logp.is_contiguous() && lse.is_contiguous(), "outputs must be contiguous");
  const bool with_entropy = entropy.has_value();
  const int64_t count = rows.has_value() ? rows->numel() : logits.size(0) * length;
  if (count == 0) return;
  const int64_t* row_index = rows.has_value() ? rows->data_ptr<int64_t>() : nullptr;
  const int64_t* id_data = ids.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sgrpo_token_scores", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* base = logits.data_ptr<scalar_t>();
    acc_t* logp_data = logp.data_ptr<acc_t>();
    acc_t* lse_data = lse.data_ptr<acc_t>();
    acc_t* entropy_data = with_entropy ? entropy->data_ptr<acc_t>() : nullptr;
    const acc_t inv_temperature = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, count, grain_for(vocab), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t row = row_index ? row_index[k] : k;
        const scalar_t* z = base + (row / length) * batch_stride + (row % length) * time_stride;
        const auto scores = score_row<acc_t>(z, vocab, id_data[row], inv_temperature, with_entropy);
        logp_data[row] = scores.logp;
        lse_data[row] = scores.lse;
        if (with_entropy) entropy_data[row] = scores.entropy;
      }
    });
  });
}

void logits_gradient_(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& logp_coef,
                      const at::Tensor& lse, double temperature, at::Tensor& out,
                      const std::optional<at::Tensor>& entropy_coef, const std::optional<at::Tensor>& entropy) {
  check_logits(logits, "logits");
  check_logits(out, "out");
  TORCH_CHECK(out.sizes() == logits.sizes() && out.scalar_type() == logits.scalar_type(),
              "out must match logits in shape and dtype");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous(), "ids must be contiguous int64");
  const int64_t length = logits.size(1), vocab = logits.size(2), count = logits.size(0) * length;
  if (count == 0) return;
  const bool with_entropy = entropy_coef.has_value();
  const int64_t* id_data = ids.data_ptr<int64_t>();
  if (!out.is_same(logits) && out.is_contiguous()) advise_huge_pages(out.data_ptr(), out.nbytes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sgrpo_logits_gradient", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* base = logits.data_ptr<scalar_t>();
    scalar_t* out_base = out.data_ptr<scalar_t>();
    const acc_t* coef_data = logp_coef.data_ptr<acc_t>();
    const acc_t* lse_data = lse.data_ptr<acc_t>();
    const acc_t* entropy_coef_data = with_entropy ? entropy_coef->data_ptr<acc_t>() : nullptr;
    const acc_t* entropy_data = with_entropy ? entropy->data_ptr<acc_t>() : nullptr;
    const acc_t inv_temperature = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, count, grain_for(vocab), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t offset = (row / length) * logits.stride(0) + (row % length) * logits.stride(1);
        scalar_t* destination = out_base + (row / length) * out.stride(0) + (row % length) * out.stride(1);
        const acc_t coef = coef_data[row];
        const acc_t bonus = with_entropy ? entropy_coef_data[row] : acc_t(0);
        if (coef == acc_t(0) && bonus == acc_t(0)) {     // rows without a coefficient get zeros
          std::fill(destination, destination + vocab, scalar_t(0));
          continue;
        }
        gradient_row<acc_t>(base + offset, destination, vocab, id_data[row], inv_temperature, lse_data[row], coef,
                            bonus, with_entropy ? entropy_data[row] : acc_t(0), with_entropy);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY(sgrpo_native, m) {
  m.def("token_scores_(Tensor logits, Tensor ids, Tensor? rows, float temperature, Tensor(a!) logp, "
        "Tensor(b!) lse, Tensor(c!)? entropy) -> ()");
  m.def("logits_gradient_(Tensor logits, Tensor ids, Tensor logp_coef, Tensor lse, float temperature, "
        "Tensor(a!) out, Tensor? entropy_coef, Tensor? entropy) -> ()");
}

TORCH_LIBRARY_IMPL(sgrpo_native, CPU, m) {
  m.impl("token_scores_", &token_scores_);
  m.impl("logits_gradient_", &logits_gradient_);
}

}  // namespace sgrpo_native
