// A shard's block bookkeeping: see shard.h.
#include "allocator/shard.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_format.h"
#include "allocator/size_policy.h"

namespace tidepool {

Shard::Shard(Device* device, Arena* arena, StreamId stream_id, uint32_t lane,
             size_t max_split_size,
             std::atomic<uint64_t>* free_epoch,
             const std::atomic<int>* captures_underway)
    : arena(arena),
      stream_id(stream_id),
      lane(lane),
      device_(device),
      max_split_size_(max_split_size),
      free_epoch_(free_epoch),
      captures_underway_(captures_underway) {}

Shard::~Shard() {
  MutexLock lock(&mu);
  for (Segment* segment : segments_) {
    for (Block* block = segment->first; block != nullptr;) {
      Block* next = block->next;
      delete block;
      block = next;
    }
    segment->first = nullptr;
  }
  for (Block* block : spare_blocks_) delete block;
  for (PendingFree& pending : pending_) {
    for (Event event : pending.events) device_->DestroyEvent(event).IgnoreError();
  }
  for (Event event : spare_events_) device_->DestroyEvent(event).IgnoreError();
  if (fence_ != nullptr) device_->DestroyEvent(fence_).IgnoreError();
}

Block* Shard::NewBlock() {
  if (spare_blocks_.empty()) return new Block;
  Block* block = spare_blocks_.back();
  spare_blocks_.pop_back();
  block->requested = 0;
  block->prev = block->next = nullptr;
  block->freed_epoch = 0;
  block->uses.clear();
  return block;
}

void Shard::DeleteBlock(Block* block) { spare_blocks_.push_back(block); }

BlockIndex* Shard::IndexFor(const Block* block) {
  return block->state == BlockState::kUnmapped ? &unmapped_[block->segment->small]
                                                : &free_[block->segment->small];
}

Block* Shard::Merge(Block* left, Block* right) {
  left->size += right->size;
  left->freed_epoch = std::max(left->freed_epoch, right->freed_epoch);
  left->next = right->next;
  if (right->next != nullptr) right->next->prev = left;
  DeleteBlock(right);
  return left;
}

Block* Shard::SplitFront(Block* block, size_t bytes) {
  Block* tail = NewBlock();
  tail->address = block->address + bytes;
  tail->size = block->size - bytes;
  tail->segment = block->segment;
  tail->state = block->state;
  tail->freed_epoch = block->freed_epoch;
  tail->prev = block;
  tail->next = block->next;
  if (block->next != nullptr) block->next->prev = tail;
  block->next = tail;
  block->size = bytes;
  return tail;
}

Block* Shard::TakeQuick(size_t rounded) {
  for (QuickSlot& slot : quick_) {
    if (slot.rounded == rounded && slot.count > 0) {
      --quick_count_;
      return slot.blocks[--slot.count];
    }
  }
  return nullptr;
}

void Shard::Unpark(Block* block) {
  live_.erase(block->address);
  MakeFree(block);
}

bool Shard::ParkQuick(Block* block, size_t rounded) {
  QuickSlot* empty = nullptr;
  for (QuickSlot& slot : quick_) {
    if (slot.rounded == rounded) {
      if (slot.count == QuickSlot::kDepth) return false;
      slot.blocks[slot.count++] = block;
      block->state = BlockState::kQuick;
      ++quick_count_;
      return true;
    }
    if (slot.count == 0 && empty == nullptr) empty = &slot;
  }
  if (empty == nullptr) {
    // Every slot holds another size: give the oldest-chosen one back to the index.
    empty = &quick_[quick_next_victim_];
    quick_next_victim_ = (quick_next_victim_ + 1) % kQuickSlots;
    while (empty->count > 0) {
      --quick_count_;
      Unpark(empty->blocks[--empty->count]);
    }
  }
  empty->rounded = rounded;
  empty->blocks[empty->count++] = block;
  block->state = BlockState::kQuick;
  ++quick_count_;
  return true;
}

void Shard::FlushQuick() {
  if (quick_count_ == 0) return;
  for (QuickSlot& slot : quick_) {
    while (slot.count > 0) Unpark(slot.blocks[--slot.count]);
  }
  quick_count_ = 0;
}

void Shard::Activate(Block* block, size_t requested) {
  block->state = BlockState::kAllocated;
  block->requested = requested;
  stats_.requested_bytes.Increase(static_cast<int64_t>(requested));
  stats_.allocated_bytes.Increase(static_cast<int64_t>(block->size));
  stats_.active_blocks.Increase(1);
}

Block* Shard::TakeFreeBlock(size_t rounded, size_t requested) {
  if (quick_count_ > 0) {
    if (Block* block = TakeQuick(rounded)) {
      Activate(block, requested);  // a parked block never left live_
      return block;
    }
    FlushQuick();
  }
  BlockIndex& index = free_[IsSmall(rounded)];
  Block key;
  key.size = rounded;
  auto it = index.lower_bound(&key);
  // The index is ordered by size, so the first candidate is the best fit; if the size policy
  // refuses it, it refuses every larger block too.
  if (it == index.end() || !MayServe((*it)->size, rounded, max_split_size_)) return nullptr;
  Block* block = *it;
  index.erase(it);
  // max_split_size keeps large blocks whole; a small segment (2 MiB, for small requests only)
  // is always carved, or a limit at or below 2 MiB would give every small request a segment.
  if ((block->segment->small || block->size < max_split_size_) &&
      ShouldSplit(block->size, rounded, block->segment->expandable)) {
    // The tail's right neighbour cannot be free: it would have been merged into `block`.
    Block* tail = SplitFront(block, rounded);
    tail->state = BlockState::kFree;
    index.insert(tail);
  }
  live_.emplace(block->address, block);
  Activate(block, requested);
  return block;
}

Block* Shard::FindLive(uintptr_t address) {
  auto it = live_.find(address);
  return it == live_.end() || it->second->state != BlockState::kAllocated ? nullptr : it->second;
}

absl::StatusOr<Event> Shard::TakeEvent() {
  if (!spare_events_.empty()) {
    Event event = spare_events_.back();
    spare_events_.pop_back();
    return event;
  }
  return device_->CreateEvent();
}

absl::Status Shard::FreeLive(Block* block) {
  block->freed_epoch = free_epoch_->load();
  stats_.requested_bytes.Decrease(static_cast<int64_t>(block->requested));
  stats_.allocated_bytes.Decrease(static_cast<int64_t>(block->size));
  stats_.active_blocks.Decrease(1);
  size_t rounded = RoundUp(block->requested, kMinBlockSize);
  block->requested = 0;
  if (block->uses.empty() && IsSmall(rounded) && ParkQuick(block, rounded)) {
    return absl::OkStatus();
  }
  live_.erase(block->address);
  if (block->uses.empty()) {
    MakeFree(block);
    return absl::OkStatus();
  }
  if (Capturing()) {
    block->state = BlockState::kAwaitingEvents;
    deferred_.push_back(block);
    return absl::OkStatus();
  }
  return AwaitUses(block);
}

absl::Status Shard::ReleaseDeferredFrees() {
  if (Capturing()) {
    return absl::FailedPreconditionError(
        "tidepool: deferred frees released while a capture is underway");
  }
  for (Block* block : deferred_) {
    block->uses.clear();
    MakeFree(block);
  }
  deferred_.clear();
  return absl::OkStatus();
}

absl::Status Shard::AwaitUses(Block* block) {
  PendingFree pending{block, {}};
  absl::Status status;
  for (const StreamUse& use : block->uses) {
    absl::StatusOr<Event> event = TakeEvent();
    if (event.ok()) {
      status = device_->RecordEvent(*event, use.stream);
      if (status.ok()) {
        pending.events.push_back(*event);
        continue;
      }
      spare_events_.push_back(*event);
    } else {
      status = event.status();
    }
    break;
  }
  block->uses.clear();
  if (!status.ok()) {
    // An event could not be recorded (a stream the block was used on is gone, say). The only
    // safe answer left is to wait for the whole device before the block can be reused.
    for (Event event : pending.events) spare_events_.push_back(event);
    if (absl::Status sync = device_->SynchronizeDevice(); !sync.ok()) {
      block->state = BlockState::kAwaitingEvents;  // never reused: leaked rather than corrupted
      return absl::InternalError(absl::StrFormat(
          "tidepool: block %#x kept out of use: recording its stream events failed (%s) and so "
          "did synchronizing the device (%s)",
          block->address, status.message(), sync.message()));
    }
    MakeFree(block);
    return absl::OkStatus();
  }
  block->state = BlockState::kAwaitingEvents;
  pending_.push_back(std::move(pending));
  return absl::OkStatus();
}

Block* Shard::MakeFree(Block* block) {
  block->state = BlockState::kFree;
  BlockIndex& index = free_[block->segment->small];
  if (block->prev != nullptr && block->prev->state == BlockState::kFree) {
    index.erase(block->prev);
    block = Merge(block->prev, block);
  }
  if (block->next != nullptr && block->next->state == BlockState::kFree) {
    index.erase(block->next);
    block = Merge(block, block->next);
  }
  index.insert(block);
  return block;
}

Block* Shard::MarkUnmapped(Block* block, uintptr_t begin, uintptr_t end) {
  BlockIndex& free_index = free_[block->segment->small];
  BlockIndex& unmapped_index = unmapped_[block->segment->small];
  free_index.erase(block);
  Block* middle = block;
  if (begin > block->address) {
    middle = SplitFront(block, begin - block->address);
    free_index.insert(block);
  }
  if (end < middle->address + middle->size) {
    Block* tail = SplitFront(middle, end - middle->address);
    free_index.insert(tail);
  }
  middle->state = BlockState::kUnmapped;
  if (middle->prev != nullptr && middle->prev->state == BlockState::kUnmapped) {
    unmapped_index.erase(middle->prev);
    middle = Merge(middle->prev, middle);
  }
  if (middle->next != nullptr && middle->next->state == BlockState::kUnmapped) {
    unmapped_index.erase(middle->next);
    middle = Merge(middle, middle->next);
  }
  unmapped_index.insert(middle);
  return middle;
}

Block* Shard::MarkMapped(Block* unmapped, uintptr_t begin, size_t bytes) {
  BlockIndex& unmapped_index = unmapped_[unmapped->segment->small];
  unmapped_index.erase(unmapped);
  Block* mapped = unmapped;
  if (begin > unmapped->address) {
    mapped = SplitFront(unmapped, begin - unmapped->address);
    unmapped_index.insert(unmapped);
  }
  if (bytes < mapped->size) {
    Block* rest = SplitFront(mapped, bytes);
    unmapped_index.insert(rest);
  }
  mapped->freed_epoch = 0;  // fresh memory: no work has ever used it
  return MakeFree(mapped);
}

absl::StatusOr<bool> Shard::AllDone(Device* device, const PendingFree& pending) {
  for (Event event : pending.events) {
    absl::StatusOr<bool> done = device->QueryEvent(event);
    if (!done.ok()) return done.status();
    if (!*done) return false;
  }
  return true;
}

void Shard::FinishPending(PendingFree& pending) {
  for (Event event : pending.events) spare_events_.push_back(event);
  MakeFree(pending.block);
}

absl::Status Shard::HarvestEvents(bool all) {
  if (Capturing()) return absl::OkStatus();
  for (auto it = pending_.begin(); it != pending_.end();) {
    absl::StatusOr<bool> done = AllDone(device_, *it);
    if (!done.ok()) return done.status();
    if (*done) {
      FinishPending(*it);
      it = pending_.erase(it);
    } else if (all) {
      ++it;
    } else {
      break;
    }
  }
  return absl::OkStatus();
}

absl::Status Shard::RecordFence(Stream stream) {
  if (Capturing()) {
    return absl::FailedPreconditionError("tidepool: a fence recorded while a capture is underway");
  }
  if (fence_ == nullptr) {
    absl::StatusOr<Event> event = TakeEvent();
    if (!event.ok()) return event.status();
    fence_ = *event;
  }
  // Under mu, so no free of this shard runs meanwhile: every block freed here so far read an
  // epoch below `epoch`, every later one reads `epoch` or more. The work queued before each of
  // those frees was queued on the stream before this record.
  const uint64_t epoch = free_epoch_->fetch_add(1) + 1;
  fence_epoch_ = 0;  // until the record succeeds, the fence covers nothing
  fence_complete_ = false;
  if (absl::Status s = device_->RecordEvent(fence_, stream); !s.ok()) return s;
  fence_epoch_ = epoch;
  return absl::OkStatus();
}

absl::StatusOr<bool> Shard::FenceDone(FenceWait how) {
  if (fence_epoch_ == 0) return false;
  if (fence_complete_) return true;
  if (Capturing()) return false;
  if (how == FenceWait::kBlock) {
    if (absl::Status s = device_->SynchronizeEvent(fence_); !s.ok()) return s;
    fence_complete_ = true;
    return true;
  }
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::nanoseconds(kBriefFenceWaitNs);
  while (true) {
    absl::StatusOr<bool> done = device_->QueryEvent(fence_);
    if (!done.ok()) return done.status();
    fence_complete_ = *done;
    if (*done || how == FenceWait::kQuery || std::chrono::steady_clock::now() >= deadline) {
      return *done;
    }
  }
}

absl::Status Shard::WaitForEvents() {
  if (Capturing()) {
    return absl::FailedPreconditionError(
        "tidepool: waiting for events while a capture is underway");
  }
  FlushQuick();
  for (PendingFree& pending : pending_) {
    for (Event event : pending.events) {
      if (absl::Status s = device_->SynchronizeEvent(event); !s.ok()) return s;
    }
  }
  return HarvestEvents(/*all=*/true);
}

void Shard::AddSegment(Segment* segment, BlockState initial) {
  Block* block = NewBlock();
  block->address = segment->base;
  block->size = segment->size;
  block->segment = segment;
  block->state = initial;
  segment->first = block;
  segment->shard = this;
  segments_.push_back(segment);
  IndexFor(block)->insert(block);
}

bool Shard::RemoveSegmentIfIdle(Segment* segment) {
  FlushQuick();
  for (Block* block = segment->first; block != nullptr; block = block->next) {
    if (block->state != BlockState::kFree && block->state != BlockState::kUnmapped) return false;
  }
  for (Block* block = segment->first; block != nullptr;) {
    Block* next = block->next;
    IndexFor(block)->erase(block);
    DeleteBlock(block);
    block = next;
  }
  segment->first = nullptr;
  segments_.erase(std::find(segments_.begin(), segments_.end(), segment));
  return true;
}

}  // namespace tidepool
