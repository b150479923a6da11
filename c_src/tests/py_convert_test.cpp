// The conversion layer (c_src/py) inside an embedded interpreter, without the extension
// module: the erpy classes are loaded from python/erpy as a bare package, as the port
// worker does. Runs under ASan/UBSan too (the interpreter then uses plain malloc, so
// ASan sees every object).
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "etf/error.hpp"
#include "py/codec.hpp"

using erpy::py::Codec;
using erpy::py::PyRef;
using erpy::py::PythonError;

// CPython keeps a few allocations (interned strings, static type state) past
// Py_FinalizeEx by design. LeakSanitizer reads this hook, so the sanitizer build needs no
// suppression file: only leaks allocated inside libpython itself are ignored, never ours.
extern "C" __attribute__((visibility("default"))) const char* __lsan_default_suppressions() {
  return "leak:libpython3\n";
}

namespace {

class PythonEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    PyPreConfig pre;
    PyPreConfig_InitPythonConfig(&pre);
    pre.allocator = PYMEM_ALLOCATOR_MALLOC;
    PyStatus st = Py_PreInitialize(&pre);
    ASSERT_FALSE(PyStatus_Exception(st));
    Py_InitializeEx(0);
    // erpy as a bare namespace: its _types and _errors import without erpy/__init__.py,
    // which would want the extension module.
    const std::string setup =
        "import sys, types\n"
        "pkg = types.ModuleType('erpy')\n"
        "pkg.__path__ = ['" ERPY_SOURCE_DIR "/python/erpy']\n"
        "sys.modules['erpy'] = pkg\n"
        "import erpy._types, erpy._errors\n";
    ASSERT_EQ(PyRun_SimpleString(setup.c_str()), 0);
  }
  void TearDown() override { Py_FinalizeEx(); }
};

const auto* const kEnv = ::testing::AddGlobalTestEnvironment(new PythonEnvironment);

class PyConvert : public ::testing::Test {
 protected:
  void SetUp() override {
    PyRef types = PyRef::check(PyImport_ImportModule("erpy._types"));
    PyRef errors = PyRef::check(PyImport_ImportModule("erpy._errors"));
    codec_ = std::make_unique<Codec>(erpy::py::Types::load(types.get(), errors.get()));
    globals_ = PyRef::check(PyDict_New());
    ASSERT_EQ(PyDict_SetItemString(globals_.get(), "__builtins__", PyEval_GetBuiltins()), 0);
    run("from erpy._types import *\nfrom erpy._errors import *\nimport sys, gc, tracemalloc");
  }
  void TearDown() override {
    EXPECT_FALSE(PyErr_Occurred()) << "a test left a Python exception set";
    PyErr_Clear();
    run("ENCODERS.clear()");
    globals_.reset();
    codec_.reset();  // before Py_FinalizeEx: the codec holds Python objects
  }

  PyRef eval(const std::string& expr) {
    PyObject* r = PyRun_String(expr.c_str(), Py_eval_input, globals_.get(), globals_.get());
    if (!r) PyErr_Print();
    return PyRef::check(r);
  }
  void run(const std::string& code) {
    PyObject* r = PyRun_String(code.c_str(), Py_file_input, globals_.get(), globals_.get());
    if (!r) PyErr_Print();
    PyRef::check(r);
  }
  void set(const char* name, PyObject* o) { ASSERT_EQ(PyDict_SetItemString(globals_.get(), name, o), 0); }

  static std::vector<std::uint8_t> bytes_of(PyObject* b) {
    const auto* p = reinterpret_cast<const std::uint8_t*>(PyBytes_AS_STRING(b));
    return {p, p + PyBytes_GET_SIZE(b)};
  }
  std::vector<std::uint8_t> encode(PyObject* o) { return bytes_of(codec_->encode(o, {}).get()); }
  PyRef decode(const std::vector<std::uint8_t>& b, const erpy::py::DecodeOptions& o = {}) {
    return codec_->decode(etf::Bytes(b.data(), b.size()), o);
  }
  static bool equal(PyObject* a, PyObject* b) { return PyObject_RichCompareBool(a, b, Py_EQ) == 1; }

  std::unique_ptr<Codec> codec_;
  PyRef globals_;
};

TEST_F(PyConvert, EncodesCanonicalBytes) {
  EXPECT_EQ(encode(eval("1").get()), (std::vector<std::uint8_t>{131, 97, 1}));
  EXPECT_EQ(encode(eval("[1, 2]").get()), (std::vector<std::uint8_t>{131, 107, 0, 2, 1, 2}));
  EXPECT_EQ(encode(eval("None").get()),
            (std::vector<std::uint8_t>{131, 119, 9, 'u', 'n', 'd', 'e', 'f', 'i', 'n', 'e', 'd'}));
  EXPECT_EQ(encode(eval("[]").get()), (std::vector<std::uint8_t>{131, 106}));
  EXPECT_EQ(encode(eval("-1").get()), (std::vector<std::uint8_t>{131, 98, 255, 255, 255, 255}));
  EXPECT_EQ(encode(eval("2**64").get()), (std::vector<std::uint8_t>{131, 110, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}));
}

TEST_F(PyConvert, RoundTripsEveryKind) {
  const char* values[] = {
      "[0, 255, 256, -1, 2**31, -2**31 - 1, 2**63, -2**63, 2**2100, -(2**2100)]",
      "[1.5, -0.0, 1e300, 'text', '\\u00e9\\U0001F600', b'\\xff', b'\\xfe' * 300]",
      "[Atom('ok'), None, True, False, Atom('\\U0001F600' * 255)]",
      "(ImproperList([1, 2], Atom('t')), (), (1, (2, 3)), tuple(range(300)))",
      "{'k': [1, {Atom('x'): ()}], 1: 2.5, (1, 2): 'tuple key'}",
      "[BitBinary(b'\\xf0', 4), Pid('a@b', 1, 2, 3), Port('a@b', 2**40, 1), Ref('a@b', 7, (1, 2, 3))]",
      "[list(range(256)), [7] * 65535, [7] * 65536, [True], [-1]]",
  };
  for (const char* expr : values) {
    PyRef v = eval(expr);
    auto data = encode(v.get());
    PyRef back = decode(data);
    EXPECT_TRUE(equal(v.get(), back.get())) << expr;
    EXPECT_EQ(encode(back.get()), data) << expr;
  }
}

TEST_F(PyConvert, DecodeOptions) {
  auto data = encode(eval("['abc', None]").get());
  erpy::py::DecodeOptions o;
  o.binary_as_bytes = true;
  o.none = "nil";
  PyRef v = decode(data, o);
  EXPECT_TRUE(equal(v.get(), eval("[b'abc', Atom('undefined')]").get()));
  erpy::py::EncodeOptions eo;
  eo.none = "nil";
  EXPECT_EQ(bytes_of(codec_->encode(Py_None, eo).get()), (std::vector<std::uint8_t>{131, 119, 3, 'n', 'i', 'l'}));
}

TEST_F(PyConvert, DecodeErrorsCarryOffsets) {
  try {
    decode({131, 104, 2, 97, 1, 1});
    FAIL() << "no error";
  } catch (const etf::DecodeError& e) {
    EXPECT_EQ(e.offset(), 5u);
  }
  // The same error as the module raises it: erpy.DecodeError with .offset.
  try {
    decode({131, 104, 2, 97, 1, 1});
  } catch (...) {
    erpy::py::set_python_error(codec_->types());
  }
  ASSERT_TRUE(PyErr_ExceptionMatches(codec_->types().decode_error.get()));
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  PyRef t = PyRef::steal(type), v = PyRef::steal(value), b = PyRef::steal(tb);
  PyRef offset = PyRef::check(PyObject_GetAttrString(v.get(), "offset"));
  EXPECT_EQ(PyLong_AsLong(offset.get()), 5);
  EXPECT_TRUE(PyObject_IsInstance(v.get(), PyExc_ValueError));
}

TEST_F(PyConvert, HostileInputIsAnError) {
  std::vector<std::uint8_t> deep{131};
  for (int i = 0; i < 1'000'000; ++i) deep.insert(deep.end(), {104, 1});
  deep.push_back(106);
  EXPECT_THROW(decode(deep), etf::DecodeError);
  EXPECT_THROW(decode({131, 108, 255, 255, 255, 255}), etf::DecodeError);
  auto good = encode(eval("{'a': [1, (2, 'x'), 2**70, 1.5]}").get());
  for (std::size_t cut = 0; cut < good.size(); ++cut) {
    std::vector<std::uint8_t> part(good.begin(), good.begin() + static_cast<long>(cut));
    EXPECT_THROW(decode(part), etf::DecodeError) << cut;
  }
  // #{<<"a">> => 0, <<"a">> => 1}: the same key twice, which Erlang refuses too.
  EXPECT_THROW(decode({131, 116, 0, 0, 0, 2, 109, 0, 0, 0, 1, 'a', 97, 0, 109, 0, 0, 0, 1, 'a', 97, 1}),
               etf::DecodeError);
  EXPECT_FALSE(PyErr_Occurred());
}

TEST_F(PyConvert, UnhashableMapKeysBecomeFrozen) {
  // #{[1] => 2}: a list as a key is an erpy.FrozenList, which encodes back to the bytes.
  const std::vector<std::uint8_t> data{131, 116, 0, 0, 0, 1, 107, 0, 1, 1, 97, 2};
  PyRef v = decode(data);
  EXPECT_TRUE(equal(v.get(), eval("{FrozenList([1]): 2}").get()));
  EXPECT_EQ(encode(v.get()), data);
  PyRef frozen = codec_->freeze(eval("[1, {2: [3]}, (4, [5]), ImproperList([[6]], 7)]").get());
  EXPECT_TRUE(equal(frozen.get(),
                    eval("FrozenList([1, FrozenMap({2: FrozenList([3])}), (4, FrozenList([5])), "
                         "FrozenImproperList([FrozenList([6])], 7)])").get()));
  EXPECT_NE(PyObject_Hash(frozen.get()), -1);
}

TEST_F(PyConvert, KeysEqualInPythonBecomeKeys) {
  // #{<<"a">> => 0, a => 1, b => 2}: <<"a">> and a are equal in Python, both are erpy.Key.
  const std::vector<std::uint8_t> data{131, 116, 0, 0, 0, 3, 109, 0, 0, 0, 1, 'a', 97, 0,
                                       119, 1,   'a', 97, 1, 119, 1, 'b', 97, 2};
  PyRef v = decode(data);
  set("v", v.get());
  EXPECT_TRUE(equal(eval("[type(k).__name__ for k in v]").get(), eval("['Key', 'Key', 'Atom']").get()));
  set("k", codec_->key(eval("b'a'").get()).get());  // the binary, like 'a'
  EXPECT_TRUE(equal(eval("v[k]").get(), eval("0").get()));
  EXPECT_EQ(encode(v.get()), data);
  // The same in the other order: the same keys are wrapped.
  const std::vector<std::uint8_t> swapped{131, 116, 0, 0, 0, 3, 119, 1, 'a', 97, 1, 109, 0, 0, 0, 1, 'a', 97, 0,
                                          119, 1,   'b', 97, 2};
  PyRef w = decode(swapped);
  EXPECT_TRUE(equal(v.get(), w.get()));
  EXPECT_EQ(encode(w.get()), swapped);
  // Exact bytes: None apart from every atom, map entries sorted.
  auto [frozen, exact] = codec_->key_parts(eval("[{2: None, 1: 1.0}]").get());
  EXPECT_TRUE(equal(frozen.get(), eval("FrozenList([FrozenMap({1: 1.0, 2: None})])").get()));
  EXPECT_TRUE(equal(exact.get(), codec_->key_parts(eval("[{1: 1.0, 2: None}]").get()).second.get()));
  EXPECT_FALSE(equal(exact.get(), codec_->key_parts(eval("[{1: 1, 2: None}]").get()).second.get()));
  EXPECT_FALSE(equal(exact.get(), codec_->key_parts(eval("[{1: 1.0, 2: Atom('undefined')}]").get()).second.get()));
  EXPECT_THROW(codec_->key_parts(eval("object()").get()), etf::EncodeError);
  // 100,000 pairs that all collide: one pass, not one per collision.
  std::vector<std::uint8_t> many{131, 116, 0, 3, 13, 64};  // 200,000 keys
  for (std::uint32_t i = 256; i < 100'256; ++i) {  // INTEGER_EXT, as the encoder writes them
    many.insert(many.end(), {98, static_cast<std::uint8_t>(i >> 24), static_cast<std::uint8_t>(i >> 16),
                             static_cast<std::uint8_t>(i >> 8), static_cast<std::uint8_t>(i), 106});
    double d = i;
    std::uint64_t bits;
    std::memcpy(&bits, &d, 8);
    many.push_back(70);
    for (int b = 7; b >= 0; --b) many.push_back(static_cast<std::uint8_t>(bits >> (8 * b)));
    many.push_back(106);
  }
  PyRef big = decode(many);
  EXPECT_EQ(PyDict_GET_SIZE(big.get()), 200'000);
  EXPECT_EQ(encode(big.get()), many);
  EXPECT_FALSE(PyErr_Occurred());
}

TEST_F(PyConvert, EncodeStopsAtMaxSize) {
  erpy::py::EncodeOptions o;
  o.max_size = 1000;
  run("big = ['x' * 600, 'y' * 600]");
  try {
    codec_->encode(eval("big").get(), o);
    FAIL() << "no error";
  } catch (const etf::TooLargeError& e) {
    EXPECT_GT(e.size(), 1000u);
    EXPECT_LT(e.size(), 1300u);
    EXPECT_EQ(e.max(), 1000u);
  }
  // Appending to a frame counts only the term, and leaves the frame as it was.
  erpy::py::ByteBuffer frame;
  frame.write("head", 4);
  EXPECT_THROW(codec_->encode_append(frame, eval("big").get(), o), etf::TooLargeError);
  EXPECT_EQ(frame.size(), 4u);
  o.max_size = 5 + 600 + 3;  // a binary of 600 in a one-element list... of 1605 bytes: no
  codec_->encode_append(frame, eval("'x' * 600").get(), o);
  EXPECT_EQ(frame.size(), 4u + 5u + 600u);
  // The scratch buffer is unlimited again afterwards.
  EXPECT_EQ(encode(eval("big").get()).size(), 1u + 5u + 2u * 605u + 1u);
}

TEST_F(PyConvert, ByteBufferLimit) {
  erpy::py::ByteBuffer b;
  b.write("0123456789", 10);
  b.set_limit(12);
  b.byte('a');
  b.byte('b');
  EXPECT_THROW(b.byte('c'), etf::TooLargeError);
  EXPECT_THROW(b.write("cd", 2), etf::TooLargeError);
  EXPECT_EQ(b.size(), 12u);
  b.set_limit(4);  // below the size: nothing more fits, nothing is lost
  EXPECT_THROW(b.byte('c'), etf::TooLargeError);
  EXPECT_EQ(b.size(), 12u);
  b.set_limit(erpy::py::ByteBuffer::kNoLimit);
  b.write(std::string(10000, 'z').data(), 10000);
  EXPECT_EQ(b.size(), 10012u);
}

TEST_F(PyConvert, DecodeMaxSizeBoundsInflation) {
  // 'x' * 100000, compressed: 100 KB from a few hundred bytes.
  run("import zlib\ninner = b'm' + (100000).to_bytes(4, 'big') + b'x' * 100000\n"
      "data = b'\\x83P' + len(inner).to_bytes(4, 'big') + zlib.compress(inner)");
  PyRef data = eval("data");
  auto bytes = bytes_of(data.get());
  erpy::py::DecodeOptions o;
  EXPECT_NO_THROW(decode(bytes, o));
  o.max_size = 50000;
  EXPECT_THROW(decode(bytes, o), etf::DecodeError);
  o.max_size = 100005;
  EXPECT_NO_THROW(decode(bytes, o));
}

TEST_F(PyConvert, EncodeErrorsSayWhere) {
  try {
    codec_->encode(eval("[0, {'tags': {1}}]").get(), {});
    FAIL() << "no error";
  } catch (const etf::EncodeError& e) {
    EXPECT_STREQ(e.what(), "cannot encode object of type set at [1]['tags']");
  }
  EXPECT_THROW(codec_->encode(eval("float('nan')").get(), {}), etf::EncodeError);
  run("x = []\nx.append(x)");
  EXPECT_THROW(codec_->encode(eval("x").get(), {}), etf::EncodeError);
  EXPECT_FALSE(PyErr_Occurred());
}

TEST_F(PyConvert, CustomEncoderErrorsStayPythonErrors) {
  run("class P: pass\n"
      "def boom(p): raise KeyError('mine')\n"
      "ENCODERS[P] = boom\n");
  EXPECT_THROW(codec_->encode(eval("[P()]").get(), {}), PythonError);
  ASSERT_TRUE(PyErr_ExceptionMatches(PyExc_KeyError));
  PyErr_Clear();
  run("ENCODERS[P] = lambda p: ('p', 1)");
  PyRef v = decode(encode(eval("[P()]").get()));
  EXPECT_TRUE(equal(v.get(), eval("[('p', 1)]").get()));
}

TEST_F(PyConvert, EncodeAppendKeepsTheBufferOnError) {
  erpy::py::ByteBuffer out;
  out.write("abc", 3);
  codec_->encode_append(out, eval("1").get(), {});
  EXPECT_EQ(out.size(), 5u);
  EXPECT_THROW(codec_->encode_append(out, eval("[1, 2, {3}]").get(), {}), etf::EncodeError);
  EXPECT_EQ(out.size(), 5u);
}

TEST_F(PyConvert, TwoPassEncoderAgrees) {
  PyRef v = eval("[{'id': i, 'name': 'item', 'score': 1.5} for i in range(100)] + [2**99, Atom('x')]");
  EXPECT_EQ(bytes_of(codec_->encode_two_pass(v.get(), {}).get()), encode(v.get()));
}

// Refcounts of an object graph are the same before and after conversions, and objects
// made by decode are owned by the result alone.
TEST_F(PyConvert, RefcountsAreBalanced) {
  run("leaf = 'leaf' * 3\n"
      "key = ('k', 2**80)\n"
      "graph = {key: [leaf, leaf, (leaf, 1.5)], 'p': Pid('n@h', 1, 2, 3), 'i': ImproperList([leaf], leaf)}\n");
  PyRef graph = eval("graph"), leaf = eval("leaf"), key = eval("key");
  const Py_ssize_t rg = Py_REFCNT(graph.get()), rl = Py_REFCNT(leaf.get()), rk = Py_REFCNT(key.get());
  std::vector<std::uint8_t> data;
  for (int i = 0; i < 1000; ++i) {
    data = encode(graph.get());
    PyRef back = decode(data);
    ASSERT_TRUE(equal(back.get(), graph.get()));
  }
  EXPECT_EQ(Py_REFCNT(graph.get()), rg);
  EXPECT_EQ(Py_REFCNT(leaf.get()), rl);
  EXPECT_EQ(Py_REFCNT(key.get()), rk);
  PyRef fresh = decode(data);
  EXPECT_EQ(Py_REFCNT(fresh.get()), 1);
}

// Maps in a run share their immutable keys and values (the same bytes at the same
// position), never a mutable one, and every object is owned exactly by its holders.
TEST_F(PyConvert, RunsOfMapsShareOnlyImmutableValues) {
  auto data = encode(eval("[{'id': i % 2, 'name': 'item', 'score': 1.5, 'tags': [], 't': (1, []),"
                          " 'big': 2**70, Atom('a'): b'\\xff'} for i in range(6)]").get());
  PyRef rows = decode(data);
  set("rows", rows.get());
  EXPECT_TRUE(equal(eval("all(a is b for a, b in zip(rows[2], rows[5]))").get(), Py_True));
  EXPECT_TRUE(equal(eval("[rows[2][k] is rows[5][k] for k in ('name', 'score', 'big', Atom('a'))]").get(),
                    eval("[True] * 4").get()));
  EXPECT_TRUE(equal(eval("len({id(r['tags']) for r in rows}), len({id(r['t']) for r in rows})").get(),
                    eval("(6, 6)").get()));
  EXPECT_EQ(encode(rows.get()), data);
  run("del rows");
  // The decoder keeps no reference once done: the rows and the codec's cache of short
  // strings hold 'item', nothing else.
  PyRef name = eval("'name'");
  PyObject* shared = PyDict_GetItem(PyList_GET_ITEM(rows.get(), 5), name.get());
  ASSERT_NE(shared, nullptr);
  Py_ssize_t holders = 0;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(rows.get()); ++i) {
    holders += PyDict_GetItem(PyList_GET_ITEM(rows.get(), i), name.get()) == shared;
  }
  EXPECT_EQ(holders, 6);
  EXPECT_EQ(Py_REFCNT(shared), holders + 1);
}

// A long list is built out of the collector's sight, and tracked again when it is done,
// also when its decoding fails half-way.
TEST_F(PyConvert, LongListsAreTrackedWhenDone) {
  auto data = encode(eval("[[i] for i in range(1000)]").get());
  PyRef v = decode(data);
  EXPECT_TRUE(PyObject_GC_IsTracked(v.get()));
  data.pop_back();
  EXPECT_THROW(decode(data), etf::DecodeError);
  run("gc.collect()");
}

TEST_F(PyConvert, NoLeakOver100kConversions) {
  PyRef v = eval("{'id': 2**80, 'name': ['item', b'\\xff', Atom('ok')], 't': (1.5, None, True),"
                 " 'r': Ref('a@b', 1, (1, 2, 3)), 'b': BitBinary(b'\\x80', 1)}");
  auto data = encode(v.get());
  for (int i = 0; i < 1000; ++i) decode(encode(v.get()));
  run("gc.collect()\ntracemalloc.start()\nbefore = tracemalloc.get_traced_memory()[0]");
  for (int i = 0; i < 100'000; ++i) {
    PyRef back = decode(data);
    if (i % 10 == 0) {
      try {
        decode(std::vector<std::uint8_t>(data.begin(), data.end() - 1));
      } catch (const etf::DecodeError&) {
      }
    }
    codec_->encode(back.get(), {});
  }
  run("gc.collect()\ngrown = tracemalloc.get_traced_memory()[0] - before\ntracemalloc.stop()");
  PyRef grown = eval("grown");
  EXPECT_LT(PyLong_AsLong(grown.get()), 64 * 1024);
}

// The ownership rules the wrappers exist for.
TEST_F(PyConvert, PyRefOwnership) {
  PyRef s = PyRef::check(PyUnicode_FromString("an object of our own"));
  const Py_ssize_t base = Py_REFCNT(s.get());
  {
    PyRef b = PyRef::borrow(s.get());
    EXPECT_EQ(Py_REFCNT(s.get()), base + 1);
    PyRef moved = std::move(b);
    EXPECT_FALSE(b);
    EXPECT_EQ(Py_REFCNT(s.get()), base + 1);
  }
  EXPECT_EQ(Py_REFCNT(s.get()), base);
  // PyTuple_SetItem steals even when it fails: the reference is handed over with
  // release() after an explicit incref, and is gone afterwards either way.
  PyRef not_a_tuple = PyRef::check(PyList_New(1));
  PyRef item = PyRef::borrow(s.get());
  EXPECT_EQ(PyTuple_SetItem(not_a_tuple.get(), 0, item.release()), -1);
  PyErr_Clear();
  EXPECT_EQ(Py_REFCNT(s.get()), base);
  PyRef tuple = PyRef::check(PyTuple_New(1));
  ASSERT_EQ(PyTuple_SetItem(tuple.get(), 0, PyRef::borrow(s.get()).release()), 0);
  EXPECT_EQ(Py_REFCNT(s.get()), base + 1);
  tuple.reset();
  EXPECT_EQ(Py_REFCNT(s.get()), base);
  EXPECT_THROW(PyRef::check(nullptr), PythonError);
}

TEST_F(PyConvert, BufferViewIsReleased) {
  run("ba = bytearray(b'\\x83a\\x07')");
  PyRef ba = eval("ba");
  {
    erpy::py::BufferView view(ba.get());
    PyRef v = codec_->decode(etf::Bytes(view.data(), view.size()), {});
    EXPECT_EQ(PyLong_AsLong(v.get()), 7);
    // While the view is held the bytearray cannot be resized.
    EXPECT_EQ(PyRun_String("ba.append(0)", Py_file_input, globals_.get(), globals_.get()), nullptr);
    EXPECT_TRUE(PyErr_ExceptionMatches(PyExc_BufferError));
    PyErr_Clear();
  }
  run("ba.append(0)");
}

TEST_F(PyConvert, ReentrantEncodeFromACustomEncoder) {
  // The custom encoder reaches the codec through a Python callable that wraps it.
  run("class P: pass\n");
  static Codec* codec;
  codec = codec_.get();
  static PyMethodDef def = {
      "enc",
      [](PyObject*, PyObject* arg) -> PyObject* {
        try {
          return codec->encode(arg, {}).release();
        } catch (...) {
          erpy::py::set_python_error(codec->types());
          return nullptr;
        }
      },
      METH_O, nullptr};
  PyRef fn = PyRef::check(PyCFunction_New(&def, nullptr));
  set("enc", fn.get());
  run("ENCODERS[P] = lambda p: enc((1, 2))");
  PyRef v = decode(encode(eval("[P(), 'after']").get()));
  EXPECT_TRUE(equal(v.get(), eval("[enc((1, 2)), 'after']").get()));
}

}  // namespace
