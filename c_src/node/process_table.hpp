// The node's local processes: their pids and registered names, mailboxes, and the
// monitors and links other nodes hold on them. Sends nothing itself: what a process's end
// or a lost node means for other nodes is returned to the caller, who writes it.
//
// Locks: the table's mutex (pids, names), then Process::mu (one process); never the
// other way round, and neither while waiting for anything.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "protocol.hpp"

namespace erpy::node {

// Pids, references and reasons are kept in their canonical encoding (no version byte):
// compared byte for byte and written back as they are.
struct Watch {
  std::string node;  // the other process's node
  // Incoming monitor: the watcher's pid. Outgoing: what we monitor as we named it in
  // MONITOR_P (a pid or a registered name), for DEMONITOR_P.
  Bytes watcher;
  Bytes ref;     // monitor reference
  // Incoming: what it monitors as it named it (our pid or our registered name), the
  // sender of MONITOR_P_EXIT. Outgoing: the object of our 'DOWN' message.
  Bytes target;
};

// Wakes one thread that sleeps in poll() rather than on a condition variable: a
// connection's reader that waits for a message while it goes on reading its connection
// (Core::wait_message). An eventfd per thread, made on first use, closed when the thread
// ends; a Process points at it only while that thread waits there.
class Waker {
 public:
  static Waker& mine();
  int fd() const { return fd_; }
  bool is_mine() const { return owner_ == std::this_thread::get_id(); }
  void signal() noexcept;
  void drain() noexcept;
  Waker(const Waker&) = delete;
  Waker& operator=(const Waker&) = delete;
  ~Waker();

 private:
  Waker();
  int fd_ = -1;
  std::thread::id owner_;
};

struct Process {
  std::uint32_t id = 0;
  Bytes pid;  // encoded
  std::string name;  // registered name, or empty (under the table's mutex)
  bool sink = false;  // a system process whose messages are dropped

  std::mutex mu;
  std::condition_variable cv;
  std::deque<Bytes> queue;  // each message with its version byte
  std::size_t queued_bytes = 0;  // of the messages in queue
  bool closed = false;
  std::vector<Watch> monitors;      // remote processes monitoring this one
  std::vector<Watch> out_monitors;  // monitors this process holds (node, ref, target)
  std::vector<std::pair<std::string, Bytes>> links;  // (node, remote pid)
  // A reader waiting for this mailbox in poll() (under mu; see Waker).
  Waker* waker = nullptr;

  // Wakes whoever waits for this mailbox: a poll()ing reader now (mu held), the
  // condition variable's waiters by notify() once mu is released.
  void wake_locked() noexcept {
    if (waker && !waker->is_mine()) waker->signal();
  }
  void notify() noexcept { cv.notify_all(); }

  // The oldest message (queue not empty; mu held).
  Bytes pop() {
    Bytes m = std::move(queue.front());
    queue.pop_front();
    queued_bytes -= m.size();
    return m;
  }
};

// What a process held towards other nodes when it ended.
struct Ended {
  std::vector<Watch> monitors;  // DOWN to each watcher
  std::vector<Watch> out;       // DEMONITOR_P to each monitored process's node
  std::vector<std::pair<std::string, Bytes>> links;  // EXIT to each linked process
};

class ProcessTable {
 public:
  // What one process may be made to hold: a message to a mailbox that already holds
  // max_queued messages or max_queued_bytes bytes is dropped (so a mailbox holds at most
  // max_queued_bytes plus one message); a monitor or link from another node beyond
  // max_queued of them is refused.
  struct Limits {
    std::size_t max_queued = 100000;
    std::size_t max_queued_bytes = std::size_t{1} << 30;
  };
  ProcessTable(std::string node, Limits l) : lim_(l), node_(std::move(node)) {}

  // The creation EPMD gave the node (0 before it registered).
  void set_creation(std::uint32_t c) { creation_.store(c); }
  const std::string& node() const { return node_; }
  std::uint32_t creation() const { return creation_.load(); }

  std::shared_ptr<Process> spawn();
  // A pid number for a process that never enters the table (a call's).
  std::uint32_t next_id() { return next_pid_++; }
  Bytes encode_pid(std::uint32_t id) const;

  bool register_name(const std::string& name, const std::shared_ptr<Process>& p);
  void unregister_name(const std::string& name);
  std::shared_ptr<Process> whereis(const std::string& name);
  std::shared_ptr<Process> find(std::uint32_t id);
  std::vector<std::shared_ptr<Process>> all();

  // Puts a message (version byte included) into a process's mailbox and wakes its
  // reader; with `wake`, the wake-up waits until the caller flushes that list.
  void deliver(const std::shared_ptr<Process>& p, Bytes msg,
               std::vector<std::shared_ptr<Process>>* wake = nullptr);
  static void flush(std::vector<std::shared_ptr<Process>>& wake);

  // Ends a process: out of the table, its mailbox closed. Returns what it held towards
  // other nodes, or false when it had ended already.
  bool close(const std::shared_ptr<Process>& p, Ended& out);
  // At the node's stop: every mailbox closed (its waiting threads wake).
  void close_all();

  // Another node's monitor of `p` (MONITOR_P). False when p has ended or holds
  // max_queued monitors already (`full`).
  bool add_monitor(const std::shared_ptr<Process>& p, Watch w, bool& full);
  void remove_monitor(const std::shared_ptr<Process>& p, const Bytes& ref);
  void record_out_monitor(const std::shared_ptr<Process>& p, Watch w);
  // Our monitor `ref` fired or was taken back: its 'DOWN' object (empty if unknown).
  Bytes take_out_monitor(const std::shared_ptr<Process>& p, const Bytes& ref);
  // A link from another node (LINK). False when p has ended or holds max_queued links
  // already (`full`).
  bool add_remote_link(const std::shared_ptr<Process>& p, const std::string& node, const Bytes& pid,
                       bool& full);
  void add_link(const std::shared_ptr<Process>& p, const std::string& node, const Bytes& pid);
  void remove_link(const std::shared_ptr<Process>& p, const Bytes& pid);

  // `node` is gone: its monitors and links on our processes go, and our processes get
  // 'DOWN' and 'EXIT' with reason noconnection for what they held on it.
  void node_down(const std::string& node);

  // Counters: messages delivered; messages, monitors and links a process had no room for.
  std::atomic<std::uint64_t> messages{0}, dropped{0};

 private:
  // Counts and logs (at most once a second) what a full process did not take: `what` is
  // "message", "monitor" or "link"; `held` how many of them it has.
  void note_dropped(const Process& p, const char* what, std::size_t held, std::size_t bytes);

  const Limits lim_;
  const std::string node_;
  std::atomic<std::uint32_t> creation_{0};
  std::mutex mu_;
  std::unordered_map<std::uint32_t, std::shared_ptr<Process>> procs_;
  std::unordered_map<std::string, std::shared_ptr<Process>> names_;
  std::atomic<std::uint32_t> next_pid_{1};
  std::atomic<std::int64_t> last_drop_log_{0};
};

}  // namespace erpy::node
