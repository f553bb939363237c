// torch.OutOfMemoryError from outside PyTorch: see torch_errors.h for why and how.
#include "integrations/torch/torch_errors.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <link.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <new>
#include <stdexcept>
#include <typeinfo>

namespace tidepool {
namespace torch_hooks {
namespace {

// c10::SourceLocation as PyTorch declares it: the function, the file and the line.
struct SourceLocation {
  const char* function;
  const char* file;
  uint32_t line;
};

// c10::Error::Error(c10::SourceLocation, std::string), the complete-object constructor.
using ErrorConstructor = void (*)(void* self, SourceLocation where, std::string message);

// Bytes for the exception object: more than c10::Error has ever needed (about 200 on x86-64);
// the object uses what it needs and the rest is never read.
constexpr size_t kObjectBytes = 1024;

struct C10 {
  ErrorConstructor construct = nullptr;
  void* const* vtable = nullptr;  // OutOfMemoryError's, past its offset-to-top and type_info
  std::type_info* type = nullptr;
  bool usable = false;
};

// A thrown object's destructor, through its vtable: the Itanium ABI puts the complete-object
// destructor first among a polymorphic class's virtual functions when the destructor is virtual
// (c10::Error's is, as std::exception's).
void DestroyThroughVtable(void* object) {
  auto* const* vtable = *static_cast<void* const* const*>(object);
  reinterpret_cast<void (*)(void*)>(vtable[0])(object);
}

[[noreturn]] void ThrowC10OutOfMemory(const C10& c10, const std::string& message) {
  void* object = abi::__cxa_allocate_exception(kObjectBytes);
  std::memset(object, 0, kObjectBytes);
  c10.construct(object, SourceLocation{"tidepool_torch_malloc", "tidepool", 0}, message);
  // The constructor left c10::Error's vtable; OutOfMemoryError adds nothing but its type, as a
  // constructor it inherits would do.
  *static_cast<void* const**>(object) = c10.vtable;
  abi::__cxa_throw(object, c10.type, &DestroyThroughVtable);
}

// A symbol of any object loaded in the process. Python loads PyTorch's libraries without
// RTLD_GLOBAL, so the global scope may not have them: each loaded object is asked in turn.
struct SymbolSearch {
  const char* name;
  void* found;
};

int AskObject(struct dl_phdr_info* info, size_t, void* data) {
  auto* search = static_cast<SymbolSearch*>(data);
  if (info->dlpi_name == nullptr || info->dlpi_name[0] == '\0') return 0;
  void* handle = dlopen(info->dlpi_name, RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr) return 0;
  search->found = dlsym(handle, search->name);
  dlclose(handle);
  return search->found != nullptr ? 1 : 0;
}

void* FindSymbol(const char* name) {
  if (void* found = dlsym(RTLD_DEFAULT, name)) return found;
  SymbolSearch search{name, nullptr};
  dl_iterate_phdr(&AskObject, &search);
  return search.found;
}

// Finds PyTorch's c10 in the process and checks, with one throw caught here, that what it makes
// is a std::exception carrying the message.
C10 FindC10() {
  C10 c10;
  void* constructor = FindSymbol(
      "_ZN3c105ErrorC1ENS_14SourceLocationENSt7__cxx1112basic_stringIcSt11char_"
      "traitsIcESaIcEEE");
  void* vtable = FindSymbol("_ZTVN3c1016OutOfMemoryErrorE");
  void* type = FindSymbol("_ZTIN3c1016OutOfMemoryErrorE");
  if (constructor == nullptr || vtable == nullptr || type == nullptr) return c10;
  c10.construct = reinterpret_cast<ErrorConstructor>(constructor);
  // A vtable symbol names its start: the offset to the top, then the type_info, then the
  // virtual functions, where an object's vtable pointer points.
  c10.vtable = static_cast<void* const*>(vtable) + 2;
  c10.type = static_cast<std::type_info*>(type);
  try {
    ThrowC10OutOfMemory(c10, "tidepool: a test of torch.OutOfMemoryError");
  } catch (const std::exception& e) {
    c10.usable = std::strstr(e.what(), "a test of torch.OutOfMemoryError") != nullptr;
  } catch (...) {
  }
  return c10;
}

const C10& TheC10() {
  static const C10* const c10 = new C10(FindC10());
  return *c10;
}

}  // namespace

bool TorchOutOfMemoryErrorAvailable() { return TheC10().usable; }

void ThrowOutOfMemory(const std::string& message) {
  const C10& c10 = TheC10();
  if (c10.usable) ThrowC10OutOfMemory(c10, message);
  throw std::runtime_error(message);
}

void ThrowError(const std::string& message) { throw std::runtime_error(message); }

}  // namespace torch_hooks
}  // namespace tidepool
