// What every mode does with a request once its arguments are Python objects: call a
// function by dotted name, eval an expression, exec statements, run an erl_py_runner
// snippet; and what it reports when Python raises: #{type, message, traceback}.
// The port worker, the NIF and the node (its erpy.service, through erpy._node) all run
// requests through one Runner, so the modes cannot drift apart. Needs the GIL; throws
// PythonError with the exception left set.
#pragma once
#include <string>
#include <string_view>

#include "codec.hpp"
#include "ref.hpp"
#include "request.hpp"

namespace erpy::py {

// The argument list of `erlang.apply(m, f, args)` as a list: a list or tuple is taken,
// anything else raises TypeError (PythonError thrown). Every mode checks it so.
PyRef apply_arguments(PyObject* args);

// Raises KeyboardInterrupt in the thread `thread_id` (a PyThreadState's id; call with the
// GIL) and wakes the event loop it runs a request on, if it does (erpy._aio): the
// exception lands only when that thread runs Python code again. Every mode interrupts so.
void interrupt_thread(unsigned long thread_id);
// The second half alone, for a caller that raised the exception under a lock of its own
// (waking runs Python code, which may release the GIL).
void wake_event_loop(unsigned long thread_id);

class Runner {
 public:
  // `erlang_module` is what snippets see as `erlang` (the module erpy.erlang).
  Runner(const Types& types, PyRef erlang_module);

  // A namespace for exec/eval/run: builtins, __name__ and `erlang`.
  PyRef fresh_namespace();

  // The object Module.Function names: the module from sys.modules (imported if it is
  // not there), then each dotted part of Function ("Class.method").
  PyRef resolve(PyObject* module, PyObject* function);
  // Module.Function(*Args, **Kwargs), Function found as resolve() finds it.
  PyRef call(PyObject* module, PyObject* function, PyObject* args, PyObject* kwargs);
  // The same with an object (a handle) in place of the module.
  PyRef call_on(PyObject* target, PyObject* function, PyObject* args, PyObject* kwargs);
  // Runs a request of any mode (request.hpp): its `target` if the mode's policy set one,
  // else Module.Function; eval/exec/run in `ns` (a fresh or a held worker's namespace),
  // which callers make only when uses_namespace(r.kind). An awaitable result is run to
  // its end on the thread's event loop (python/erpy/_aio.py).
  PyRef execute(const Request& r, PyObject* ns);
  PyRef eval(PyObject* source, PyObject* ns, PyObject* locals);
  // Always returns None.
  PyRef exec(PyObject* source, PyObject* ns);
  // erl_py_runner's contract: `arguments` in, `result` (default None) out.
  PyRef run(PyObject* source, PyObject* arguments, PyObject* ns);

  // The pending exception as #{type, message, traceback} (atom keys); clears it.
  PyRef error_from_exception();
  PyRef error(const char* type, std::string_view message);

  const PyRef& erlang_module() const noexcept { return erlang_module_; }

 private:
  PyRef dispatch(const Request& r, PyObject* ns);
  PyRef await(PyObject* awaitable);
  // Object.Function, each dotted part an attribute.
  static PyRef attribute_path(PyObject* object, PyObject* function);
  static PyRef invoke(PyObject* target, PyObject* args, PyObject* kwargs);
  // Compiling costs more than running a short snippet, and callers repeat their snippets.
  PyRef compiled(PyObject* source, int mode);
  static constexpr Py_ssize_t kMaxCachedCode = 512;

  PyRef erlang_module_;
  PyRef builtins_;
  PyRef name_;
  PyRef code_cache_;
  PyRef format_exception_;
  PyRef aio_run_;  // erpy._aio.run, imported on the first awaitable result
  PyRef k_type_, k_message_, k_traceback_;
};

}  // namespace erpy::py
