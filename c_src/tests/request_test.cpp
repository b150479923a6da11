// The request schema (py/request.hpp) read from ETF bytes, as the port worker reads the map
// of a {request, Id, Request} frame: fields by name in any order, what each kind needs,
// clear errors for the rest. The Python environment is py_convert_test.cpp's.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "etf/encode.hpp"
#include "etf/error.hpp"
#include "py/codec.hpp"
#include "py/request_etf.hpp"

using erpy::py::Codec;
using erpy::py::PyRef;
using erpy::py::PythonError;
using erpy::py::Request;
using erpy::py::RequestKind;

namespace {

using Bytes = std::vector<std::uint8_t>;

// A request map, its entries written by `fill` (each entry a key atom and a value).
template <class Fill>
Bytes request_map(std::size_t entries, Fill fill) {
  Bytes out;
  etf::GrowSink s{out};
  etf::put_map_header(s, entries);
  fill(s);
  return out;
}

void bin(etf::GrowSink& s, std::string_view text) {
  etf::put_binary(s, etf::Bytes(reinterpret_cast<const std::uint8_t*>(text.data()), text.size()));
}

class RequestSchema : public ::testing::Test {
 protected:
  void SetUp() override {
    PyRef types = PyRef::check(PyImport_ImportModule("erpy._types"));
    PyRef errors = PyRef::check(PyImport_ImportModule("erpy._errors"));
    codec_ = std::make_unique<Codec>(erpy::py::Types::load(types.get(), errors.get()));
  }

  Request parse(const Bytes& b, etf::Bytes* caller = nullptr) {
    etf::Reader r(etf::Bytes(b.data(), b.size()));
    erpy::py::EtfRequestSource src(r, *codec_, opts_);
    Request req = erpy::py::parse_request(src);
    if (caller) *caller = src.caller_bytes();
    EXPECT_TRUE(r.at_end());
    return req;
  }

  // The ValueError message a request is refused with ("" if it was not).
  std::string refusal(const Bytes& b) {
    try {
      parse(b);
    } catch (const PythonError&) {
      EXPECT_TRUE(PyErr_ExceptionMatches(PyExc_ValueError));
      PyObject *t, *v, *tb;
      PyErr_Fetch(&t, &v, &tb);
      PyRef type = PyRef::steal(t), value = PyRef::steal(v), trace = PyRef::steal(tb);
      PyRef text = PyRef::check(PyObject_Str(value.get()));
      return PyUnicode_AsUTF8(text.get());
    }
    return "";
  }

  std::unique_ptr<Codec> codec_;
  erpy::py::DecodeOptions opts_;
};

TEST_F(RequestSchema, ReadsACallInAnyOrder) {
  const Bytes b = request_map(7, [](etf::GrowSink& s) {
    etf::put_atom(s, "v"), etf::put_integer(s, 1);
    etf::put_atom(s, "kwargs"), etf::put_map_header(s, 0);
    etf::put_atom(s, "args"), etf::put_list_header(s, 2), etf::put_integer(s, 1), etf::put_integer(s, 2),
        etf::put_nil(s);
    etf::put_atom(s, "caller"), etf::put_pid(s, "a@b", 7, 0, 1);
    etf::put_atom(s, "function"), bin(s, "add");
    etf::put_atom(s, "deadline"), etf::put_integer(s, 1'700'000'000'123);
    etf::put_atom(s, "kind"), etf::put_atom(s, "call");
  });
  // Module last: a field the kind needs may come anywhere.
  Bytes full = b;
  full[4] = 8;  // the map header's size (big-endian u32 after the tag)
  {
    etf::GrowSink s{full};
    etf::put_atom(s, "module"), bin(s, "operator");
  }
  etf::Bytes caller;
  const Request r = parse(full, &caller);
  EXPECT_EQ(r.kind, RequestKind::Call);
  EXPECT_EQ(r.deadline_ms, 1'700'000'000'123);
  EXPECT_STREQ(PyUnicode_AsUTF8(r.module.get()), "operator");
  EXPECT_STREQ(PyUnicode_AsUTF8(r.function.get()), "add");
  ASSERT_TRUE(PyList_Check(r.args.get()));
  EXPECT_EQ(PyList_GET_SIZE(r.args.get()), 2);
  EXPECT_TRUE(PyDict_Check(r.kwargs.get()));
  EXPECT_FALSE(r.result_handle);
  ASSERT_FALSE(caller.empty());
  EXPECT_EQ(caller[0], etf::kNewPid);  // kept undecoded for erlang.self()
}

TEST_F(RequestSchema, EachKindNeedsItsFields) {
  auto with = [](std::string_view kind) {
    return request_map(2, [&](etf::GrowSink& s) {
      etf::put_atom(s, "v"), etf::put_integer(s, 1);
      etf::put_atom(s, "kind"), etf::put_atom(s, kind);
    });
  };
  EXPECT_EQ(refusal(with("call")), "request: call needs module");
  EXPECT_EQ(refusal(with("eval")), "request: eval needs code");
  EXPECT_EQ(refusal(with("exec")), "request: exec needs code");
  EXPECT_EQ(refusal(with("run")), "request: run needs code");
  EXPECT_EQ(refusal(with("spawn")), "request: kind must be call, eval, exec or run");
}

TEST_F(RequestSchema, RefusesWhatBreaksTheSchema) {
  // No version, another version (told before an unknown field), an unknown field, a
  // value of the wrong type, a result that is neither value nor handle.
  EXPECT_EQ(refusal(request_map(1, [](etf::GrowSink& s) { etf::put_atom(s, "kind"), etf::put_atom(s, "exec"); })),
            "request: no version (v)");
  EXPECT_EQ(refusal(request_map(3,
                                [](etf::GrowSink& s) {
                                  etf::put_atom(s, "colour"), etf::put_integer(s, 3);
                                  etf::put_atom(s, "kind"), etf::put_atom(s, "exec");
                                  etf::put_atom(s, "v"), etf::put_integer(s, 2);
                                })),
            "request: version 2 is not 1");
  auto exec_with = [](auto extra) {
    return request_map(4, [&](etf::GrowSink& s) {
      etf::put_atom(s, "v"), etf::put_integer(s, 1);
      etf::put_atom(s, "kind"), etf::put_atom(s, "exec");
      etf::put_atom(s, "code"), bin(s, "pass");
      extra(s);
    });
  };
  EXPECT_EQ(refusal(exec_with([](etf::GrowSink& s) { etf::put_atom(s, "colour"), etf::put_integer(s, 3); })),
            "request: unknown field colour");
  EXPECT_EQ(refusal(exec_with([](etf::GrowSink& s) { etf::put_atom(s, "deadline"), bin(s, "soon"); })),
            "request: deadline must be an integer");
  EXPECT_EQ(refusal(exec_with([](etf::GrowSink& s) { etf::put_atom(s, "result"), etf::put_atom(s, "pid"); })),
            "request: result must be value or handle");
  EXPECT_EQ(refusal(exec_with([](etf::GrowSink& s) { etf::put_integer(s, 5), etf::put_integer(s, 3); })),
            "request: a key that is not a field name");
  EXPECT_EQ(refusal(exec_with([](etf::GrowSink& s) { etf::put_atom(s, "result"), etf::put_atom(s, "handle"); })),
            "");
  // Not a map at all.
  Bytes list;
  etf::GrowSink s{list};
  etf::put_nil(s);
  EXPECT_EQ(refusal(list), "request: a request must be a map");
}

TEST_F(RequestSchema, BytesThatAreNotETFAreADecodeError) {
  Bytes b = request_map(2, [](etf::GrowSink& s) {
    etf::put_atom(s, "v"), etf::put_integer(s, 1);
    etf::put_atom(s, "kind"), etf::put_atom(s, "exec");
  });
  b.resize(b.size() - 3);
  EXPECT_THROW(parse(b), etf::DecodeError);
}

}  // namespace
