// NIF resources as C++ objects. A resource is made with make_resource and every
// reference our code keeps is a ResourcePtr (move-only, released with its owner), so no
// error path leaks a reference or drops one twice. Terms hold references of their own
// (enif_make_resource), which the VM drops when it collects them.
//
// Under ThreadSanitizer (make test-tsan) the VM is not instrumented: its reference counts
// order a resource's last use before its destructor, and its allocator orders that
// before the memory is used again, but TSan sees neither. The annotations below tell it
// (release where a reference goes, acquire where the object is destroyed or made).
#pragma once
#include <erl_nif.h>

#include <new>
#include <type_traits>
#include <utility>

#if defined(__SANITIZE_THREAD__)
#define ERPY_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define ERPY_TSAN 1
#endif
#endif

#ifdef ERPY_TSAN
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#endif

namespace erpy::nif {

inline void tsan_acquire([[maybe_unused]] void* p) noexcept {
#ifdef ERPY_TSAN
  __tsan_acquire(p);
#endif
}

inline void tsan_release([[maybe_unused]] void* p) noexcept {
#ifdef ERPY_TSAN
  __tsan_release(p);
#endif
}

template <class T>
class ResourcePtr {
 public:
  ResourcePtr() noexcept = default;
  // Takes over a reference the caller owns (enif_alloc_resource's).
  static ResourcePtr adopt(T* p) noexcept { return ResourcePtr(p); }
  // One more reference to a live resource.
  static ResourcePtr share(T* p) noexcept {
    if (p) enif_keep_resource(p);
    return ResourcePtr(p);
  }
  ResourcePtr(ResourcePtr&& o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  ResourcePtr& operator=(ResourcePtr&& o) noexcept {
    if (this != &o) {
      reset();
      p_ = std::exchange(o.p_, nullptr);
    }
    return *this;
  }
  ResourcePtr(const ResourcePtr&) = delete;
  ResourcePtr& operator=(const ResourcePtr&) = delete;
  ~ResourcePtr() { reset(); }

  // Drops the reference. The last one runs the resource's destructor here, so callers
  // mind which locks they hold.
  void reset() noexcept {
    if (T* p = std::exchange(p_, nullptr)) {
      tsan_release(p);
      enif_release_resource(p);
    }
  }
  ResourcePtr share() const noexcept { return share(p_); }
  T* get() const noexcept { return p_; }
  T* operator->() const noexcept { return p_; }
  T& operator*() const noexcept { return *p_; }
  explicit operator bool() const noexcept { return p_ != nullptr; }
  // A term for the resource (with a reference of its own), in `env`.
  ERL_NIF_TERM term(ErlNifEnv* env) const { return enif_make_resource(env, p_); }

 private:
  explicit ResourcePtr(T* p) noexcept : p_(p) {}
  T* p_ = nullptr;
};

// A new resource of `type` holding a T made from `args`. The constructor must not throw:
// the memory is the VM's, and a failed object could only be given back through the
// destructor callback, which would destroy what was never made.
template <class T, class... Args>
ResourcePtr<T> make_resource(ErlNifResourceType* type, Args&&... args) {
  static_assert(std::is_nothrow_constructible_v<T, Args...>);
  void* mem = enif_alloc_resource(type, sizeof(T));
  tsan_acquire(mem);
  return ResourcePtr<T>::adopt(new (mem) T(std::forward<Args>(args)...));
}

// The destructor callback of a resource type holding a T.
template <class T>
void destroy_resource(ErlNifEnv*, void* obj) noexcept {
  tsan_acquire(obj);
  static_cast<T*>(obj)->~T();
  tsan_release(obj);
}

// A resource of `type` that `term` refers to, or null.
template <class T>
T* get_resource(ErlNifEnv* env, ERL_NIF_TERM term, ErlNifResourceType* type) noexcept {
  void* obj = nullptr;
  return enif_get_resource(env, term, type, &obj) ? static_cast<T*>(obj) : nullptr;
}

}  // namespace erpy::nif
