// The port worker: a Python process serving erpy's port protocol (doc/protocol.md) on two
// pipes, with the framing and the dispatch loop here in C++ and Python only running the
// user's code. One per process; `erpy.worker` starts it with _native.serve_port(3, 4).
#pragma once
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "py/codec.hpp"

namespace erpy::worker {

inline constexpr int kProtocolVersion = 2;  // 2: requests are {request, Id, RequestMap}

// The module's functions of the worker: serve_port(in_fd, out_fd) and the `erlang`
// callbacks (erlang_call, erlang_apply, erlang_send, erlang_self). `codec` outlives them.
void attach(py::Codec* codec);
PyMethodDef* methods();

}  // namespace erpy::worker
