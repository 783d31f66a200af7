// XLA FFI handlers for a convolution's bias, relu and max pooling: max pooling of relu(x + bias)
// over windows that do not overlap (strides equal to the window, no padding), the forward pass
// and the gradient, for NHWC float32 images x and a bias of C.
//
// A convolution's bias, relu and pooling are the tutorial CNN's work between its convolutions.
// XLA:CPU ran each stage's as five loops over the activations (two forward, three backward),
// with few channels innermost (6, 16): about a quarter of the train step at batch 128
// (experiments/README.md). Here the forward pass reads the convolution's output once, and the
// gradient reads it and the pooled gradient once, writes the image's gradient and sums the bias's
// gradient on the way.
// The gradient is JAX's: a window's gradient goes to every element equal to its maximum, shared
// equally between them, and through relu only where x + bias > 0. The bias's gradient is summed
// in an order fixed by the shape and the number of threads, so a run gives the same bits every
// time.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "shares.h"

namespace ffi = xla::ffi;

namespace {

// The loops below are written without branches on the data (a mispredicted branch per element
// made them 6x slower) and over contiguous spans of a row, so the compiler vectorizes them.
inline uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float Select(bool take, float yes, float no) {
  const uint32_t mask = -static_cast<uint32_t>(take);
  const uint32_t bits = (Bits(yes) & mask) | (Bits(no) & ~mask);
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// lax.max: NaN if either is.
inline float Max(float a, float b) { return Select((b > a) | (b != b), b, a); }

struct Geometry {
  int64_t height, width, channels, window_height, window_width;
  int64_t rows() const { return height / window_height; }  // of windows
  int64_t columns() const { return width / window_width; }
  int64_t line() const { return width * channels; }  // one row of pixels
  int64_t span() const { return columns() * window_width * channels; }  // of a line, in windows
  int64_t image() const { return height * line(); }
  int64_t pooled_row() const { return columns() * channels; }
  int64_t pooled() const { return rows() * pooled_row(); }
};

// What one call's rows of windows need besides the image, for each element of a span: its bias,
// its column in its window, and where it reads from when a row of windows is spread over the span
// from the pooled row (columns x channels). And for each pooled element: its window's first
// element in the span, where it is gathered from.
struct Tables {
  std::vector<float> bias, column;
  std::vector<int32_t> spread, gather;
  Tables(const Geometry& g, const float* channel_bias) {
    const int64_t c = g.channels, ww = g.window_width;
    for (int64_t window = 0; window < g.columns(); ++window) {
      for (int64_t k = 0; k < c; ++k) gather.push_back(window * ww * c + k);
      for (int64_t j = 0; j < ww; ++j) {
        for (int64_t k = 0; k < c; ++k) {
          bias.push_back(channel_bias[k]);
          column.push_back(static_cast<float>(j));
          spread.push_back(window * c + k);
        }
      }
    }
  }
};

// to[k] = from[indices[k]]: a gather, one loop whatever the channels.
inline void Take(const float* from, const std::vector<int32_t>& indices, float* to) {
  const int32_t* index = indices.data();
  for (size_t k = 0; k < indices.size(); ++k) to[k] = from[index[k]];
}

// The values at each window's first column of `from` (span()), over all its columns in `to`.
// Shifted loads and selects: the gradient ran 1.1x faster with them than with two more gathers.
void SpreadFirst(const Geometry& g, const Tables& t, const float* from, float* to) {
  const int64_t span = g.span(), c = g.channels;
  const float* column = t.column.data();
  for (int64_t k = 0; k < span; ++k) to[k] = from[k];
  for (int64_t j = 1; j < g.window_width; ++j) {
    const float* shifted = from - j * c;
    const float jf = static_cast<float>(j);
    for (int64_t k = j * c; k < span; ++k) to[k] = Select(column[k] == jf, shifted[k], to[k]);
  }
}

// For row `row` of windows of `image`, each window's maximum of x + bias (before relu), at
// the window's first column in `maxima` (span()). The other elements hold partial maxima.
void RowMaxima(const Geometry& g, const Tables& t, const float* image, int64_t row,
               float* maxima) {
  const int64_t span = g.span(), c = g.channels;
  const float* bias = t.bias.data();
  const float* first = image + row * g.window_height * g.line();
  for (int64_t k = 0; k < span; ++k) maxima[k] = first[k] + bias[k];
  for (int64_t i = 1; i < g.window_height; ++i) {
    const float* line = first + i * g.line();
    for (int64_t k = 0; k < span; ++k) maxima[k] = Max(maxima[k], line[k] + bias[k]);
  }
  // Over columns: after pass j, maxima[k] is the maximum of columns k .. k + j.
  for (int64_t j = 1; j < g.window_width; ++j) {
    for (int64_t k = 0; k + c < span; ++k) maxima[k] = Max(maxima[k], maxima[k + c]);
  }
}

// Compiled for AVX2 too, and picked at load time where the CPU has it: with 8-float vectors the
// tutorial CNN's two poolings ran 1.1x and 1.8x faster, their gradients 1.4x and 2.0x. `flatten`
// compiles the helpers into each version (left as calls, they ran 2-3x slower). No multiply is
// fused, so both versions give the same bits.
#define JAXMODEL_VECTORIZED __attribute__((target_clones("avx2", "default"), flatten))

JAXMODEL_VECTORIZED
void ForwardImage(const Geometry& g, const Tables& t, const float* image, float* pooled) {
  thread_local std::vector<float> maxima;
  maxima.resize(g.span());
  for (int64_t row = 0; row < g.rows(); ++row) {
    float* out = pooled + row * g.pooled_row();
    RowMaxima(g, t, image, row, maxima.data());
    Take(maxima.data(), t.gather, out);
    for (int64_t k = 0; k < g.pooled_row(); ++k) out[k] = Max(out[k], 0.0f);
  }
}

// The gradient of one image, and the bias's gradient added into `bias_grad` (span()).
JAXMODEL_VECTORIZED
void BackwardImage(const Geometry& g, const Tables& t, const float* image,
                   const float* pooled_grad, float* image_grad, float* bias_grad) {
  thread_local std::vector<float> partial, maxima, counts, shares;  // each span()
  const int64_t span = g.span(), c = g.channels;
  const float* bias = t.bias.data();
  for (auto* buffer : {&partial, &maxima, &counts, &shares}) buffer->resize(span);
  for (int64_t row = 0; row < g.rows(); ++row) {
    RowMaxima(g, t, image, row, partial.data());
    SpreadFirst(g, t, partial.data(), maxima.data());
    const float* first = image + row * g.window_height * g.line();
    float* first_grad = image_grad + row * g.window_height * g.line();
    // How many elements of each window equal its maximum (1 unless there are ties): by column,
    // then in all, at the window's first column.
    std::fill(counts.begin(), counts.end(), 0.0f);
    for (int64_t i = 0; i < g.window_height; ++i) {
      const float* line = first + i * g.line();
      for (int64_t k = 0; k < span; ++k) {
        counts[k] += static_cast<float>(line[k] + bias[k] == maxima[k]);
      }
    }
    for (int64_t k = 0; k < span; ++k) partial[k] = counts[k];
    for (int64_t j = 1; j < g.window_width; ++j) {
      for (int64_t k = 0; k + j * c < span; ++k) partial[k] += counts[k + j * c];
    }
    SpreadFirst(g, t, partial.data(), counts.data());
    // Each maximum's share of its window's gradient. relu passes none where the maximum is not
    // above 0.
    Take(pooled_grad + row * g.pooled_row(), t.spread, shares.data());
    for (int64_t k = 0; k < span; ++k) {
      shares[k] = Select(maxima[k] > 0.0f, shares[k] / counts[k], 0.0f);
    }
    for (int64_t i = 0; i < g.window_height; ++i) {
      const float* line = first + i * g.line();
      float* line_grad = first_grad + i * g.line();
      for (int64_t k = 0; k < span; ++k) {
        line_grad[k] = Select(line[k] + bias[k] == maxima[k], shares[k], 0.0f);
        bias_grad[k] += line_grad[k];
      }
      // Columns in no window get no gradient.
      std::fill(line_grad + span, line_grad + g.line(), 0.0f);
    }
  }
  // Nor do rows in no window.
  std::fill(image_grad + g.rows() * g.window_height * g.line(), image_grad + g.image(), 0.0f);
}

// Runs run_image(share, image) for each image of the batch, in `parts` shares of consecutive
// images: on the calling thread when parts is 1, else split over XLA's threads.
template <typename RunImage>
void ForEachImage(int64_t batch, int parts, ffi::ThreadPool& pool, RunImage run_image) {
  auto run_share = [&](int share) {
    for (int64_t image = batch * share / parts; image < batch * (share + 1) / parts; ++image) {
      run_image(share, image);
    }
  };
  jaxmodel::RunShares(pool, parts - 1, parts, run_share);
}

// The number of shares: 1 for `threads` 1, else one per pool thread, at most one per image.
int Parts(int64_t threads, int64_t batch, ffi::ThreadPool& pool) {
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(threads == 0 ? pool.num_threads() : 1, batch)));
}

ffi::Error MakeGeometry(ffi::Span<const int64_t> dims, ffi::Span<const int64_t> window,
                        int64_t bias_size, Geometry& g) {
  if (dims.size() != 4 || window.size() != 2 || window[0] < 1 || window[1] < 1 ||
      bias_size != dims[3]) {
    return ffi::Error::InvalidArgument(
        "pool: expected NHWC images, a bias of C and a 2-D window");
  }
  g = {dims[1], dims[2], dims[3], window[0], window[1]};
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using Ints = ffi::Span<const int64_t>;

ffi::Error Forward(F32 image, F32 bias, ffi::ResultBuffer<ffi::F32> pooled, Ints window,
                   int64_t threads, ffi::ThreadPool pool) {
  Geometry g;
  if (ffi::Error error = MakeGeometry(image.dimensions(), window, bias.element_count(), g);
      error.failure()) {
    return error;
  }
  const int64_t batch = image.dimensions()[0];
  const Tables tables(g, bias.typed_data());
  const float* in = image.typed_data();
  float* out = pooled->typed_data();
  ForEachImage(batch, Parts(threads, batch, pool), pool, [&](int, int64_t i) {
    ForwardImage(g, tables, in + i * g.image(), out + i * g.pooled());
  });
  return ffi::Error::Success();
}

ffi::Error Backward(F32 image, F32 bias, F32 pooled_grad, ffi::ResultBuffer<ffi::F32> image_grad,
                    ffi::ResultBuffer<ffi::F32> bias_grad, Ints window, int64_t threads,
                    ffi::ThreadPool pool) {
  Geometry g;
  if (ffi::Error error = MakeGeometry(image.dimensions(), window, bias.element_count(), g);
      error.failure()) {
    return error;
  }
  const int64_t batch = image.dimensions()[0];
  const Tables tables(g, bias.typed_data());
  const float* in = image.typed_data();
  const float* grad = pooled_grad.typed_data();
  float* out = image_grad->typed_data();
  const int parts = Parts(threads, batch, pool);
  std::vector<float> sums(parts * g.span(), 0.0f);  // each share's bias gradient, by element
  ForEachImage(batch, parts, pool, [&](int share, int64_t i) {
    BackwardImage(g, tables, in + i * g.image(), grad + i * g.pooled(),
                  out + i * g.image(), &sums[share * g.span()]);
  });
  // The bias's gradient: the shares' sums, in order, then by channel, in double.
  std::vector<double> total(g.channels, 0.0);
  for (int64_t k = 0; k < parts * g.span(); ++k) total[k % g.channels] += sums[k];
  for (int64_t k = 0; k < g.channels; ++k) bias_grad->typed_data()[k] = total[k];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmodelPoolForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()  // image
                                  .Arg<F32>()  // bias
                                  .Ret<F32>()  // pooled
                                  .Attr<Ints>("window")
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmodelPoolBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()  // image
                                  .Arg<F32>()  // bias
                                  .Arg<F32>()  // pooled gradient
                                  .Ret<F32>()  // image gradient
                                  .Ret<F32>()  // bias gradient
                                  .Attr<Ints>("window")
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());
