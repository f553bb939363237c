// Catch2's main() for the C++ tests of the C API, compiled once here rather than in each test.
// It tests nothing by itself.
#define CATCH_CONFIG_MAIN
#include "catch2/catch.hpp"
