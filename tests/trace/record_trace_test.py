"""The GPU host's trace recorder (tools/record_torch_trace.py), off the GPU: its conversion of
PyTorch's allocator history to replay rows, on made-up history entries, and the file it writes,
replayed by `tidepool replay` on the simulated device (so what it records is what replay reads).
"""

import gzip
import os
import subprocess
import tempfile
import unittest

from tools import record_torch_trace as recorder


def entry(action, addr, size, stream=0, time_us=None):
    e = {"action": action, "addr": addr, "size": size, "stream": stream}
    if time_us is not None:
        e["time_us"] = time_us
    return e


class HistoryToRowsTest(unittest.TestCase):
    def test_allocations_and_requested_frees_become_rows(self):
        history = [
            entry("segment_alloc", 0x7000, 2 << 20, time_us=100),
            entry("alloc", 0x7000, 512, stream=0x33, time_us=105),
            entry("alloc", 0x7200, 1024, time_us=110),
            entry("free_requested", 0x7000, 512, stream=0x33, time_us=130),
            entry("free_completed", 0x7000, 512, stream=0x33, time_us=140),
            entry("oom", 0, 1 << 30, time_us=150),
        ]
        rows = recorder.history_to_rows(history)
        self.assertEqual(rows, [
            (0, 0, "allocate", 0x7000, 512, 0x33),
            (0, 5, "allocate", 0x7200, 1024, 0),
            (0, 25, "free", 0x7000, 512, 0x33),
        ])
        self.assertEqual(recorder.peak_live_bytes(rows), 1536)

    def test_without_times_the_entry_index_is_the_clock(self):
        rows = recorder.history_to_rows([entry("alloc", 0x10, 8), entry("free_requested", 0x10, 8)])
        self.assertEqual([r[1] for r in rows], [0, 1])

    def test_history_that_cannot_be_replayed_is_refused(self):
        with self.assertRaisesRegex(ValueError, "allocated while live"):
            recorder.history_to_rows([entry("alloc", 0x10, 8), entry("alloc", 0x10, 8)])
        with self.assertRaisesRegex(ValueError, "not live"):
            recorder.history_to_rows([entry("free_requested", 0x10, 8)])


class WrittenTraceTest(unittest.TestCase):
    def test_tidepool_replay_reads_what_the_recorder_writes(self):
        history = []
        for i in range(200):
            history.append(entry("alloc", 0x100000 + i * 0x10000, 1000 + i * 4096,
                                 stream=(i % 2) * 0x55, time_us=i))
            if i % 3 == 2:
                history.append(entry("free_requested", 0x100000 + (i - 1) * 0x10000, 0,
                                     time_us=i))
        rows = recorder.history_to_rows(history)
        with tempfile.TemporaryDirectory() as scratch:
            path = os.path.join(scratch, "made_up.csv.gz")
            recorder.write_trace(rows, path)
            with gzip.open(path, "rt") as f:
                self.assertEqual(f.readline().strip(), "Thread,Time,Action,Pointer,Size,Stream")
            tidepool = os.environ["TIDEPOOL_TOOL"]
            replayed = subprocess.run([tidepool, "replay", path, "--device=sim"], check=True,
                                      capture_output=True, text=True)
        out = replayed.stdout
        self.assertIn("events on 2 streams", replayed.stdout + replayed.stderr)
        row = next(line for line in out.splitlines() if line.startswith("| made_up |"))
        fields = [f.strip() for f in row.strip("|").split("|")]
        self.assertEqual(int(fields[1]), 200)  # allocations replayed


if __name__ == "__main__":
    unittest.main()
