// The replay's SVG plot: see replay_plot.h.
#include "tools/replay_plot.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

namespace tidepool {
namespace {

// The drawing area inside the document, in SVG units.
constexpr double kWidth = 960;
constexpr double kHeight = 540;
constexpr double kLeft = 90;
constexpr double kRight = 230;  // room for the legend
constexpr double kTop = 50;
constexpr double kBottom = 70;
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

std::string Escape(absl::string_view text) {
  std::string escaped;
  for (char c : text) {
    switch (c) {
      case '&':
        escaped += "&amp;";
        break;
      case '<':
        escaped += "&lt;";
        break;
      case '>':
        escaped += "&gt;";
        break;
      case '"':
        escaped += "&quot;";
        break;
      default:
        escaped += c;
    }
  }
  return escaped;
}

// A round step for about `ticks` intervals over [0, max]: 1, 2 or 5 times a power of ten.
double NiceStep(double max, int ticks) {
  if (max <= 0) return 1;
  const double raw = max / ticks;
  const double power = std::pow(10.0, std::floor(std::log10(raw)));
  for (double factor : {1.0, 2.0, 5.0, 10.0}) {
    if (raw <= factor * power) return factor * power;
  }
  return 10 * power;
}

}  // namespace

std::vector<PlotSeries> ReplaySeries(const ReplayResult& result) {
  PlotSeries live{"live (the trace)", "#444444", /*dashed=*/true, {}};
  PlotSeries reserved{"tidepool reserved", "#1f77b4", /*dashed=*/false, {}};
  for (const TimelinePoint& point : result.timeline) {
    live.points.emplace_back(point.event, point.live_bytes);
    reserved.points.emplace_back(point.event, point.reserved_bytes);
  }
  return {live, reserved};
}

absl::StatusOr<PlotSeries> ReadReservedSeries(const std::string& label, const std::string& path) {
  std::ifstream file(path);
  if (!file) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  PlotSeries series{label, "#d62728", /*dashed=*/false, {}};
  std::string line;
  int line_number = 0;
  while (std::getline(file, line)) {
    ++line_number;
    absl::string_view text = absl::StripAsciiWhitespace(line);
    if (text.empty()) continue;
    std::vector<absl::string_view> fields = absl::StrSplit(text, ',');
    int64_t event = 0;
    int64_t bytes = 0;
    if (fields.size() != 2 || !absl::SimpleAtoi(fields[0], &event) ||
        !absl::SimpleAtoi(fields[1], &bytes)) {
      if (line_number == 1) continue;  // a header
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s:%d: expected `event,reserved_bytes`, found \"%s\"", path, line_number, text));
    }
    series.points.emplace_back(event, bytes);
  }
  if (series.points.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no `event,reserved_bytes` lines"));
  }
  return series;
}

std::string PlotSvg(const std::string& title, const std::vector<PlotSeries>& series) {
  int64_t max_event = 1;
  int64_t max_bytes = 1;
  for (const PlotSeries& s : series) {
    for (const auto& [event, bytes] : s.points) {
      max_event = std::max(max_event, event);
      max_bytes = std::max(max_bytes, bytes);
    }
  }
  const double plot_width = kWidth - kLeft - kRight;
  const double plot_height = kHeight - kTop - kBottom;
  const double y_step = NiceStep(max_bytes / kGiB, 5);
  const double y_max = std::ceil(max_bytes / kGiB / y_step) * y_step;
  const double x_step = NiceStep(static_cast<double>(max_event), 6);
  const double x_max = std::ceil(max_event / x_step) * x_step;
  auto x = [&](double event) { return kLeft + event / x_max * plot_width; };
  auto y = [&](double bytes) { return kTop + plot_height - bytes / kGiB / y_max * plot_height; };

  std::string svg = absl::StrFormat(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
      "viewBox=\"0 0 %.0f %.0f\" font-family=\"sans-serif\" font-size=\"13\">\n"
      "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
      "<text x=\"%.0f\" y=\"28\" font-size=\"16\">%s</text>\n",
      kWidth, kHeight, kWidth, kHeight, kLeft, Escape(title));
  // Grid, ticks and their labels.
  for (double tick = 0; tick <= y_max + y_step / 2; tick += y_step) {
    const double at = y(tick * kGiB);
    absl::StrAppendFormat(&svg,
                          "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#dddddd\"/>"
                          "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n",
                          kLeft, at, kLeft + plot_width, at, kLeft - 8, at + 4, tick);
  }
  for (double tick = 0; tick <= x_max + x_step / 2; tick += x_step) {
    const double at = x(tick);
    absl::StrAppendFormat(&svg,
                          "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#dddddd\"/>"
                          "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%.0f</text>\n",
                          at, kTop, at, kTop + plot_height, at, kTop + plot_height + 20, tick);
  }
  // Axes and their names, with units.
  absl::StrAppendFormat(
      &svg,
      "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"black\"/>"
      "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"black\"/>\n"
      "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">events (allocations and frees)</text>\n"
      "<text transform=\"translate(30 %.1f) rotate(-90)\" text-anchor=\"middle\">memory "
      "(GiB)</text>\n",
      kLeft, kTop + plot_height, kLeft + plot_width, kTop + plot_height, kLeft, kTop, kLeft,
      kTop + plot_height, kLeft + plot_width / 2, kHeight - 20, kTop + plot_height / 2);
  // The series, and the legend.
  double legend_y = kTop + 10;
  for (const PlotSeries& s : series) {
    std::string points;
    std::string values;
    for (const auto& [event, bytes] : s.points) {
      absl::StrAppendFormat(&points, "%.1f,%.1f ", x(static_cast<double>(event)),
                            y(static_cast<double>(bytes)));
      absl::StrAppendFormat(&values, "%d:%d ", event, bytes);
    }
    absl::StrAppendFormat(
        &svg,
        "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\"%s data-series=\"%s\" "
        "data-values=\"%s\" points=\"%s\"/>\n",
        s.color, s.dashed ? " stroke-dasharray=\"6 4\"" : "", Escape(s.label),
        absl::StripTrailingAsciiWhitespace(values), absl::StripTrailingAsciiWhitespace(points));
    const double legend_x = kWidth - kRight + 20;
    absl::StrAppendFormat(&svg,
                          "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" "
                          "stroke-width=\"2\"%s/><text x=\"%.1f\" y=\"%.1f\">%s</text>\n",
                          legend_x, legend_y, legend_x + 30, legend_y, s.color,
                          s.dashed ? " stroke-dasharray=\"6 4\"" : "", legend_x + 38,
                          legend_y + 4, Escape(s.label));
    legend_y += 22;
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace tidepool
