// libFuzzer: arbitrary bytes -> Python objects -> ETF. Whatever the input, decoding either
// works or raises etf::DecodeError; what decoded must encode, and encoding is canonical:
// decoding and re-encoding the encoded bytes gives them back exactly.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "etf/error.hpp"
#include "py/codec.hpp"
#include "py/request_etf.hpp"

using erpy::py::Codec;
using erpy::py::PyRef;

namespace {

Codec* g_codec = nullptr;

[[noreturn]] void die(const char* what) {
  if (PyErr_Occurred()) PyErr_Print();
  std::fprintf(stderr, "fuzz_py_decode: %s\n", what);
  std::abort();
}

etf::Bytes bytes_of(const PyRef& b) {
  return {reinterpret_cast<const std::uint8_t*>(PyBytes_AS_STRING(b.get())),
          static_cast<std::size_t>(PyBytes_GET_SIZE(b.get()))};
}

// CPython keeps some allocations past exit; only those are not reported.
}  // namespace

extern "C" __attribute__((visibility("default"))) const char* __lsan_default_suppressions() {
  return "leak:libpython3\n";
}

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  PyPreConfig pre;
  PyPreConfig_InitPythonConfig(&pre);
  pre.allocator = PYMEM_ALLOCATOR_MALLOC;  // so ASan sees every object
  if (PyStatus_Exception(Py_PreInitialize(&pre))) die("Py_PreInitialize failed");
  Py_InitializeEx(0);
  const char* setup =
      "import sys, types\n"
      "pkg = types.ModuleType('erpy')\n"
      "pkg.__path__ = ['" ERPY_SOURCE_DIR "/python/erpy']\n"
      "sys.modules['erpy'] = pkg\n"
      "import erpy._types, erpy._errors\n";
  if (PyRun_SimpleString(setup) != 0) die("cannot import erpy._types");
  try {
    PyRef types = PyRef::check(PyImport_ImportModule("erpy._types"));
    PyRef errors = PyRef::check(PyImport_ImportModule("erpy._errors"));
    g_codec = new Codec(erpy::py::Types::load(types.get(), errors.get()));
  } catch (...) {
    die("cannot load the erpy types");
  }
  return 0;
}

// The other entry points: one bare term at a reader's position (no version byte), and a
// request map read by the schema every mode shares (py/request.hpp), as the port worker
// reads the map of a {request, Id, Request} frame. A request may be refused only with
// DecodeError (bytes that are not ETF) or ValueError (a map that breaks the schema).
void decode_fields(const std::uint8_t* data, std::size_t size, const erpy::py::DecodeOptions& dopts) {
  etf::Reader r(etf::Bytes(data, size));
  try {
    while (!r.at_end()) {
      PyRef field = g_codec->decode_term(r, dopts);
      if (!field) die("decode_term returned nothing");
    }
  } catch (const etf::DecodeError&) {
  } catch (const erpy::py::PythonError&) {
    if (!PyErr_ExceptionMatches(PyExc_MemoryError)) die("decode_term raised a Python exception");
    PyErr_Clear();
  }
  if (PyErr_Occurred()) die("decode_term left an exception set");
  etf::Reader rr(etf::Bytes(data, size));
  try {
    erpy::py::EtfRequestSource src(rr, *g_codec, dopts);
    erpy::py::Request req = erpy::py::parse_request(src);
    if (!req.code && !req.module) die("a request passed the schema without what its kind needs");
  } catch (const etf::DecodeError&) {
  } catch (const erpy::py::PythonError&) {
    if (!PyErr_ExceptionMatches(PyExc_MemoryError) && !PyErr_ExceptionMatches(PyExc_ValueError)) {
      die("parse_request raised a Python exception other than ValueError");
    }
    PyErr_Clear();
  }
  if (PyErr_Occurred()) die("parse_request left an exception set");
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Half of the inputs decode with binary='bytes', chosen by a byte the decoder also sees.
  erpy::py::DecodeOptions dopts;
  dopts.binary_as_bytes = size > 1 && (data[size - 1] & 1);
  if (size > 1) decode_fields(data + 1, size - 1, dopts);
  PyRef value;
  try {
    value = g_codec->decode(etf::Bytes(data, size), dopts);
  } catch (const etf::DecodeError&) {
    return 0;
  } catch (const erpy::py::PythonError&) {
    // Only resource exhaustion may fail in Python here.
    if (!PyErr_ExceptionMatches(PyExc_MemoryError)) die("decode raised a Python exception");
    PyErr_Clear();
    return 0;
  }
  if (PyErr_Occurred()) die("decode left an exception set");
  try {
    PyRef once = g_codec->encode(value.get(), {});
    PyRef back = g_codec->decode(bytes_of(once), dopts);
    PyRef twice = g_codec->encode(back.get(), {});
    const etf::Bytes a = bytes_of(once), b = bytes_of(twice);
    if (a.size() != b.size() || std::memcmp(a.data(), b.data(), a.size()) != 0) {
      PyObject_Print(value.get(), stderr, 0);
      std::fprintf(stderr, "\n");
      PyObject_Print(once.get(), stderr, 0);
      std::fprintf(stderr, "\n");
      PyObject_Print(twice.get(), stderr, 0);
      std::fprintf(stderr, "\n");
      die("encoding is not canonical: decode(encode(x)) encodes differently");
    }
  } catch (const etf::EncodeError& e) {
    std::fprintf(stderr, "%s\n", e.what());
    die("a decoded value did not encode");
  } catch (const etf::DecodeError& e) {
    std::fprintf(stderr, "%s\n", e.what());
    die("an encoded value did not decode");
  } catch (const erpy::py::PythonError&) {
    die("encode raised a Python exception");
  }
  return 0;
}
