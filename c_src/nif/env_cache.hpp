// Message environments for terms that context threads build (answers, callback requests,
// log lines), handed back after use instead of freed.
//
// Why: an environment's memory comes from the allocator of the thread that fills it. When
// a scheduler frees memory that one of our threads allocated, the VM queues it for
// "delayed deallocation" and wakes its auxiliary thread to do it: a pipe write, a poll and
// a read, several microseconds of CPU on these VMs, for every call. Handed back, an
// environment is cleared by the next context thread that takes it, so its memory goes back
// where it came from. Schedulers only hand back (no allocator work at all).
#pragma once
#include <erl_nif.h>

#include <mutex>
#include <utility>
#include <vector>

#include "spin_mutex.hpp"

namespace erpy::nif {

class EnvCache {
 public:
  // Room for every spare up front: give() never allocates, so it cannot fail.
  EnvCache() { spare_.reserve(kMaxSpare); }
  // A cleared environment (made if none is spare). From context threads.
  ErlNifEnv* take() {
    ErlNifEnv* env = nullptr;
    {
      std::lock_guard<SpinMutex> lock(m_);
      if (!spare_.empty()) {
        env = spare_.back();
        spare_.pop_back();
      }
    }
    if (!env) return enif_alloc_env();
    enif_clear_env(env);
    return env;
  }
  // Back for reuse, its terms no longer needed (copied out, or sent). From any thread.
  void give(ErlNifEnv* env) noexcept {
    if (!env) return;
    {
      std::lock_guard<SpinMutex> lock(m_);
      if (spare_.size() < kMaxSpare) {
        spare_.push_back(env);
        return;
      }
    }
    enif_free_env(env);
  }
  static EnvCache& global() {
    static EnvCache* cache = new EnvCache();  // never destroyed: envs may come back late
    return *cache;
  }

 private:
  static constexpr size_t kMaxSpare = 256;
  SpinMutex m_;
  std::vector<ErlNifEnv*> spare_;
};

// An environment of our own (enif_alloc_env): freed with its owner, on every path.
// Move-only; empty until alloc().
class OwnedEnv {
 public:
  OwnedEnv() noexcept = default;
  static OwnedEnv alloc() { return OwnedEnv(enif_alloc_env()); }
  OwnedEnv(OwnedEnv&& o) noexcept : env_(std::exchange(o.env_, nullptr)) {}
  OwnedEnv& operator=(OwnedEnv&& o) noexcept {
    if (this != &o) {
      reset();
      env_ = std::exchange(o.env_, nullptr);
    }
    return *this;
  }
  OwnedEnv(const OwnedEnv&) = delete;
  OwnedEnv& operator=(const OwnedEnv&) = delete;
  ~OwnedEnv() { reset(); }
  void reset() noexcept {
    if (ErlNifEnv* e = std::exchange(env_, nullptr)) enif_free_env(e);
  }
  ErlNifEnv* get() const noexcept { return env_; }
  explicit operator bool() const noexcept { return env_ != nullptr; }

 private:
  explicit OwnedEnv(ErlNifEnv* env) noexcept : env_(env) {}
  ErlNifEnv* env_ = nullptr;
};

// An environment from the cache, which goes back to it with its owner (its terms no
// longer needed: copied out, or sent). Move-only; empty until take().
class MsgEnv {
 public:
  MsgEnv() noexcept = default;
  static MsgEnv take() { return MsgEnv(EnvCache::global().take()); }
  MsgEnv(MsgEnv&& o) noexcept : env_(std::exchange(o.env_, nullptr)) {}
  MsgEnv& operator=(MsgEnv&& o) noexcept {
    if (this != &o) {
      reset();
      env_ = std::exchange(o.env_, nullptr);
    }
    return *this;
  }
  MsgEnv(const MsgEnv&) = delete;
  MsgEnv& operator=(const MsgEnv&) = delete;
  ~MsgEnv() { reset(); }
  void reset() noexcept { EnvCache::global().give(std::exchange(env_, nullptr)); }
  ErlNifEnv* get() const noexcept { return env_; }
  explicit operator bool() const noexcept { return env_ != nullptr; }

 private:
  explicit MsgEnv(ErlNifEnv* env) noexcept : env_(env) {}
  ErlNifEnv* env_ = nullptr;
};

}  // namespace erpy::nif
