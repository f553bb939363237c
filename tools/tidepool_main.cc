// The `tidepool` command. Its one subcommand so far, `replay`, replays allocation traces through
// tidepool and prints how much memory it reserved next to what PyTorch reserved for the same
// workload (see tools/replay.h):
//
//   tidepool replay TRACE... [--device=sim|cuda] [--conf=key:value,...]
//                   [--plot=out.svg [--plot-compare=LABEL:FILE.csv]]
//
// --device: `cuda` replays on GPU 0 (real memory, real driver latencies); `sim` on the simulated
//   device (no GPU needed; reserved bytes are the same, latencies are tidepool's CPU path alone).
//   By default: cuda when a GPU is usable, sim otherwise.
// --conf: the allocator configuration, in TIDEPOOL_CONF's format (docs/configuration.md); when
//   absent, TIDEPOOL_CONF itself is read.
// --plot: with one trace, writes an SVG of live and reserved bytes over the replay
//   (tools/replay_plot.h); --plot-compare adds another run's reserved bytes from a CSV of
//   `event,reserved_bytes` lines.
//
// Exits 0 when every trace replayed, 1 with the error on the first that did not, 2 on bad usage.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "allocator/config.h"
#include "allocator/cuda_device.h"
#include "allocator/device.h"
#include "allocator/graph_device.h"
#include "allocator/simulated_device.h"
#include "trace/trace.h"
#include "tools/replay.h"
#include "tools/replay_plot.h"

namespace tidepool {
namespace {

constexpr char kUsage[] =
    "usage: tidepool replay TRACE... [--device=sim|cuda] [--conf=key:value,...]\n"
    "  Replays allocation traces (Thread,Time,Action,Pointer,Size,Stream CSV, plain or .gz)\n"
    "  and prints peak reserved bytes against PyTorch's for the same workload.\n"
    "  --device  cuda (GPU 0) or sim (simulated); default: cuda when a GPU is usable\n"
    "  --conf    allocator configuration; default: the TIDEPOOL_CONF environment variable\n"
    "  --plot=out.svg  (one trace) an SVG of live and reserved bytes over the replay\n"
    "  --plot-compare=LABEL:FILE.csv  another run's reserved bytes (event,reserved_bytes)\n";

struct ReplayCommand {
  std::vector<std::string> trace_paths;
  // "", "sim" or "cuda"; "" picks cuda when a GPU is usable.
  std::string device;
  // Set when --conf was given.
  bool has_conf = false;
  std::string conf;
  // --plot and --plot-compare.
  std::string plot_path;
  std::string compare_label;
  std::string compare_path;
};

absl::StatusOr<ReplayCommand> ParseReplayArguments(int argc, char** argv) {
  ReplayCommand command;
  for (int i = 2; i < argc; ++i) {
    absl::string_view argument = argv[i];
    if (absl::ConsumePrefix(&argument, "--device=")) {
      if (argument != "sim" && argument != "cuda") {
        return absl::InvalidArgumentError(
            absl::StrCat("--device must be sim or cuda, not \"", argument, "\""));
      }
      command.device = std::string(argument);
    } else if (absl::ConsumePrefix(&argument, "--conf=")) {
      command.has_conf = true;
      command.conf = std::string(argument);
    } else if (absl::ConsumePrefix(&argument, "--plot=")) {
      command.plot_path = std::string(argument);
    } else if (absl::ConsumePrefix(&argument, "--plot-compare=")) {
      const size_t colon = argument.find(':');
      if (colon == absl::string_view::npos || colon == 0 || colon + 1 == argument.size()) {
        return absl::InvalidArgumentError("--plot-compare takes LABEL:FILE.csv");
      }
      command.compare_label = std::string(argument.substr(0, colon));
      command.compare_path = std::string(argument.substr(colon + 1));
    } else if (absl::StartsWith(argument, "-")) {
      return absl::InvalidArgumentError(absl::StrCat("unknown option ", argument));
    } else {
      command.trace_paths.emplace_back(argument);
    }
  }
  if (command.trace_paths.empty()) return absl::InvalidArgumentError("no trace given");
  if (!command.plot_path.empty() && command.trace_paths.size() != 1) {
    return absl::InvalidArgumentError("--plot draws one trace: give exactly one");
  }
  if (!command.compare_path.empty() && command.plot_path.empty()) {
    return absl::InvalidArgumentError("--plot-compare needs --plot");
  }
  return command;
}

// The device to replay on, and a line saying which it is.
absl::StatusOr<std::unique_ptr<GraphDevice>> OpenDevice(const std::string& requested,
                                                        std::string* description) {
  if (requested != "sim") {
    absl::StatusOr<std::unique_ptr<CudaDevice>> cuda = CudaDevice::Create(0);
    if (cuda.ok()) {
      *description = "cuda (GPU 0)";
      return std::unique_ptr<GraphDevice>(*std::move(cuda));
    }
    if (requested == "cuda") return cuda.status();
    *description = absl::StrCat("sim (no usable GPU: ", cuda.status().message(), ")");
  } else {
    *description = "sim";
  }
  return std::unique_ptr<GraphDevice>(std::make_unique<SimulatedDevice>());
}

absl::Status WritePlot(const ReplayCommand& command, const std::string& trace_path,
                       const ReplayResult& result) {
  std::vector<PlotSeries> series = ReplaySeries(result);
  if (!command.compare_path.empty()) {
    absl::StatusOr<PlotSeries> compared =
        ReadReservedSeries(command.compare_label, command.compare_path);
    if (!compared.ok()) return compared.status();
    series.push_back(*std::move(compared));
  }
  std::FILE* out = std::fopen(command.plot_path.c_str(), "w");
  if (out == nullptr) {
    return absl::NotFoundError(absl::StrCat("cannot write ", command.plot_path));
  }
  const std::string svg = PlotSvg(TraceName(trace_path), series);
  const bool written = std::fwrite(svg.data(), 1, svg.size(), out) == svg.size();
  if (std::fclose(out) != 0 || !written) {
    return absl::InternalError(absl::StrCat("writing ", command.plot_path, " failed"));
  }
  std::fprintf(stderr, "plot: %s\n", command.plot_path.c_str());
  return absl::OkStatus();
}

absl::Status RunReplay(const ReplayCommand& command) {
  absl::StatusOr<Config> config =
      command.has_conf ? Config::Parse(command.conf) : Config::FromEnvironment();
  if (!config.ok()) return config.status();
  std::string device_description;
  absl::StatusOr<std::unique_ptr<GraphDevice>> device =
      OpenDevice(command.device, &device_description);
  if (!device.ok()) return device.status();
  std::printf("device: %s\n", device_description.c_str());
  std::fflush(stdout);  // before the progress lines on stderr

  std::vector<ReplayRow> rows;
  for (const std::string& path : command.trace_paths) {
    absl::StatusOr<Trace> trace = ReadTrace(path);
    if (!trace.ok()) return trace.status();
    absl::StatusOr<ReplayResult> result = ReplayTrace(*trace, device->get(), *config);
    if (!result.ok()) {
      return absl::Status(result.status().code(),
                          absl::StrCat(path, ": ", result.status().message()));
    }
    std::fprintf(stderr,
                 "replayed %s: %lld events on %lld streams; slowest malloc at trace line %lld "
                 "(%lld ns)\n",
                 path.c_str(), static_cast<long long>(trace->events.size()),
                 static_cast<long long>(result->streams),
                 static_cast<long long>(result->malloc_latency.max_line),
                 static_cast<long long>(result->malloc_latency.max_ns));
    if (!command.plot_path.empty()) {
      if (absl::Status s = WritePlot(command, path, *result); !s.ok()) return s;
    }
    rows.push_back(ReplayRow{TraceName(path), *std::move(result), ReadPytorchReference(path)});
  }
  std::printf("\n%s", FormatReplayTable(rows).c_str());
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  if (argc < 2 || absl::string_view(argv[1]) == "--help" || absl::string_view(argv[1]) == "-h") {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  if (absl::string_view(argv[1]) != "replay") {
    std::fprintf(stderr, "tidepool: unknown command \"%s\"\n%s", argv[1], kUsage);
    return 2;
  }
  absl::StatusOr<ReplayCommand> command = ParseReplayArguments(argc, argv);
  if (!command.ok()) {
    std::fprintf(stderr, "tidepool replay: %s\n%s", std::string(command.status().message()).c_str(),
                 kUsage);
    return 2;
  }
  absl::Status status = RunReplay(*command);
  if (!status.ok()) {
    std::fprintf(stderr, "tidepool replay: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace tidepool

int main(int argc, char** argv) { return tidepool::Main(argc, argv); }
