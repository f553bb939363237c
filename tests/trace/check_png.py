"""Checks that a PNG screenshot of the replay plot is not blank (plot_render_test.sh): decodes it
with the standard library (zlib and the PNG filters) and requires that a fair share of pixels
differ from the background and that the plot's line colours appear. Prints what it found."""
import struct
import sys
import zlib


def decode(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    at, chunks, width, height, color_type = 8, [], 0, 0, 0
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color_type = struct.unpack(">IIBB", body[:10])
            assert depth == 8, "bit depth %d" % depth
        elif kind == b"IDAT":
            chunks.append(body)
        at += 12 + length
    channels = {2: 3, 6: 4}[color_type]
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up = previous[x]
            corner = previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + left) & 255
            elif kind == 2:
                line[x] = (line[x] + up) & 255
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                predictor = left if pa <= pb and pa <= pc else (up if pb <= pc else corner)
                line[x] = (line[x] + predictor) & 255
        rows.append(line)
        previous = line
    return width, height, channels, rows


def main(path):
    width, height, channels, rows = decode(path)
    pixels = [tuple(row[x:x + 3]) for row in rows for x in range(0, len(row), channels)]
    background = max(set(pixels), key=pixels.count)
    drawn = sum(1 for p in pixels if p != background)
    blue = sum(1 for r, g, b in pixels if b > 150 and r < 80 and g < 160)  # tidepool reserved
    share = drawn / len(pixels)
    print("plot: %dx%d, %.1f%% of pixels drawn, %d blue (tidepool reserved)" %
          (width, height, share * 100, blue))
    if share < 0.01 or blue < 200:
        print("FAIL: the screenshot is blank or lacks the plot's lines")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
