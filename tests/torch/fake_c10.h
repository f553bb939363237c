// A stand-in for PyTorch's c10 error classes, for tests only: the same names, constructor and
// shape of hierarchy (c10::OutOfMemoryError derives from c10::Error, which derives from
// std::exception, and inherits its constructor), so that integrations/torch/torch_errors.cc finds
// them by their mangled names and throws one as it would PyTorch's. Written here from the
// Itanium ABI's point of view; PyTorch's own classes hold more members, which the thrower never
// reads.
#ifndef TIDEPOOL_TESTS_TORCH_FAKE_C10_H_
#define TIDEPOOL_TESTS_TORCH_FAKE_C10_H_

#include <cstdint>
#include <exception>
#include <string>

namespace c10 {

struct SourceLocation {
  const char* function;
  const char* file;
  uint32_t line;
};

class Error : public std::exception {
 public:
  Error(SourceLocation where, std::string msg);
  ~Error() override;
  const char* what() const noexcept override { return what_.c_str(); }
  const std::string& msg() const { return msg_; }

 private:
  std::string msg_;
  std::string what_;
};

class OutOfMemoryError : public Error {
 public:
  using Error::Error;
};

}  // namespace c10

#endif  // TIDEPOOL_TESTS_TORCH_FAKE_C10_H_
