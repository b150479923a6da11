#include "process_table.hpp"

#include <cerrno>
#include <cstdio>
#include <sys/eventfd.h>
#include <system_error>
#include <unistd.h>

namespace erpy::node {

Waker::Waker() : fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)), owner_(std::this_thread::get_id()) {
  if (fd_ < 0) throw std::system_error(errno, std::generic_category(), "eventfd");
}

Waker::~Waker() {
  if (fd_ >= 0) ::close(fd_);
}

Waker& Waker::mine() {
  thread_local Waker w;
  return w;
}

void Waker::signal() noexcept {
  const std::uint64_t one = 1;
  // Fails only when the counter is near overflow: it is set, which is all that counts.
  [[maybe_unused]] ssize_t r = ::write(fd_, &one, sizeof one);
}

void Waker::drain() noexcept {
  std::uint64_t n;
  [[maybe_unused]] ssize_t r = ::read(fd_, &n, sizeof n);
}

Bytes ProcessTable::encode_pid(std::uint32_t id) const {
  return build([&](auto& s) { etf::put_pid(s, node_, id, 0, creation_.load()); });
}

std::shared_ptr<Process> ProcessTable::spawn() {
  auto p = std::make_shared<Process>();
  p->id = next_pid_++;
  p->pid = encode_pid(p->id);
  std::lock_guard lk(mu_);
  procs_[p->id] = p;
  return p;
}

bool ProcessTable::register_name(const std::string& name, const std::shared_ptr<Process>& p) {
  {
    std::lock_guard pl(p->mu);
    if (p->closed) return false;
  }
  std::lock_guard lk(mu_);
  // Not in the table any more: it ended meanwhile (close() takes it out first).
  if (names_.count(name) || !p->name.empty() || !procs_.count(p->id)) return false;
  names_[name] = p;
  p->name = name;
  return true;
}

void ProcessTable::unregister_name(const std::string& name) {
  std::lock_guard lk(mu_);
  auto it = names_.find(name);
  if (it == names_.end()) return;
  it->second->name.clear();
  names_.erase(it);
}

std::shared_ptr<Process> ProcessTable::whereis(const std::string& name) {
  std::lock_guard lk(mu_);
  auto it = names_.find(name);
  return it == names_.end() ? nullptr : it->second;
}

std::shared_ptr<Process> ProcessTable::find(std::uint32_t id) {
  std::lock_guard lk(mu_);
  auto it = procs_.find(id);
  return it == procs_.end() ? nullptr : it->second;
}

std::vector<std::shared_ptr<Process>> ProcessTable::all() {
  std::lock_guard lk(mu_);
  std::vector<std::shared_ptr<Process>> out;
  out.reserve(procs_.size());
  for (auto& [_, p] : procs_) out.push_back(p);
  return out;
}

void ProcessTable::deliver(const std::shared_ptr<Process>& p, Bytes msg,
                           std::vector<std::shared_ptr<Process>>* wake) {
  if (p->sink) return;
  {
    std::unique_lock lk(p->mu);
    if (p->closed) return;
    // A process that does not keep up (or a peer that floods it) must not grow us
    // without bound: over its limits the message is dropped, as a full queue would.
    if (p->queue.size() >= lim_.max_queued || p->queued_bytes >= lim_.max_queued_bytes) {
      const std::size_t n = p->queue.size(), bytes = p->queued_bytes;
      lk.unlock();
      note_dropped(*p, "message", n, bytes);
      return;
    }
    p->queued_bytes += msg.size();
    p->queue.push_back(std::move(msg));
    p->wake_locked();  // a reader waiting for it in poll(): at once, not at the flush
  }
  messages.fetch_add(1, std::memory_order_relaxed);
  if (!wake) {
    p->notify();
  } else if (wake->empty() || wake->back() != p) {
    wake->push_back(p);
  }
}

void ProcessTable::flush(std::vector<std::shared_ptr<Process>>& wake) {
  for (auto& p : wake) p->notify();
  wake.clear();
}

void ProcessTable::note_dropped(const Process& p, const char* what, std::size_t held, std::size_t bytes) {
  const std::uint64_t total = dropped.fetch_add(1, std::memory_order_relaxed) + 1;
  // A flood must not become a flood of log lines too.
  const std::int64_t now = now_ns();
  std::int64_t last = last_drop_log_.load(std::memory_order_relaxed);
  if (last != 0 && now - last < 1'000'000'000) return;
  if (!last_drop_log_.compare_exchange_strong(last, now)) return;
  std::fprintf(stderr,
               "erpy.node %s: dropped a %s for process <0.%u.0>: it holds %zu %ss (%zu bytes of "
               "messages); max_queued_messages %zu, max_queued_bytes %zu; %llu dropped so far\n",
               node_.c_str(), what, p.id, held, what, bytes, lim_.max_queued, lim_.max_queued_bytes,
               static_cast<unsigned long long>(total));
}

bool ProcessTable::close(const std::shared_ptr<Process>& p, Ended& out) {
  {
    std::lock_guard lk(mu_);
    procs_.erase(p->id);
    if (!p->name.empty()) {
      auto it = names_.find(p->name);
      if (it != names_.end() && it->second == p) names_.erase(it);
    }
  }
  {
    std::lock_guard lk(p->mu);
    if (p->closed) return false;
    p->closed = true;
    out.monitors.swap(p->monitors);
    out.out.swap(p->out_monitors);
    out.links.swap(p->links);
    p->queue.clear();
    p->queued_bytes = 0;
    p->wake_locked();
  }
  p->notify();
  return true;
}

void ProcessTable::close_all() {
  for (auto& p : all()) {
    {
      std::lock_guard pl(p->mu);
      p->closed = true;
      p->wake_locked();
    }
    p->notify();
  }
}

bool ProcessTable::add_monitor(const std::shared_ptr<Process>& p, Watch w, bool& full) {
  std::size_t n;
  {
    std::lock_guard lk(p->mu);
    n = p->monitors.size();
    full = !p->closed && n >= lim_.max_queued;
    if (p->closed) return false;
    if (!full) {
      p->monitors.push_back(std::move(w));
      return true;
    }
  }
  note_dropped(*p, "monitor", n, 0);
  return false;
}

void ProcessTable::remove_monitor(const std::shared_ptr<Process>& p, const Bytes& ref) {
  std::lock_guard lk(p->mu);
  std::erase_if(p->monitors, [&](const Watch& w) { return w.ref == ref; });
}

void ProcessTable::record_out_monitor(const std::shared_ptr<Process>& p, Watch w) {
  std::lock_guard lk(p->mu);
  p->out_monitors.push_back(std::move(w));
}

Bytes ProcessTable::take_out_monitor(const std::shared_ptr<Process>& p, const Bytes& ref) {
  std::lock_guard lk(p->mu);
  auto& v = p->out_monitors;
  for (auto it = v.begin(); it != v.end(); ++it) {
    if (it->ref == ref) {
      Bytes object = std::move(it->target);
      v.erase(it);
      return object;
    }
  }
  return {};
}

bool ProcessTable::add_remote_link(const std::shared_ptr<Process>& p, const std::string& node, const Bytes& pid,
                                   bool& full) {
  std::size_t n;
  {
    std::lock_guard lk(p->mu);
    n = p->links.size();
    full = !p->closed && n >= lim_.max_queued;
    if (p->closed) return false;
    if (!full) {
      for (auto& l : p->links) {
        if (l.second == pid) return true;
      }
      p->links.emplace_back(node, pid);
      return true;
    }
  }
  note_dropped(*p, "link", n, 0);
  return false;
}

void ProcessTable::add_link(const std::shared_ptr<Process>& p, const std::string& node, const Bytes& pid) {
  std::lock_guard lk(p->mu);
  for (auto& l : p->links) {
    if (l.second == pid) return;
  }
  p->links.emplace_back(node, pid);
}

void ProcessTable::remove_link(const std::shared_ptr<Process>& p, const Bytes& pid) {
  std::lock_guard lk(p->mu);
  auto& v = p->links;
  for (auto it = v.begin(); it != v.end(); ++it) {
    if (it->second == pid) {
      v.erase(it);
      return;
    }
  }
}

void ProcessTable::node_down(const std::string& node) {
  const Bytes down = enc_atom("DOWN"), process = enc_atom("process"), exit = enc_atom("EXIT"),
              noconn = enc_atom("noconnection");
  for (auto& p : all()) {
    std::vector<Bytes> msgs;
    {
      std::lock_guard lk(p->mu);
      std::erase_if(p->monitors, [&](const Watch& w) { return w.node == node; });
      std::erase_if(p->out_monitors, [&](const Watch& w) {
        if (w.node != node) return false;
        msgs.push_back(message_tuple({&down, &w.ref, &process, &w.target, &noconn}));
        return true;
      });
      std::erase_if(p->links, [&](const auto& l) {
        if (l.first != node) return false;
        msgs.push_back(message_tuple({&exit, &l.second, &noconn}));
        return true;
      });
    }
    for (auto& m : msgs) deliver(p, std::move(m));
  }
}

}  // namespace erpy::node
