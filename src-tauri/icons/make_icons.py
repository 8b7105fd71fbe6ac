"""Draws tilewise's icons as RGBA PNGs (Tauri requires RGBA) with the standard library only.

The glyph is a 2x2 grid of rounded tiles, one of them highlighted: "a matmul split into tiles".
`tray-template.png` is black-on-transparent for macOS's template tray image (the system tints it);
`tray.png` is the coloured tray icon used on Linux. Run: python3 make_icons.py
"""
import struct
import zlib


def png(path, size, pixel):
    rows = b"".join(
        b"\x00" + b"".join(bytes(pixel(x, y, size)) for x in range(size)) for y in range(size)
    )

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)  # 8-bit RGBA
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def tile_at(x, y, size):
    """Which tile (0..3) covers pixel (x, y), or None for the gaps and the rounded corners."""
    u, v = (x + 0.5) / size, (y + 0.5) / size
    pad, gap = 0.08, 0.08
    cell = (1 - 2 * pad - gap) / 2
    for i, (cx, cy) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
        x0, y0 = pad + cx * (cell + gap), pad + cy * (cell + gap)
        if x0 <= u <= x0 + cell and y0 <= v <= y0 + cell:
            r = cell * 0.22  # corner radius
            dx = max(x0 + r - u, 0, u - (x0 + cell - r))
            dy = max(y0 + r - v, 0, v - (y0 + cell - r))
            return i if dx * dx + dy * dy <= r * r else None
    return None


def colour(x, y, size):
    t = tile_at(x, y, size)
    if t is None:
        return (0, 0, 0, 0)
    return (255, 153, 51, 255) if t == 3 else (52, 120, 246, 255)


def template(x, y, size):
    t = tile_at(x, y, size)
    if t is None:
        return (0, 0, 0, 0)
    return (0, 0, 0, 255) if t == 3 else (0, 0, 0, 150)


if __name__ == "__main__":
    for s in (32, 128, 256):
        png(f"{s}x{s}.png", s, colour)
    png("icon.png", 512, colour)
    png("tray.png", 64, colour)
    png("tray-template.png", 44, template)
