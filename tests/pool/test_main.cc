// Catch2's main() for every test in tests/pool, compiled once. It tests nothing by itself.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
