// erpy._embedded: the backend of erpy.erlang inside the VM. erlang.call/apply/send become
// a message to the Erlang process the code runs for, which checks the allow-list and runs
// the function (or sends); the context thread waits without the GIL (and runs nested
// requests).
#include <string>

#include "pool.hpp"
#include "runtime.hpp"

namespace erpy::nif {

namespace {

using py::PyRef;
using py::PythonError;

Context* context_or_raise(const char* what) {
  Context* c = current_context();
  if (!c) {
    PyErr_Format(Runtime::get().erlang_port_error(),
                 "%s: not inside an erpy request (no Erlang caller on this thread)", what);
    throw PythonError();
  }
  return c;
}

template <class F>
PyObject* guarded(F&& f) {
  return py::guarded(&Runtime::get().codec().types(), std::forward<F>(f));
}

PyObject* erlang_call(PyObject*, PyObject* args) {
  PyObject *m, *f, *a;
  if (!PyArg_ParseTuple(args, "OOO:call", &m, &f, &a)) return nullptr;
  return guarded([&] {
    Context* c = context_or_raise("erlang.call");
    PyRef list = PyRef::check(PyList_New(1));
    Py_INCREF(a);
    PyList_SET_ITEM(list.get(), 0, a);
    return c->pool->erlang_callback(*c, "call", m, f, list.get()).release();
  });
}

PyObject* erlang_apply(PyObject*, PyObject* args) {
  PyObject *m, *f, *a;
  if (!PyArg_ParseTuple(args, "OOO:apply", &m, &f, &a)) return nullptr;
  return guarded([&] {
    PyRef list = py::apply_arguments(a);
    Context* c = context_or_raise("erlang.apply");
    return c->pool->erlang_callback(*c, "apply", m, f, list.get()).release();
  });
}

// A message, sent by the Erlang process the code runs for: a callback like erlang.call
// ({callback, Ctx, send, Dest, undefined, [Msg]}), so that the pool's policy sees it.
PyObject* erlang_send(PyObject*, PyObject* args) {
  PyObject *dest, *msg;
  if (!PyArg_ParseTuple(args, "OO:send", &dest, &msg)) return nullptr;
  return guarded([&]() -> PyObject* {
    Context* c = context_or_raise("erlang.send");
    PyRef list = PyRef::check(PyList_New(1));
    Py_INCREF(msg);
    PyList_SET_ITEM(list.get(), 0, msg);
    PyRef ignored = c->pool->erlang_callback(*c, "send", dest, nullptr, list.get());
    Py_RETURN_NONE;
  });
}

PyObject* erlang_self(PyObject*, PyObject*) {
  return guarded([&] {
    Context* c = context_or_raise("erlang.self");
    ErlNifPid caller;
    {
      // The innermost running job's caller; the list only changes on this thread.
      if (c->running.empty()) {
        PyErr_SetString(Runtime::get().erlang_port_error(), "erlang.self: no request is running");
        throw PythonError();
      }
      caller = c->running.back()->caller;
    }
    OwnedEnv env = OwnedEnv::alloc();
    return Runtime::get()
        .converter()
        .to_python(env.get(), enif_make_pid(env.get(), &caller), c->pool->options().convert)
        .release();
  });
}

// log(stream, text): a line of print() output, for the pool's logger.
PyObject* log(PyObject*, PyObject* args) {
  PyObject *stream, *text;
  if (!PyArg_ParseTuple(args, "OO:log", &stream, &text)) return nullptr;
  Context* c = current_context();
  if (!c) Py_RETURN_FALSE;  // a thread of the user's own: the caller writes to stderr
  return guarded([&]() -> PyObject* {
    c->pool->log(stream, text);
    Py_RETURN_TRUE;
  });
}

PyMethodDef kMethods[] = {
    {"erlang_call", erlang_call, METH_VARARGS, "erlang_call(module, function, arg)\n--\n\nModule:Function(Arg) in Erlang."},
    {"erlang_apply", erlang_apply, METH_VARARGS, "erlang_apply(module, function, args)\n--\n\napply(M, F, Args) in Erlang."},
    {"erlang_send", erlang_send, METH_VARARGS, "erlang_send(dest, message)\n--\n\nSend a message to a pid or registered name."},
    {"erlang_self", erlang_self, METH_NOARGS, "erlang_self()\n--\n\nThe pid of the Erlang process this code runs for."},
    {"log", log, METH_VARARGS, "log(stream, text)\n--\n\nA line of output for the Erlang logger."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "erpy._embedded",
                       "erpy.erlang's backend when Python runs inside the Erlang VM (embedded mode).", -1,
                       kMethods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyObject* make_embedded_module() { return PyModule_Create(&kModule); }

}  // namespace erpy::nif
