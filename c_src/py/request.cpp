#include "request.hpp"

#include <array>

namespace erpy::py {

namespace {

struct Named {
  std::string_view name;
  RequestField field;
};

// The one table of field names (doc/protocol.md, "Requests").
constexpr std::array<Named, 14> kFields{{
    {"v", RequestField::Version},
    {"kind", RequestField::Kind},
    {"deadline", RequestField::Deadline},
    {"caller", RequestField::Caller},
    {"module", RequestField::Module},
    {"function", RequestField::Function},
    {"args", RequestField::Args},
    {"kwargs", RequestField::Kwargs},
    {"code", RequestField::Code},
    {"locals", RequestField::Locals},
    {"result", RequestField::Result},
    {"max_size", RequestField::MaxSize},
    {"session", RequestField::Session},
    {"reply_to", RequestField::ReplyTo},
}};

constexpr std::array<std::string_view, 4> kKinds{"call", "eval", "exec", "run"};

}  // namespace

RequestField request_field(std::string_view name) noexcept {
  for (const Named& n : kFields) {
    if (n.name == name) return n.field;
  }
  return RequestField::Unknown;
}

std::optional<RequestKind> request_kind(std::string_view name) noexcept {
  for (std::size_t i = 0; i < kKinds.size(); ++i) {
    if (kKinds[i] == name) return static_cast<RequestKind>(i);
  }
  return std::nullopt;
}

const char* request_kind_name(RequestKind kind) noexcept {
  return kKinds[static_cast<std::size_t>(kind)].data();
}

void request_error(const std::string& what) {
  PyErr_Format(PyExc_ValueError, "request: %s", what.c_str());
  throw PythonError();
}

}  // namespace erpy::py
