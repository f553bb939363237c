// Catch2's main() for the C++ tests of tests/allocator, tests/pool and tests/c_api: compiled once
// here rather than in each test file, so a test file holds only its tests. It tests nothing by
// itself.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
