// MD5 (RFC 1321), only for the distribution handshake's cookie digest:
// MD5(Cookie ++ integer_to_list(Challenge)). Not for anything that needs a secure hash.
#pragma once
#include <array>
#include <cstdint>
#include <string_view>

namespace erpy::node {

std::array<std::uint8_t, 16> md5(std::string_view data);

}  // namespace erpy::node
