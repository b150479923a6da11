// The one request schema (doc/protocol.md, "Requests"): what Erlang asks Python to run,
// as one type whatever carried it: a port frame (ETF bytes), a NIF term, a node's
// decoded call. Each carrier is a Source that walks the request map; parse_request()
// knows the fields, their types and which kind needs which, once for every mode.
// Runner::execute() then runs the result.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "ref.hpp"

namespace erpy::py {

enum class RequestKind : std::uint8_t { Call, Eval, Exec, Run };

// The fields of the request map, by the atom that names them.
enum class RequestField : std::uint8_t {
  Version,   // v: the schema version (kRequestVersion)
  Kind,      // kind: call | eval | exec | run
  Deadline,  // deadline: wall-clock milliseconds, 0 for none
  Caller,    // caller: the pid of the Erlang process that asked (erlang.self())
  Module,    // module: call: a dotted module name (or, embedded, a handle)
  Function,  // function: call: a dotted attribute path
  Args,      // args: call: the argument list; run: the `arguments` term
  Kwargs,    // kwargs: call: keyword arguments (map)
  Code,      // code: eval: the expression; exec, run: the statements
  Locals,    // locals: eval: names in scope (map)
  Result,    // result: value (default) | handle (embedded: keep the object in Python)
  MaxSize,   // max_size: the largest result in bytes of ETF, 0 for the pool's (node)
  Session,   // session: the namespace of a held worker (node), undefined for none
  ReplyTo,   // reply_to: where callbacks go (node: the caller's alias)
  Unknown,
};

inline constexpr std::int64_t kRequestVersion = 1;

RequestField request_field(std::string_view name) noexcept;
std::optional<RequestKind> request_kind(std::string_view name) noexcept;
const char* request_kind_name(RequestKind kind) noexcept;
// eval, exec and run run code in a namespace; call does not.
inline bool uses_namespace(RequestKind kind) noexcept { return kind != RequestKind::Call; }

// A request as Python objects. Fields a kind does not use stay null.
struct Request {
  RequestKind kind = RequestKind::Call;
  std::int64_t deadline_ms = 0;
  PyRef module, function, args, kwargs;  // call
  PyRef code, locals;                    // eval (code, locals), exec (code), run (code, args)
  bool result_handle = false;
  std::int64_t max_size = 0;
  PyRef session;   // node; None when absent
  PyRef caller;    // as the Source gives it (null when the Source keeps it itself)
  PyRef reply_to;  // same
  // Set by a mode's own policy before execute(): a callable to call with args/kwargs in
  // place of resolving module.function (node mode's exposed functions), or an object
  // whose `function` attribute path is called (embedded handles).
  PyRef target;
};

// Raises ValueError("request: <what>") (PythonError thrown).
[[noreturn]] void request_error(const std::string& what);

// Reads one request map from `src`. A Source provides:
//   bool next(std::string_view& key)  the next entry's key (an atom), false at the end
//   std::optional<std::int64_t> integer()  the value if it is an integer (else passed over)
//   std::optional<std::string_view> atom()  the value if it is an atom (else passed over)
//   PyRef object()                    the value as a Python object
//   void skip()                       passes over the value
//   void caller(Request&), reply_to(Request&)  keeps what it needs of those values
// The first thing wrong ends the reading: a field that breaks the schema raises
// ValueError("request: ..."), a value that fails to convert raises what the conversion
// raised (PythonError thrown), bytes that are not ETF throw the carrier's own error.
template <class Source>
Request parse_request(Source& src) {
  Request r;
  bool have_kind = false, have_version = false;
  auto fail = [](const std::string& what) { request_error(what); };
  auto object = [&](PyRef& slot) { slot = src.object(); };
  auto integer = [&](std::int64_t& slot, const char* name) {
    if (auto v = src.integer()) slot = *v;
    else fail(std::string(name) + " must be an integer");
  };
  std::optional<std::string> unknown;
  std::string_view key;
  while (src.next(key)) {
    switch (request_field(key)) {
      case RequestField::Version: {
        const auto v = src.integer();
        have_version = true;
        if (v != kRequestVersion) {
          fail("version " + (v ? std::to_string(*v) : std::string("?")) + " is not 1");
        }
        break;
      }
      case RequestField::Kind: {
        const auto k = src.atom();
        if (auto kind = k ? request_kind(*k) : std::nullopt) {
          r.kind = *kind;
          have_kind = true;
        } else {
          fail("kind must be call, eval, exec or run");
        }
        break;
      }
      case RequestField::Deadline: integer(r.deadline_ms, "deadline"); break;
      case RequestField::Caller: src.caller(r); break;
      case RequestField::Module: object(r.module); break;
      case RequestField::Function: object(r.function); break;
      case RequestField::Args: object(r.args); break;
      case RequestField::Kwargs: object(r.kwargs); break;
      case RequestField::Code: object(r.code); break;
      case RequestField::Locals: object(r.locals); break;
      case RequestField::Result: {
        const auto v = src.atom();
        if (v == "handle") r.result_handle = true;
        else if (v != "value") fail("result must be value or handle");
        break;
      }
      case RequestField::MaxSize: integer(r.max_size, "max_size"); break;
      case RequestField::Session: object(r.session); break;
      case RequestField::ReplyTo: src.reply_to(r); break;
      case RequestField::Unknown:
        // Told after the version: a newer Erlang side's fields mean a version mismatch.
        if (!unknown) unknown = key.empty() ? std::string("a key that is not a field name") : "unknown field " + std::string(key);
        src.skip();
        break;
    }
  }
  if (!have_version) fail("no version (v)");
  if (unknown) fail(*unknown);
  if (!have_kind) fail("no kind");
  auto need = [&](const PyRef& field, const char* name) {
    if (!field) fail(std::string(request_kind_name(r.kind)) + " needs " + name);
  };
  switch (r.kind) {
    case RequestKind::Call:
      need(r.module, "module");
      need(r.function, "function");
      need(r.args, "args");
      break;
    case RequestKind::Eval:
    case RequestKind::Exec:
      need(r.code, "code");
      break;
    case RequestKind::Run:
      need(r.code, "code");
      break;
  }
  return r;
}

}  // namespace erpy::py
