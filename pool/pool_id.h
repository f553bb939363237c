// Pool identity: a pair of 64-bit integers, so that it maps one-to-one onto PyTorch's
// MempoolId_t.
//
// {0, 0} is the default pool of a device, which always exists. Pools that users create take ids
// {0, n} from one counter; pools made for CUDA graphs take {n, 0} from another, as PyTorch does,
// so ids from the two never collide and a PyTorch id means the same thing here. tidepool's
// counters start at 2^48, far above PyTorch's own (which start at 1), so that ids PyTorch makes
// and ids tidepool makes never meet in one process (pool_id.cc).
#ifndef TIDEPOOL_POOL_POOL_ID_H_
#define TIDEPOOL_POOL_POOL_ID_H_

#include <cstdint>
#include <string>

#include "absl/strings/str_format.h"

namespace tidepool {

struct PoolId {
  uint64_t first = 0;
  uint64_t second = 0;

  bool is_default() const { return first == 0 && second == 0; }
  std::string ToString() const { return absl::StrFormat("{%u,%u}", first, second); }

  friend bool operator==(const PoolId& a, const PoolId& b) {
    return a.first == b.first && a.second == b.second;
  }
  friend bool operator!=(const PoolId& a, const PoolId& b) { return !(a == b); }
  template <typename H>
  friend H AbslHashValue(H h, const PoolId& id) {
    return H::combine(std::move(h), id.first, id.second);
  }
};

inline constexpr PoolId kDefaultPool{0, 0};

// A new id for a pool a user creates: {0, n}.
PoolId NewUserPoolId();
// A new id for a CUDA graph's private pool: {n, 0}.
PoolId NewGraphPoolId();

}  // namespace tidepool

#endif  // TIDEPOOL_POOL_POOL_ID_H_
