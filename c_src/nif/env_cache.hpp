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
  void give(ErlNifEnv* env) {
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

// An environment from the cache that goes back to it unless released (sent on, or kept).
struct MsgEnv {
  ErlNifEnv* env = EnvCache::global().take();
  MsgEnv() = default;
  ~MsgEnv() { EnvCache::global().give(env); }
  MsgEnv(const MsgEnv&) = delete;
  MsgEnv& operator=(const MsgEnv&) = delete;
  ErlNifEnv* release() noexcept { return std::exchange(env, nullptr); }
};

}  // namespace erpy::nif
