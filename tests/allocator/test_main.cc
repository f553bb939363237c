// Catch2's main() for every test in tests/allocator: compiled once here rather than in each test
// file, so a test file holds only its tests. It tests nothing by itself.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
