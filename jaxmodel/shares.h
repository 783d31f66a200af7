// Splitting one FFI call's work by batch over XLA's intra-op threads (jaxmodel/onednn_conv.cc,
// jaxmodel/pool.cc).

#ifndef JAXMODEL_SHARES_H_
#define JAXMODEL_SHARES_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jaxmodel {

// The shares of one call's batch, claimed in order by whichever thread is free: the calling
// thread and the helpers it schedules on XLA's pool. The calling thread claims shares until none
// is left, so the call never waits on a helper still queued behind other work (or behind
// itself); it waits only for shares that are running.
struct Shares {
  explicit Shares(int count) : count(count), left(count) {}
  int Claim() { return next.fetch_add(1); }  // a share, or >= count: none left
  void Finish() {
    std::lock_guard<std::mutex> lock(mutex);
    if (--left == 0) finished.notify_all();
  }
  void Wait() {
    std::unique_lock<std::mutex> lock(mutex);
    finished.wait(lock, [this] { return left == 0; });
  }
  const int count;
  std::atomic<int> next{0};
  std::mutex mutex;
  std::condition_variable finished;
  int left;  // shares not finished yet
};

// Runs run_share(0) ... run_share(parts - 1) on the calling thread and `helpers` tasks scheduled
// on `pool`, and returns when all have run. A helper that finds no share left returns at once,
// touching only its `Shares`: it may run after this call has returned.
template <typename RunShare>
void RunShares(xla::ffi::ThreadPool& pool, int64_t helpers, int parts, RunShare& run_share) {
  auto shares = std::make_shared<Shares>(parts);
  for (int64_t helper = 0; helper < helpers; ++helper) {
    pool.Schedule([shares, run = &run_share] {
      for (int share = shares->Claim(); share < shares->count; share = shares->Claim()) {
        (*run)(share);
        shares->Finish();
      }
    });
  }
  for (int share = shares->Claim(); share < parts; share = shares->Claim()) {
    run_share(share);
    shares->Finish();
  }
  shares->Wait();
}

}  // namespace jaxmodel

#endif  // JAXMODEL_SHARES_H_
