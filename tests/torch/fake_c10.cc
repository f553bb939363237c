// The stand-in c10 error classes (fake_c10.h), defined out of line as PyTorch defines its own.
#include "tests/torch/fake_c10.h"

#include <utility>

namespace c10 {

Error::Error(SourceLocation where, std::string msg)
    : msg_(std::move(msg)),
      what_(msg_ + " (raised from " + where.function + " at " + where.file + ")") {}

Error::~Error() = default;

}  // namespace c10

// Makes the translation unit emit OutOfMemoryError's vtable and type_info, as PyTorch's
// libraries do wherever they throw it.
extern "C" void fake_c10_throw_out_of_memory() {
  throw c10::OutOfMemoryError({__func__, __FILE__, __LINE__}, "fake");
}
