// A growable byte buffer that is an etf Sink. Unlike std::vector it never zero-fills and
// keeps the common case (room left) to one compare, which matters for the two-byte writes
// that dominate an encoded term.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#include "etf/error.hpp"

namespace erpy::py {

class ByteBuffer {
 public:
  ByteBuffer() noexcept = default;
  ByteBuffer(ByteBuffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)),
        cap_(std::exchange(o.cap_, 0)), room_(std::exchange(o.room_, 0)),
        limit_(std::exchange(o.limit_, kNoLimit)) {}
  ByteBuffer& operator=(ByteBuffer&& o) noexcept {
    if (this != &o) {
      std::free(data_);
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
      cap_ = std::exchange(o.cap_, 0);
      room_ = std::exchange(o.room_, 0);
      limit_ = std::exchange(o.limit_, kNoLimit);
    }
    return *this;
  }
  ByteBuffer(const ByteBuffer&) = delete;
  ByteBuffer& operator=(const ByteBuffer&) = delete;
  ~ByteBuffer() { std::free(data_); }

  [[gnu::always_inline]] void byte(std::uint8_t b) {
    if (size_ == room_) grow(1);
    data_[size_++] = b;
  }
  [[gnu::always_inline]] void write(const void* src, std::size_t n) {
    if (room_ - size_ < n) grow(n);
    if (n) std::memcpy(data_ + size_, src, n);
    size_ += n;
  }
  // write() for payloads of varying, mostly short length (strings).
  [[gnu::always_inline]] void write_payload(const void* src, std::size_t n) {
    if (room_ - size_ < n) grow(n);
    copy(data_ + size_, static_cast<const std::uint8_t*>(src), n);
    size_ += n;
  }

  // Grows the size by n and returns where those n (uninitialized) bytes start, for a
  // reader that fills them itself.
  [[gnu::always_inline]] std::uint8_t* append_uninitialized(std::size_t n) {
    if (room_ - size_ < n) grow(n);
    std::uint8_t* p = data_ + size_;
    size_ += n;
    return p;
  }

  // Short copies (map keys, small strings) with overlapping word moves: a libc call
  // costs more than the copy at these sizes.
  [[gnu::always_inline]] static void copy(std::uint8_t* d, const std::uint8_t* s, std::size_t n) noexcept {
    if (n >= 8 && n <= 16) {
      std::uint64_t a, b;
      std::memcpy(&a, s, 8);
      std::memcpy(&b, s + n - 8, 8);
      std::memcpy(d, &a, 8);
      std::memcpy(d + n - 8, &b, 8);
    } else if (n >= 4 && n < 8) {
      std::uint32_t a, b;
      std::memcpy(&a, s, 4);
      std::memcpy(&b, s + n - 4, 4);
      std::memcpy(d, &a, 4);
      std::memcpy(d + n - 4, &b, 4);
    } else if (n < 4) {
      for (std::size_t i = 0; i < n; ++i) d[i] = s[i];
    } else {
      std::memcpy(d, s, n);
    }
  }

  std::uint8_t* data() noexcept { return data_; }
  const std::uint8_t* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  std::size_t capacity() const noexcept { return cap_; }
  void clear() noexcept { size_ = 0; }
  // Shrinks the size (e.g. to undo a partial write); never grows.
  void truncate(std::size_t n) noexcept {
    if (n < size_) size_ = n;
  }
  void release_memory() noexcept {
    std::free(std::exchange(data_, nullptr));
    size_ = cap_ = room_ = 0;
  }

  // Growing past `limit` bytes throws etf::TooLargeError (before allocating for it), so a
  // term too large for its destination is never written whole.
  static constexpr std::size_t kNoLimit = SIZE_MAX;
  void set_limit(std::size_t limit) noexcept {
    limit_ = limit;
    update_room();
  }
  std::size_t limit() const noexcept { return limit_; }

 private:
  [[gnu::noinline]] void grow(std::size_t extra) {
    if (size_ > limit_ || extra > limit_ - size_) throw etf::TooLargeError(size_ + extra, limit_);
    if (cap_ - size_ < extra) {
      std::size_t cap = cap_ ? cap_ : 256;
      while (cap - size_ < extra) cap *= 2;
      void* p = std::realloc(data_, cap);
      if (!p) throw std::bad_alloc();
      data_ = static_cast<std::uint8_t*>(p);
      cap_ = cap;
    }
    update_room();
  }

  // Never below size_: the fast paths compute room_ - size_.
  void update_room() noexcept {
    room_ = cap_ < limit_ ? cap_ : limit_;
    if (room_ < size_) room_ = size_;
  }

  std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t cap_ = 0;
  std::size_t room_ = 0;  // min(cap_, limit_): what the fast paths may fill
  std::size_t limit_ = kNoLimit;
};

}  // namespace erpy::py
