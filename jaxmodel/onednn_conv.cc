// XLA FFI handlers that run 2-D convolutions with oneDNN: the forward pass and both gradients of
// a convolution of NHWC float32 images by an HWIO float32 kernel (no dilation, one group).
//
// oneDNN is the CPU convolution library PyTorch uses; XLA:CPU's own convolutions are several
// times slower on this kind of CPU (experiments/README.md). jaxmodel/onednn.py builds this file
// and calls it from jitted code through jax.ffi.
//
// Each handler takes the geometry from its buffers' shapes and its attributes, finds (or makes
// once, then caches) the oneDNN primitive for it with its reorders, and reorders between our
// layouts and the layouts the primitive prefers when they differ. Activations stay NHWC unless
// the `blocked` attribute asks for the primitive's own layout (channels in blocks of 8, say).
// A convolution big enough to share between threads is split by batch over XLA's own threads.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"
#include "shares.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum Pass { kForward = 0, kInputGrad = 1, kKernelGrad = 2 };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A primitive and the layouts it wants for the image, the kernel and the output (or their
// gradients, by pass). Each of the three whose layout differs from ours has a reorder, made
// once: into the primitive's layout for what it reads, out of it for what it writes.
struct Plan {
  dnnl::primitive conv;
  memory::desc image, kernel, output, scratchpad;
  memory::desc user_image, user_kernel, user_output;
  std::optional<dnnl::reorder> reorder_image, reorder_kernel, reorder_output;
};

// A growing buffer of this thread's, for what one call needs only while it runs (the scratchpad,
// tensors in the primitive's layout): allocated once, not on every call. A thread runs one
// handler at a time, and XLA's concurrent thunks run on different threads.
class Buffer {
 public:
  void* Get(size_t bytes) {
    if (bytes > size_ || !data_) {
      size_ = (bytes + 64) / 64 * 64;  // never 0: aligned_alloc may return null for that
      data_.reset(static_cast<char*>(std::aligned_alloc(64, size_)));
      if (!data_) throw std::bad_alloc();
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> data_;
  size_t size_ = 0;
};

// A reorder from `from` to `to`, or none when they are the same layout.
std::optional<dnnl::reorder> MakeReorder(const memory::desc& from, const memory::desc& to) {
  if (from == to) return std::nullopt;
  return dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
}

using Key = std::vector<int64_t>;

// The most images one thread takes at a time when a convolution is split by batch.
constexpr int64_t kShareImages = 64;

const Plan& GetPlan(Pass pass, int64_t threads, bool blocked, const memory::dims& image,
                    const memory::dims& kernel, const memory::dims& output,
                    const memory::dims& strides, const memory::dims& pad_lo,
                    const memory::dims& pad_hi) {
  static std::mutex mutex;
  static std::map<Key, std::unique_ptr<Plan>> plans;
  Key key = {pass, threads, blocked};
  for (const auto* dims : {&image, &kernel, &output, &strides, &pad_lo, &pad_hi}) {
    key.insert(key.end(), dims->begin(), dims->end());
  }
  std::lock_guard<std::mutex> lock(mutex);
  auto found = plans.find(key);
  if (found != plans.end()) return *found->second;

  using tag = memory::format_tag;
  const auto f32 = memory::data_type::f32;
  auto plan = std::make_unique<Plan>();
  plan->user_image = memory::desc(image, f32, tag::nhwc);
  plan->user_kernel = memory::desc(kernel, f32, tag::hwio);
  plan->user_output = memory::desc(output, f32, tag::nhwc);
  // The kernel takes whatever blocked layout the implementation prefers; the activations too if
  // `blocked`, else they stay NHWC (no reorder of the big tensors).
  const memory::desc any_kernel(kernel, f32, tag::any);
  const memory::desc conv_image = blocked ? memory::desc(image, f32, tag::any) : plan->user_image;
  const memory::desc conv_output =
      blocked ? memory::desc(output, f32, tag::any) : plan->user_output;
  const auto algorithm = dnnl::algorithm::convolution_direct;
  // XLA runs independent thunks concurrently, and oneDNN's own scratchpad is shared between
  // primitives: each call brings its own.
  dnnl::primitive_attr attributes;
  attributes.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::convolution_forward::primitive_desc forward(
      Engine(), dnnl::prop_kind::forward_training, algorithm, conv_image, any_kernel,
      conv_output, strides, pad_lo, pad_hi, attributes);
  if (pass == kForward) {
    plan->conv = dnnl::convolution_forward(forward);
    plan->image = forward.src_desc();
    plan->kernel = forward.weights_desc();
    plan->output = forward.dst_desc();
    plan->scratchpad = forward.scratchpad_desc();
  } else if (pass == kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc backward(
        Engine(), algorithm, conv_image, any_kernel, conv_output, strides, pad_lo, pad_hi,
        forward, attributes);
    plan->conv = dnnl::convolution_backward_data(backward);
    plan->scratchpad = backward.scratchpad_desc();
    plan->image = backward.diff_src_desc();
    plan->kernel = backward.weights_desc();
    plan->output = backward.diff_dst_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc backward(
        Engine(), algorithm, conv_image, any_kernel, conv_output, strides, pad_lo, pad_hi,
        forward, attributes);
    plan->conv = dnnl::convolution_backward_weights(backward);
    plan->scratchpad = backward.scratchpad_desc();
    plan->image = backward.src_desc();
    plan->kernel = backward.diff_weights_desc();
    plan->output = backward.diff_dst_desc();
  }
  const bool writes_image = pass == kInputGrad, writes_kernel = pass == kKernelGrad;
  const auto reorder = [](bool written, const memory::desc& user, const memory::desc& wanted) {
    return written ? MakeReorder(wanted, user) : MakeReorder(user, wanted);
  };
  plan->reorder_image = reorder(writes_image, plan->user_image, plan->image);
  plan->reorder_kernel = reorder(writes_kernel, plan->user_kernel, plan->kernel);
  plan->reorder_output = reorder(pass == kForward, plan->user_output, plan->output);
  return *plans.emplace(key, std::move(plan)).first->second;
}

using Shape = std::vector<int64_t>;

// OpenMP's thread count as the process started.
int AllThreads() {
  static const int threads = omp_get_max_threads();
  return threads;
}

// oneDNN's dims are (N, C, H, W) and (O, I, H, W) whatever the layout in memory.
memory::dims ImageDims(const Shape& nhwc) {
  return {nhwc[0], nhwc[3], nhwc[1], nhwc[2]};
}

memory::dims KernelDims(const Shape& hwio) {
  return {hwio[3], hwio[2], hwio[0], hwio[1]};
}

memory::dims ToDims(ffi::Span<const int64_t> values) {
  return memory::dims(values.begin(), values.end());
}

// Whether every pixel of the padded image is in some window (strides can leave the last out).
bool CoversImage(const Shape& image_nhwc, const Shape& kernel_hwio,
                 ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                 ffi::Span<const int64_t> pad_hi) {
  for (int axis = 0; axis < 2; ++axis) {
    int64_t span = image_nhwc[axis + 1] + pad_lo[axis] + pad_hi[axis] - kernel_hwio[axis];
    if (span % strides[axis] != 0) return false;
  }
  return true;
}

// Runs `pass` on user buffers (image, kernel, output), two of them inputs and one the result,
// as one oneDNN primitive on `threads` of OpenMP's threads (0: all). Small convolutions come
// with threads 1 (jaxmodel/onednn.py): waking another thread costs them more than it saves.
ffi::Error RunOnce(Pass pass, void* image, const Shape& image_shape, void* kernel,
                   const Shape& kernel_shape, void* output, const Shape& output_shape,
                   ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                   ffi::Span<const int64_t> pad_hi, int64_t threads, bool blocked) {
  omp_set_num_threads(threads > 0 ? threads : AllThreads());
  try {
    const Plan& plan = GetPlan(pass, threads, blocked, ImageDims(image_shape),
                               KernelDims(kernel_shape), ImageDims(output_shape), ToDims(strides),
                               ToDims(pad_lo), ToDims(pad_hi));
    dnnl::engine& engine = Engine();
    thread_local dnnl::stream stream(engine);
    thread_local Buffer image_buffer, kernel_buffer, output_buffer, scratchpad_buffer;
    memory user_image(plan.user_image, engine, image);
    memory user_kernel(plan.user_kernel, engine, kernel);
    memory user_output(plan.user_output, engine, output);
    // Which of the three the primitive writes; the other two it reads.
    memory* written = pass == kForward ? &user_output
                      : pass == kInputGrad ? &user_image : &user_kernel;
    // The tensor in the primitive's layout: the user's buffer, or this thread's, reordered into
    // if the primitive reads it.
    auto prepare = [&](memory& user, const memory::desc& wanted,
                       const std::optional<dnnl::reorder>& reorder, Buffer& buffer) {
      if (!reorder) return user;
      memory converted(wanted, engine, buffer.Get(wanted.get_size()));
      if (&user != written) {
        reorder->execute(stream, {{DNNL_ARG_FROM, user}, {DNNL_ARG_TO, converted}});
      }
      return converted;
    };
    memory image_memory = prepare(user_image, plan.image, plan.reorder_image, image_buffer);
    memory kernel_memory = prepare(user_kernel, plan.kernel, plan.reorder_kernel, kernel_buffer);
    memory output_memory = prepare(user_output, plan.output, plan.reorder_output, output_buffer);
    std::unordered_map<int, memory> arguments;
    if (pass == kForward) {
      arguments = {{DNNL_ARG_SRC, image_memory}, {DNNL_ARG_WEIGHTS, kernel_memory},
                   {DNNL_ARG_DST, output_memory}};
    } else if (pass == kInputGrad) {
      arguments = {{DNNL_ARG_DIFF_SRC, image_memory}, {DNNL_ARG_WEIGHTS, kernel_memory},
                   {DNNL_ARG_DIFF_DST, output_memory}};
    } else {
      arguments = {{DNNL_ARG_SRC, image_memory}, {DNNL_ARG_DIFF_WEIGHTS, kernel_memory},
                   {DNNL_ARG_DIFF_DST, output_memory}};
    }
    arguments[DNNL_ARG_SCRATCHPAD] =
        memory(plan.scratchpad, engine, scratchpad_buffer.Get(plan.scratchpad.get_size()));
    if (pass == kInputGrad && !CoversImage(image_shape, kernel_shape, strides, pad_lo, pad_hi)) {
      // The last rows or columns are in no window: their gradient is 0, which we write.
      std::memset(image_memory.get_data_handle(), 0, image_memory.get_desc().get_size());
    }
    plan.conv.execute(stream, arguments);
    const std::optional<dnnl::reorder>& reorder_result =
        pass == kForward ? plan.reorder_output
        : pass == kInputGrad ? plan.reorder_image : plan.reorder_kernel;
    if (reorder_result) {
      memory& result = pass == kForward ? output_memory
                       : pass == kInputGrad ? image_memory : kernel_memory;
      reorder_result->execute(stream, {{DNNL_ARG_FROM, result}, {DNNL_ARG_TO, *written}});
    }
    stream.wait();
  } catch (const dnnl::error& error) {
    return ffi::Error::Internal(std::string("oneDNN conv: ") + error.what());
  }
  return ffi::Error::Success();
}

// Runs `pass` as RunOnce does, except that a convolution for all threads (threads 0) is split by
// batch: the calling thread and XLA's pool threads each take shares of up to kShareImages
// images through one-thread primitives, instead of one primitive on OpenMP's threads. No thread
// then waits on another inside a primitive, no OpenMP team contends with XLA's threads for the
// cores, and a share fits in its core's cache. The tutorial CNN's step ran 1.2-1.3x faster at
// batch 128, 1.1-1.2x at 512; the wider airbench nets' steps kept their speed
// (experiments/README.md).
// A kernel gradient sums the shares' gradients, always in the same order.
ffi::Error Run(Pass pass, void* image, ffi::Span<const int64_t> image_dims, void* kernel,
               ffi::Span<const int64_t> kernel_dims, void* output,
               ffi::Span<const int64_t> output_dims, ffi::Span<const int64_t> strides,
               ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi,
               int64_t threads, bool blocked, ffi::ThreadPool& pool) {
  if (image_dims.size() != 4 || kernel_dims.size() != 4 || output_dims.size() != 4) {
    return ffi::Error::InvalidArgument("oneDNN conv: expected NHWC images and an HWIO kernel");
  }
  const Shape image_shape(image_dims.begin(), image_dims.end());
  const Shape kernel_shape(kernel_dims.begin(), kernel_dims.end());
  const Shape output_shape(output_dims.begin(), output_dims.end());
  const int64_t batch = image_shape[0];
  const int64_t helpers = threads == 0 ? std::min<int64_t>(pool.num_threads(), batch) - 1 : 0;
  if (helpers <= 0) {
    return RunOnce(pass, image, image_shape, kernel, kernel_shape, output, output_shape, strides,
                   pad_lo, pad_hi, threads, blocked);
  }
  // Shares of at most kShareImages, and at least one per thread.
  const int parts = static_cast<int>(std::min<int64_t>(
      batch, std::max<int64_t>(helpers + 1, (batch + kShareImages - 1) / kShareImages)));
  const int64_t image_size = image_shape[1] * image_shape[2] * image_shape[3];
  const int64_t output_size = output_shape[1] * output_shape[2] * output_shape[3];
  const int64_t kernel_size =
      kernel_shape[0] * kernel_shape[1] * kernel_shape[2] * kernel_shape[3];
  // The kernel gradients of shares 1.. (share 0 writes the result's buffer).
  std::vector<float> partial(pass == kKernelGrad ? (parts - 1) * kernel_size : 0);
  std::vector<std::string> errors(parts);
  auto run_share = [&](int share) {
    const int64_t begin = batch * share / parts, end = batch * (share + 1) / parts;
    Shape share_image = image_shape, share_output = output_shape;
    share_image[0] = share_output[0] = end - begin;
    void* share_kernel =
        pass == kKernelGrad && share > 0 ? &partial[(share - 1) * kernel_size] : kernel;
    ffi::Error error = RunOnce(pass, static_cast<float*>(image) + begin * image_size,
                               share_image, share_kernel, kernel_shape,
                               static_cast<float*>(output) + begin * output_size, share_output,
                               strides, pad_lo, pad_hi, 1, blocked);
    if (error.failure()) errors[share] = error.message();
  };
  jaxmodel::RunShares(pool, helpers, parts, run_share);
  for (const std::string& error : errors) {
    if (!error.empty()) return ffi::Error::Internal(error);
  }
  if (pass == kKernelGrad) {
    float* result = static_cast<float*>(kernel);
    for (int share = 1; share < parts; ++share) {
      const float* gradient = &partial[(share - 1) * kernel_size];
      for (int64_t i = 0; i < kernel_size; ++i) result[i] += gradient[i];
    }
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using Ints = ffi::Span<const int64_t>;

ffi::Error Forward(F32 image, F32 kernel, ffi::ResultBuffer<ffi::F32> output, Ints strides,
                   Ints pad_lo, Ints pad_hi, int64_t threads, bool blocked,
                   ffi::ThreadPool pool) {
  return Run(kForward, image.untyped_data(), image.dimensions(), kernel.untyped_data(),
             kernel.dimensions(), output->untyped_data(), output->dimensions(), strides, pad_lo,
             pad_hi, threads, blocked, pool);
}

ffi::Error InputGrad(F32 output_grad, F32 kernel, ffi::ResultBuffer<ffi::F32> image_grad,
                     Ints strides, Ints pad_lo, Ints pad_hi, int64_t threads, bool blocked,
                     ffi::ThreadPool pool) {
  return Run(kInputGrad, image_grad->untyped_data(), image_grad->dimensions(),
             kernel.untyped_data(), kernel.dimensions(), output_grad.untyped_data(),
             output_grad.dimensions(), strides, pad_lo, pad_hi, threads, blocked, pool);
}

ffi::Error KernelGrad(F32 image, F32 output_grad, ffi::ResultBuffer<ffi::F32> kernel_grad,
                      Ints strides, Ints pad_lo, Ints pad_hi, int64_t threads, bool blocked,
                      ffi::ThreadPool pool) {
  return Run(kKernelGrad, image.untyped_data(), image.dimensions(), kernel_grad->untyped_data(),
             kernel_grad->dimensions(), output_grad.untyped_data(), output_grad.dimensions(),
             strides, pad_lo, pad_hi, threads, blocked, pool);
}

}  // namespace

#define JAXMODEL_CONV_HANDLER(name, impl)                                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl,                                                 \
                                ffi::Ffi::Bind()                                            \
                                    .Arg<F32>()                                             \
                                    .Arg<F32>()                                             \
                                    .Ret<F32>()                                             \
                                    .Attr<Ints>("strides")                                  \
                                    .Attr<Ints>("pad_lo")                                   \
                                    .Attr<Ints>("pad_hi")                                   \
                                    .Attr<int64_t>("threads")                               \
                                    .Attr<bool>("blocked")                                  \
                                    .Ctx<ffi::ThreadPool>())

JAXMODEL_CONV_HANDLER(JaxmodelConvForward, Forward);
JAXMODEL_CONV_HANDLER(JaxmodelConvInputGrad, InputGrad);
JAXMODEL_CONV_HANDLER(JaxmodelConvKernelGrad, KernelGrad);
