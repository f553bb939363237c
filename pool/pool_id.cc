// The two id counters of pool_id.h. Both start at 2^48, not at 1: PyTorch numbers the pools it
// makes ({0, n} for graph_pool_handle() and MemPool, {n, 0} for a graph's private pool) from 1
// with counters of its own, and with tidepool as PyTorch's allocator both kinds of id reach the
// same pool managers (integrations/torch). Starting far above PyTorch's keeps the two apart for
// any process that makes fewer than 2^48 pools. 0 in either half means "not from this counter",
// and {0, 0} is the default pool.
#include "pool/pool_id.h"

#include <atomic>

namespace tidepool {
namespace {

constexpr uint64_t kFirstId = uint64_t{1} << 48;

std::atomic<uint64_t> next_user_pool{kFirstId};
std::atomic<uint64_t> next_graph_pool{kFirstId};

}  // namespace

PoolId NewUserPoolId() { return PoolId{0, next_user_pool.fetch_add(1)}; }
PoolId NewGraphPoolId() { return PoolId{next_graph_pool.fetch_add(1), 0}; }

}  // namespace tidepool
