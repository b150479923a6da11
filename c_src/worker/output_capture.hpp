// Python's stdout and stderr (fds 1 and 2, so C extensions and child processes too) are
// pipes read by a thread that sends each line to Erlang as {log, stdout | stderr, Line}.
// The protocol runs on other fds, so nothing printed can corrupt it.
#pragma once
#include <thread>

#include "channel.hpp"

namespace erpy::worker {

class OutputCapture {
 public:
  explicit OutputCapture(Channel& ch) : ch_(ch) {}
  ~OutputCapture();
  OutputCapture(const OutputCapture&) = delete;
  OutputCapture& operator=(const OutputCapture&) = delete;

  // Replaces fds 1 and 2 with pipes and starts the reader thread.
  void start();

 private:
  void run();

  Channel& ch_;
  int out_read_ = -1;
  int err_read_ = -1;
  std::thread thread_;
};

}  // namespace erpy::worker
