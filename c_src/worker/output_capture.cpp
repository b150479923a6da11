#include "output_capture.hpp"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <string>

#include "etf/encode.hpp"
#include "process.hpp"

namespace erpy::worker {
namespace {

// Lines longer than this are sent in pieces, so one print cannot exhaust memory.
constexpr std::size_t kMaxLine = 64 * 1024;

// The read end is the worker's alone (close-on-exec, closed in forked children): a child
// holding it could take lines meant for Erlang, and would keep the pipe open for writers
// after the worker is gone. The write end becomes fd 1 or 2, which children do inherit.
int redirect(int target) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return -1;
  dup2(fds[1], target);
  close(fds[1]);
  return fds[0];
}

void send_line(Channel& ch, const char* stream, std::string_view line) {
  ByteBuffer b;
  Channel::begin_tuple_frame(b, 3, "log");
  etf::put_atom(b, stream);
  etf::put_binary(b, etf::Bytes(reinterpret_cast<const std::uint8_t*>(line.data()), line.size()));
  ch.write_frame(b);
}

}  // namespace

void OutputCapture::start() {
  out_read_ = redirect(1);
  err_read_ = redirect(2);
  process::close_in_children(&out_read_);
  process::close_in_children(&err_read_);
  if (out_read_ < 0 || err_read_ < 0) return;
  thread_ = std::thread([this] { run(); });
}

OutputCapture::~OutputCapture() {
  // The thread ends when both pipes reach EOF, which needs every writer closed: at exit
  // the process just ends, so it is detached rather than joined.
  if (thread_.joinable()) thread_.detach();
}

void OutputCapture::run() {
  struct Stream {
    int fd;
    int* owner;  // the member forked children look at
    const char* name;
    std::string pending;
  } streams[2] = {{out_read_, &out_read_, "stdout", {}}, {err_read_, &err_read_, "stderr", {}}};
  char buf[8192];
  int open_streams = 2;
  while (open_streams) {
    pollfd pfds[2] = {{streams[0].fd, POLLIN, 0}, {streams[1].fd, POLLIN, 0}};
    // A partial line is sent after a quiet moment, so a prompt without newline shows up.
    const bool any_pending = !streams[0].pending.empty() || !streams[1].pending.empty();
    const int ready = poll(pfds, 2, any_pending ? 50 : -1);
    if (ready < 0) continue;
    for (int i = 0; i < 2; ++i) {
      Stream& s = streams[i];
      if (s.fd < 0) continue;
      if (ready == 0) {
        if (!s.pending.empty()) send_line(ch_, s.name, s.pending);
        s.pending.clear();
        continue;
      }
      if (!(pfds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      const ssize_t n = read(s.fd, buf, sizeof buf);
      if (n <= 0) {
        if (!s.pending.empty()) send_line(ch_, s.name, s.pending);
        *s.owner = -1;  // first, so a fork from now on never closes a reused number
        close(s.fd);
        s.fd = -1;
        --open_streams;
        continue;
      }
      s.pending.append(buf, static_cast<std::size_t>(n));
      std::size_t start = 0;
      for (std::size_t nl; (nl = s.pending.find('\n', start)) != std::string::npos; start = nl + 1) {
        send_line(ch_, s.name, std::string_view(s.pending).substr(start, nl - start));
      }
      s.pending.erase(0, start);
      while (s.pending.size() >= kMaxLine) {
        send_line(ch_, s.name, std::string_view(s.pending).substr(0, kMaxLine));
        s.pending.erase(0, kMaxLine);
      }
    }
  }
}

}  // namespace erpy::worker
