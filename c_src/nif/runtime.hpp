// The embedded interpreter: one per VM, started once by init/2 and kept for the life of
// the VM (CPython cannot be finalized and started again reliably once extension modules
// were loaded), so stopping erpy detaches from Python and starting it again reuses it.
//
// It owns the service thread, which initializes Python (so no scheduler thread ever runs
// Python, not even at start), then serves: references Erlang let go of are dropped under
// the GIL, canceled jobs are interrupted, long jobs get their caller monitored.
#pragma once
#include <erl_nif.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "convert.hpp"
#include "py/codec.hpp"
#include "py/runner.hpp"

namespace erpy::nif {

class Pool;
struct Context;

struct ResourceTypes {
  ErlNifResourceType* job = nullptr;
  ErlNifResourceType* pool = nullptr;
  ErlNifResourceType* context = nullptr;
  ErlNifResourceType* lent = nullptr;  // handles and lent bytes
};

struct PoolHandle {
  std::shared_ptr<Pool> pool;
};

class Runtime {
 public:
  static Runtime& get();

  ResourceTypes types;

  // Starts Python on the service thread and waits for it. Empty when it runs.
  std::string init(const std::string& executable, const std::string& python_dir);
  bool ready() const noexcept { return ready_.load(std::memory_order_acquire); }

  // From any thread, without the GIL.
  void drop_later(PyObject* obj) noexcept;
  void wake();  // something to interrupt
  void add_pool(const std::shared_ptr<Pool>& p);

  // With the GIL (context threads).
  py::Codec& codec() { return *codec_; }
  Converter& converter() { return *converter_; }
  py::Runner& runner() { return *runner_; }
  PyObject* erlang_error() const noexcept { return erlang_error_.get(); }
  PyObject* erlang_timeout_error() const noexcept { return erlang_timeout_error_.get(); }
  PyObject* erlang_port_error() const noexcept { return erlang_port_error_.get(); }

  std::string executable() const { return executable_; }

 private:
  Runtime() = default;
  void service(std::string executable, std::string python_dir);
  void tick(PyThreadState*& main_state);
  std::string start_python(const std::string& executable, const std::string& python_dir);

  std::mutex m_;
  std::condition_variable cv_;
  std::thread thread_;
  bool started_ = false;
  std::atomic<bool> ready_{false};  // read by any scheduler, without the mutex
  bool init_done_ = false;
  std::string init_error_;
  std::string executable_;
  std::vector<PyObject*> drops_;
  bool work_ = false;
  std::vector<std::weak_ptr<Pool>> pools_;

  std::optional<py::Codec> codec_;
  std::optional<Converter> converter_;
  std::optional<py::Runner> runner_;
  py::PyRef erlang_error_, erlang_timeout_error_, erlang_port_error_;
};

// The Python module erpy._embedded (erpy.erlang's backend inside the VM).
PyObject* make_embedded_module();

// The context the current thread serves, or null (not a context thread).
Context* current_context() noexcept;
void set_current_context(Context* c) noexcept;

}  // namespace erpy::nif
