// Ownership of Python objects made visible: PyRef owns one strong reference, and every
// place that takes a raw pointer says whether it steals or borrows it. Guards for the GIL
// and for Py_buffer views. Nothing here is specific to the extension module: the port
// worker and the NIF use the same wrappers.
#pragma once
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cassert>
#include <exception>
#include <utility>

namespace erpy::py {

// Thrown when a Python call failed and left its exception set. Whoever catches it leaves
// the exception in place for the boundary, which hands it to Python (or turns it into a
// term) once.
struct PythonError : std::exception {
  const char* what() const noexcept override { return "a Python exception is set"; }
};

#ifndef NDEBUG
// Refcounts may only change under the GIL; a debug build checks it on every change.
#define ERPY_ASSERT_GIL() assert(PyGILState_Check())
#else
#define ERPY_ASSERT_GIL() ((void)0)
#endif

class PyRef {
 public:
  PyRef() noexcept = default;

  // Takes over a new reference (what most Python calls return).
  static PyRef steal(PyObject* o) noexcept { return PyRef(o); }
  // Adds a reference to an object someone else owns.
  static PyRef borrow(PyObject* o) noexcept {
    if (o) {
      ERPY_ASSERT_GIL();
      Py_INCREF(o);
    }
    return PyRef(o);
  }
  // Takes over a new reference returned by a Python call; NULL means that call failed
  // and set an exception.
  static PyRef check(PyObject* o) {
    if (!o) throw PythonError();
    return PyRef(o);
  }

  PyRef(PyRef&& other) noexcept : p_(std::exchange(other.p_, nullptr)) {}
  PyRef& operator=(PyRef&& other) noexcept {
    if (this != &other) {
      PyObject* old = std::exchange(p_, std::exchange(other.p_, nullptr));
      decref(old);
    }
    return *this;
  }
  PyRef(const PyRef&) = delete;
  PyRef& operator=(const PyRef&) = delete;
  ~PyRef() { decref(p_); }

  PyObject* get() const noexcept { return p_; }
  explicit operator bool() const noexcept { return p_ != nullptr; }
  // Gives the reference away (to a call that steals it); this PyRef is empty afterwards.
  [[nodiscard]] PyObject* release() noexcept { return std::exchange(p_, nullptr); }
  void reset() noexcept { decref(std::exchange(p_, nullptr)); }

 private:
  explicit PyRef(PyObject* o) noexcept : p_(o) {}
  static void decref(PyObject* o) noexcept {
    if (o) {
      ERPY_ASSERT_GIL();
      Py_DECREF(o);
    }
  }
  PyObject* p_ = nullptr;
};

// Holds the GIL for its scope, from any thread (the worker's and the NIF's threads).
class GilHold {
 public:
  GilHold() noexcept : state_(PyGILState_Ensure()) {}
  ~GilHold() { PyGILState_Release(state_); }
  GilHold(const GilHold&) = delete;
  GilHold& operator=(const GilHold&) = delete;

 private:
  PyGILState_STATE state_;
};

// Lets other threads run Python while this one does pure C++ work. No Python object may be
// touched in its scope.
class GilRelease {
 public:
  GilRelease() noexcept : state_(PyEval_SaveThread()) {}
  ~GilRelease() { PyEval_RestoreThread(state_); }
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;

 private:
  PyThreadState* state_;
};

// A Py_buffer view of a bytes-like object, released on every path.
class BufferView {
 public:
  explicit BufferView(PyObject* o) {
    if (PyObject_GetBuffer(o, &view_, PyBUF_SIMPLE) != 0) throw PythonError();
  }
  ~BufferView() { PyBuffer_Release(&view_); }
  BufferView(const BufferView&) = delete;
  BufferView& operator=(const BufferView&) = delete;

  const unsigned char* data() const noexcept { return static_cast<const unsigned char*>(view_.buf); }
  std::size_t size() const noexcept { return static_cast<std::size_t>(view_.len); }

 private:
  Py_buffer view_{};
};

}  // namespace erpy::py
