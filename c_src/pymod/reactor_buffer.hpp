// erpy.reactor's native part (reactor_buffer.cpp): the ReactorBuffer type, the
// BufferReleasedError exception and reactor_read/reactor_write, added to erpy._native.
#pragma once
#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace erpy::pymod {

// Adds them to `module`; false with a Python exception set on failure.
bool add_reactor(PyObject* module);

}  // namespace erpy::pymod
