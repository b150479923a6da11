#include "runtime.hpp"

#include <dlfcn.h>
#include <malloc.h>

#include <chrono>
#include <cstdio>

#include "pool.hpp"

namespace erpy::nif {

using py::PyRef;
using py::PythonError;

namespace {

thread_local Context* tls_context = nullptr;

// Extension modules (math, _socket, numpy) resolve the Python C API from the global
// symbol namespace, but the VM loads NIF libraries with RTLD_LOCAL: make libpython's
// symbols global. Our own library is pinned too, so an unloaded NIF never leaves the
// service or context threads running code that is gone.
void make_symbols_global() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&Py_IsInitialized), &info) && info.dli_fname) {
    dlopen(info.dli_fname, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
  }
  if (dladdr(reinterpret_cast<void*>(&make_symbols_global), &info) && info.dli_fname) {
    dlopen(info.dli_fname, RTLD_NOW | RTLD_NODELETE);
  }
}

std::string python_error_text() {
  PyObject *t = nullptr, *v = nullptr, *tb = nullptr;
  PyErr_Fetch(&t, &v, &tb);
  PyRef type = PyRef::steal(t), value = PyRef::steal(v), trace = PyRef::steal(tb);
  if (!value) return "unknown Python error";
  PyRef s = PyRef::steal(PyObject_Str(value.get()));
  const char* text = s ? PyUnicode_AsUTF8(s.get()) : nullptr;
  std::string out = type ? reinterpret_cast<PyTypeObject*>(type.get())->tp_name : "Error";
  out += ": ";
  out += text ? text : "<unprintable>";
  PyErr_Clear();
  return out;
}

}  // namespace

Context* current_context() noexcept { return tls_context; }
void set_current_context(Context* c) noexcept { tls_context = c; }

Runtime& Runtime::get() {
  // Never destroyed: threads may outlive static destruction at VM exit.
  static Runtime* r = new Runtime();
  return *r;
}

std::string Runtime::init(const std::string& executable, const std::string& python_dir) {
  std::unique_lock<std::mutex> lock(m_);
  if (!started_) {
    make_symbols_global();
    try {
      thread_ = std::thread([this, executable, python_dir] { service(executable, python_dir); });
    } catch (const std::exception& e) {
      // No thread now (the system's limit on threads or memory): a later init tries again.
      return std::string("no thread to start Python on: ") + e.what();
    }
    started_ = true;
    thread_.detach();
  }
  cv_.wait(lock, [this] { return init_done_; });
  return init_error_;
}

std::string Runtime::start_python(const std::string& executable, const std::string& python_dir) {
  // Python allocates large objects (a 1 MiB bytes) with malloc. By default glibc maps
  // each one fresh and returns it on free, so every large result costs a page fault per
  // 4 KiB (about half the time of a 1 MiB echo here). Keeping blocks up to 64 MiB in the
  // heap, and the heap from shrinking under 256 MiB, makes them reusable.
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
  PyConfig config;
  PyConfig_InitPythonConfig(&config);
  // Signals belong to the VM: Python installs no handlers and never sees SIGINT.
  config.install_signal_handlers = 0;
  config.parse_argv = 0;
  config.buffered_stdio = 0;
  // The executable decides sys.prefix and site-packages (a venv's python finds its venv).
  if (!executable.empty()) {
    PyStatus st = PyConfig_SetBytesString(&config, &config.program_name, executable.c_str());
    if (PyStatus_Exception(st)) {
      PyConfig_Clear(&config);
      return st.err_msg ? st.err_msg : "bad executable";
    }
  }
  PyStatus st = Py_InitializeFromConfig(&config);
  PyConfig_Clear(&config);
  if (PyStatus_Exception(st)) return std::string("Python did not start: ") + (st.err_msg ? st.err_msg : "?");
  executable_ = executable;
  try {
    PyRef sys_path = PyRef::borrow(PySys_GetObject("path"));
    PyRef dir = PyRef::check(PyUnicode_DecodeFSDefault(python_dir.c_str()));
    if (!sys_path || PyList_Insert(sys_path.get(), 0, dir.get()) != 0) throw PythonError();
    PyRef embedded = PyRef::check(make_embedded_module());
    PyObject* modules = PyImport_GetModuleDict();
    if (PyDict_SetItemString(modules, "erpy._embedded", embedded.get()) != 0) throw PythonError();
    PyRef types = PyRef::check(PyImport_ImportModule("erpy._types"));
    PyRef errors = PyRef::check(PyImport_ImportModule("erpy._errors"));
    codec_.emplace(py::Types::load(types.get(), errors.get()));
    converter_.emplace(*codec_, this->types.lent);
    PyRef erlang = PyRef::check(PyImport_ImportModule("erpy.erlang"));
    erlang_error_ = PyRef::check(PyObject_GetAttrString(erlang.get(), "ErlangError"));
    erlang_timeout_error_ = PyRef::check(PyObject_GetAttrString(erlang.get(), "ErlangTimeoutError"));
    erlang_port_error_ = PyRef::check(PyObject_GetAttrString(erlang.get(), "ErlangPortError"));
    runner_.emplace(codec_->types(), std::move(erlang));
    // print() and stderr become log lines of the pool whose context wrote them.
    PyRef io = PyRef::check(PyImport_ImportModule("erpy._embedded_io"));
    PyRef done = PyRef::check(PyObject_CallMethod(io.get(), "install", nullptr));
  } catch (const PythonError&) {
    return python_error_text();
  } catch (const std::exception& e) {
    PyErr_Clear();
    return e.what();
  }
  return {};
}

void Runtime::service(std::string executable, std::string python_dir) {
  std::string error = start_python(executable, python_dir);
  PyThreadState* main_state = nullptr;
  if (Py_IsInitialized()) main_state = PyEval_SaveThread();  // from here on the GIL is free
  {
    std::lock_guard<std::mutex> lock(m_);
    init_error_ = error;
    ready_ = error.empty();
    init_done_ = true;
  }
  cv_.notify_all();
  if (!ready_) return;

  for (;;) {
    // One tick at a time, so that a failure (a C++ error, the system refusing memory)
    // costs one tick's work and never the thread that interrupts every pool.
    try {
      tick(main_state);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "erpy_nif: service thread: %s\n", e.what());
    } catch (...) {
      std::fprintf(stderr, "erpy_nif: service thread: unknown C++ exception\n");
    }
  }
}

void Runtime::tick(PyThreadState*& main_state) {
  std::vector<PyObject*> drops;
  std::vector<std::shared_ptr<Pool>> pools;
  {
    std::unique_lock<std::mutex> lock(m_);
    // While jobs run, look every few milliseconds for callers to watch; otherwise sleep.
    cv_.wait_for(lock, std::chrono::milliseconds(10), [this] { return work_; });
    work_ = false;
    drops.swap(drops_);
    for (auto it = pools_.begin(); it != pools_.end();) {
      if (auto p = it->lock()) {
        pools.push_back(std::move(p));
        ++it;
      } else {
        it = pools_.erase(it);
      }
    }
  }
  // Watching callers needs no Python; interrupts and dropped references do.
  bool interrupts = false;
  for (auto& p : pools) {
    p->kick_stalled();
    p->monitor_long_jobs(std::chrono::milliseconds(20));
    p->expire_async();
    interrupts = interrupts || p->has_interrupts();
  }
  if (!drops.empty() || interrupts) {
    {
      PyEval_RestoreThread(main_state);
      struct Save {  // the GIL goes back on every path
        PyThreadState*& state;
        ~Save() { state = PyEval_SaveThread(); }
      } save{main_state};
      for (PyObject* o : drops) Py_DECREF(o);
      for (auto& p : pools) p->interrupt_canceled();
    }
    for (auto& p : pools) p->replace_stuck();
  }
  // A pool's last reference may go here, when `pools` ends: no GIL needed for that.
}

void Runtime::drop_later(PyObject* obj) noexcept {
  {
    std::lock_guard<std::mutex> lock(m_);
    try {
      drops_.push_back(obj);
    } catch (...) {
      return;  // no memory for the list: the object leaks, which is the lesser harm here
    }
    // Batches: a burst of garbage-collected handles costs one GIL acquisition.
    if (drops_.size() < 64) return;
    work_ = true;
  }
  cv_.notify_one();
}

void Runtime::wake() {
  {
    std::lock_guard<std::mutex> lock(m_);
    work_ = true;
  }
  cv_.notify_one();
}

void Runtime::add_pool(const std::shared_ptr<Pool>& p) {
  std::lock_guard<std::mutex> lock(m_);
  pools_.push_back(p);
}

}  // namespace erpy::nif
