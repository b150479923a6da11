#include "runner.hpp"

namespace erpy::py {

namespace {

PyRef make_atom(const Types& t, const char* text) {
  PyRef s = PyRef::check(PyUnicode_FromString(text));
  return PyRef::check(PyObject_CallOneArg(t.atom.get(), s.get()));
}

// Text Python chose for an error (its message, its type's name, a traceback line) as an
// exact str that encodes as UTF-8: a str subclass (whose methods are the code's own) is
// copied and lone surrogates are escaped (\udc80), so the error map always has an Erlang
// form. Empty if there is no text to be had (the Python error is cleared).
PyRef clean_text(PyRef s) {
  if (!s || !PyUnicode_Check(s.get())) {
    PyErr_Clear();
    return {};
  }
  if (PyUnicode_CheckExact(s.get()) && PyUnicode_AsUTF8AndSize(s.get(), nullptr)) return s;
  PyErr_Clear();
  PyRef utf8 = PyRef::steal(PyUnicode_AsEncodedString(s.get(), "utf-8", "backslashreplace"));
  PyRef out = utf8 ? PyRef::steal(PyUnicode_DecodeUTF8(PyBytes_AS_STRING(utf8.get()),
                                                       PyBytes_GET_SIZE(utf8.get()), "strict"))
                   : PyRef();
  if (!out) PyErr_Clear();
  return out;
}

}  // namespace

PyRef apply_arguments(PyObject* args) {
  if (!PyList_Check(args) && !PyTuple_Check(args)) {
    PyErr_SetString(PyExc_TypeError, "apply(): arguments must be a list");
    throw PythonError();
  }
  return PyRef::check(PySequence_List(args));
}

void interrupt_thread(unsigned long thread_id) {
  PyThreadState_SetAsyncExc(thread_id, PyExc_KeyboardInterrupt);
  wake_event_loop(thread_id);
}

void wake_event_loop(unsigned long thread_id) {
  // Only a thread that ran an awaitable has imported erpy._aio: nothing to wake otherwise.
  PyObject* modules = PyImport_GetModuleDict();  // borrowed
  PyObject* aio = modules ? PyDict_GetItemString(modules, "erpy._aio") : nullptr;  // borrowed
  if (!aio) return;
  PyRef tid = PyRef::steal(PyLong_FromUnsignedLong(thread_id));
  PyRef done = tid ? PyRef::steal(PyObject_CallMethod(aio, "wake", "O", tid.get())) : PyRef();
  if (!done) PyErr_Clear();
}

Runner::Runner(const Types& types, PyRef erlang_module) : erlang_module_(std::move(erlang_module)) {
  builtins_ = PyRef::check(PyImport_ImportModule("builtins"));
  name_ = PyRef::check(PyUnicode_FromString("__erpy__"));
  code_cache_ = PyRef::check(PyDict_New());
  k_type_ = make_atom(types, "type");
  k_message_ = make_atom(types, "message");
  k_traceback_ = make_atom(types, "traceback");
}

PyRef Runner::fresh_namespace() {
  PyRef ns = PyRef::check(PyDict_New());
  if (PyDict_SetItemString(ns.get(), "__builtins__", builtins_.get()) != 0 ||
      PyDict_SetItemString(ns.get(), "__name__", name_.get()) != 0 ||
      PyDict_SetItemString(ns.get(), "erlang", erlang_module_.get()) != 0) {
    throw PythonError();
  }
  return ns;
}

PyRef Runner::compiled(PyObject* source, int mode) {
  if (!PyUnicode_Check(source)) {
    PyErr_Format(PyExc_TypeError, "code must be text, not %s", Py_TYPE(source)->tp_name);
    throw PythonError();
  }
  PyRef key = PyRef::check(Py_BuildValue("(Oi)", source, mode));
  if (PyObject* hit = PyDict_GetItemWithError(code_cache_.get(), key.get())) return PyRef::borrow(hit);
  if (PyErr_Occurred()) throw PythonError();
  const char* text = PyUnicode_AsUTF8(source);
  if (!text) throw PythonError();
  PyRef code = PyRef::check(Py_CompileString(text, "<erpy>", mode));
  if (PyDict_GET_SIZE(code_cache_.get()) >= kMaxCachedCode) PyDict_Clear(code_cache_.get());
  if (PyDict_SetItem(code_cache_.get(), key.get(), code.get()) != 0) throw PythonError();
  return code;
}

PyRef Runner::resolve(PyObject* m, PyObject* f) {
  if (!PyUnicode_Check(m) || !PyUnicode_Check(f)) {
    PyErr_SetString(PyExc_TypeError, "module and function names must be text");
    throw PythonError();
  }
  PyRef module = PyRef::steal(PyImport_GetModule(m));  // sys.modules first: no import machinery
  if (!module) {
    if (PyErr_Occurred()) throw PythonError();
    module = PyRef::check(PyImport_Import(m));
  }
  return attribute_path(module.get(), f);
}

PyRef Runner::call(PyObject* m, PyObject* f, PyObject* args, PyObject* kwargs) {
  PyRef target = resolve(m, f);
  return invoke(target.get(), args, kwargs);
}

PyRef Runner::call_on(PyObject* object, PyObject* f, PyObject* args, PyObject* kwargs) {
  if (!PyUnicode_Check(f)) {
    PyErr_SetString(PyExc_TypeError, "function names must be text");
    throw PythonError();
  }
  PyRef target = attribute_path(object, f);
  return invoke(target.get(), args, kwargs);
}

PyRef Runner::attribute_path(PyObject* object, PyObject* f) {
  // A dotted function name walks attributes: "Class.method", "sub.func".
  PyRef target = PyRef::borrow(object);
  Py_ssize_t start = 0;
  const Py_ssize_t len = PyUnicode_GET_LENGTH(f);
  while (start <= len) {
    Py_ssize_t dot = PyUnicode_FindChar(f, '.', start, len, 1);
    if (dot == -2) throw PythonError();
    const Py_ssize_t end = dot < 0 ? len : dot;
    PyRef part = PyRef::check(PyUnicode_Substring(f, start, end));
    target = PyRef::check(PyObject_GetAttr(target.get(), part.get()));
    if (dot < 0) break;
    start = dot + 1;
  }
  return target;
}

PyRef Runner::invoke(PyObject* target, PyObject* args, PyObject* kwargs) {
  if (!PyList_Check(args)) {
    PyErr_SetString(PyExc_TypeError, "call arguments must be a list");
    throw PythonError();
  }
  PyRef argt = PyRef::check(PyList_AsTuple(args));
  PyObject* kw = (kwargs && PyDict_Check(kwargs) && PyDict_GET_SIZE(kwargs) > 0) ? kwargs : nullptr;
  return PyRef::check(PyObject_Call(target, argt.get(), kw));
}

PyRef Runner::execute(const Request& r, PyObject* ns) {
  PyRef result = dispatch(r, ns);
  // An awaitable result (a coroutine, async def called by name) runs to its end on the
  // thread's event loop (erpy._aio): its value is the answer.
  PyTypeObject* type = Py_TYPE(result.get());
  if (type->tp_as_async && type->tp_as_async->am_await) return await(result.get());
  return result;
}

PyRef Runner::await(PyObject* awaitable) {
  if (!aio_run_) {
    PyRef aio = PyRef::check(PyImport_ImportModule("erpy._aio"));
    aio_run_ = PyRef::check(PyObject_GetAttrString(aio.get(), "run"));
  }
  return PyRef::check(PyObject_CallOneArg(aio_run_.get(), awaitable));
}

PyRef Runner::dispatch(const Request& r, PyObject* ns) {
  switch (r.kind) {
    case RequestKind::Call:
      if (!r.target) return call(r.module.get(), r.function.get(), r.args.get(), r.kwargs.get());
      if (r.function && r.function.get() != Py_None) {
        return call_on(r.target.get(), r.function.get(), r.args.get(), r.kwargs.get());
      }
      {
        PyRef args = apply_arguments(r.args.get());
        return invoke(r.target.get(), args.get(), r.kwargs.get());
      }
    case RequestKind::Eval: {
      if (r.locals) return eval(r.code.get(), ns, r.locals.get());
      PyRef locals = PyRef::check(PyDict_New());
      return eval(r.code.get(), ns, locals.get());
    }
    case RequestKind::Exec:
      return exec(r.code.get(), ns);
    case RequestKind::Run:
      return run(r.code.get(), r.args ? r.args.get() : Py_None, ns);
  }
  PyErr_SetString(PyExc_SystemError, "request of no kind");
  throw PythonError();
}

PyRef Runner::eval(PyObject* source, PyObject* ns, PyObject* locals) {
  PyRef code = compiled(source, Py_eval_input);
  if (!PyDict_Check(locals)) {
    PyErr_SetString(PyExc_TypeError, "eval locals must be a map");
    throw PythonError();
  }
  return PyRef::check(PyEval_EvalCode(code.get(), ns, locals));
}

PyRef Runner::exec(PyObject* source, PyObject* ns) {
  PyRef code = compiled(source, Py_file_input);
  PyRef done = PyRef::check(PyEval_EvalCode(code.get(), ns, ns));
  return PyRef::borrow(Py_None);
}

PyRef Runner::run(PyObject* source, PyObject* arguments, PyObject* ns) {
  PyRef code = compiled(source, Py_file_input);
  if (PyDict_SetItemString(ns, "arguments", arguments) != 0 ||
      PyDict_SetItemString(ns, "result", Py_None) != 0) {
    throw PythonError();
  }
  PyRef done = PyRef::check(PyEval_EvalCode(code.get(), ns, ns));
  PyObject* result = PyDict_GetItemString(ns, "result");  // borrowed
  return PyRef::borrow(result ? result : Py_None);
}

PyRef Runner::error(const char* type, std::string_view message) {
  PyRef m = PyRef::check(PyDict_New());
  PyRef t = PyRef::check(PyUnicode_FromString(type));
  PyRef msg = PyRef::check(PyUnicode_DecodeUTF8(message.data(), static_cast<Py_ssize_t>(message.size()), "replace"));
  PyRef tb = PyRef::check(PyList_New(0));
  if (PyDict_SetItem(m.get(), k_type_.get(), t.get()) != 0 ||
      PyDict_SetItem(m.get(), k_message_.get(), msg.get()) != 0 ||
      PyDict_SetItem(m.get(), k_traceback_.get(), tb.get()) != 0) {
    throw PythonError();
  }
  return m;
}

PyRef Runner::error_from_exception() {
  PyObject *type = nullptr, *value = nullptr, *tb = nullptr;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  PyRef t = PyRef::steal(type), v = PyRef::steal(value), trace = PyRef::steal(tb);
  if (trace && v) PyException_SetTraceback(v.get(), trace.get());
  if (!t) return error("SystemError", "an error without an exception");
  PyRef m = PyRef::check(PyDict_New());
  PyRef name = clean_text(PyRef::steal(PyType_GetName(reinterpret_cast<PyTypeObject*>(t.get()))));
  PyRef msg = clean_text(v ? PyRef::steal(PyObject_Str(v.get())) : PyRef::check(PyUnicode_FromString("")));
  if (!msg) msg = PyRef::check(PyUnicode_FromString("<unprintable>"));
  if (!format_exception_) {
    // Imported on the first error, not at start: traceback pulls in re, tokenize, ...
    PyRef tb = PyRef::steal(PyImport_ImportModule("traceback"));
    if (tb) format_exception_ = PyRef::steal(PyObject_GetAttrString(tb.get(), "format_exception"));
    if (!format_exception_) PyErr_Clear();
  }
  PyRef lines = (v && format_exception_) ? PyRef::steal(PyObject_CallOneArg(format_exception_.get(), v.get()))
                                         : PyRef();
  if (lines && PyList_CheckExact(lines.get())) {
    PyRef clean = PyRef::check(PyList_New(0));
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(lines.get()); ++i) {
      PyRef line = clean_text(PyRef::borrow(PyList_GET_ITEM(lines.get(), i)));
      if (line && PyList_Append(clean.get(), line.get()) != 0) throw PythonError();
    }
    lines = std::move(clean);
  } else {
    PyErr_Clear();
    lines = PyRef::check(PyList_New(0));
  }
  if (!name) {
    PyErr_Clear();
    name = PyRef::check(PyUnicode_FromString("Exception"));
  }
  if (PyDict_SetItem(m.get(), k_type_.get(), name.get()) != 0 ||
      PyDict_SetItem(m.get(), k_message_.get(), msg.get()) != 0 ||
      PyDict_SetItem(m.get(), k_traceback_.get(), lines.get()) != 0) {
    throw PythonError();
  }
  return m;
}

}  // namespace erpy::py
