// The main() of every GPU test binary: Catch2's own, compiled once here rather than in each test,
// because the Catch2 implementation is the slowest thing in the build to compile.
#define CATCH_CONFIG_MAIN
#include "catch2/catch.hpp"
