// The worker's OS process and what the Python code it runs may do with it.
//
// - Session: the worker leads its own session and process group, so Erlang can end it
//   together with everything its code started (kill -KILL -Pid).
// - Private fds: the protocol pipes and the output-capture read ends are close-on-exec
//   (an exec'd child never has them) and, in a child made by fork() without exec
//   (os.fork, multiprocessing's fork start method), replaced by /dev/null or closed
//   before the child runs any code. So no child can read requests, write frames, or keep
//   a pipe of the worker open after the worker is gone.
// - rlimits: set on the worker itself (soft and hard) before any request runs, so user
//   code cannot raise them again and every child inherits them.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace erpy::worker::process {

// Makes the worker lead its own session (erl_child_setup already does; other launchers
// may not). Call before any thread starts.
void own_session() noexcept;

// Keeps the read end of the request pipe `fd` open in a small child of the worker (in
// its process group) until Erlang closes the pipe's write end. Without it, a frame Erlang
// writes after the worker died (a pipelined request, a cancel) fails with EPIPE, and the
// VM then closes the port at once, dropping the answers the worker wrote before it died
// but the VM had not read yet: requests that ran would be reported as lost. With it, such
// a write lands in the pipe, and the port closes as a dead worker's does (its exit
// status, after the VM has read all it wrote). Call after own_session() and before
// protect() (whose fork handler would take the fd from the child). False if it could not
// start (the worker runs without it).
bool keep_pipe_open(int fd) noexcept;

// `fd` is the worker's alone: close-on-exec, and /dev/null in forked children (the
// number stays taken there, so nothing the child opens later is mistaken for it).
void protect(int fd) noexcept;

// `*fd` (read at fork time; -1 for none) is closed in forked children.
void close_in_children(const int* fd) noexcept;

// True in a child forked from the worker (it may not use the protocol).
bool forked_child() noexcept;

// Kills (SIGKILL) the other processes of the worker's process group, if it leads one: what
// its code started ends with it, also when the VM itself is gone (Linux /proc).
void end_group() noexcept;

// One limit of the pool's `rlimits` option: `name` is the option's key (as, cpu, nofile,
// nproc, fsize, core); no value means unlimited.
struct Limit {
  std::string name;
  std::optional<std::uint64_t> value;
};

// Sets each limit as soft and hard limit (a value above the current hard limit, which an
// unprivileged process cannot raise, means the hard limit). Returns what failed, or an
// empty string.
std::string set_limits(const std::vector<Limit>& limits);

}  // namespace erpy::worker::process
