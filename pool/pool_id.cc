// The two id counters of pool_id.h. Both start at 1: 0 in either half means "not from this
// counter", and {0, 0} is the default pool.
#include "pool/pool_id.h"

#include <atomic>

namespace tidepool {
namespace {

std::atomic<uint64_t> next_user_pool{1};
std::atomic<uint64_t> next_graph_pool{1};

}  // namespace

PoolId NewUserPoolId() { return PoolId{0, next_user_pool.fetch_add(1)}; }
PoolId NewGraphPoolId() { return PoolId{next_graph_pool.fetch_add(1), 0}; }

}  // namespace tidepool
