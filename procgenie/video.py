"""Video helpers shared by eval's report, `dream` and `play`: crisp upscaling and GIF/MP4 encoding."""

from __future__ import annotations

import numpy as np

from procgenie.errors import UserError


def upscale(frames: np.ndarray, k: int) -> np.ndarray:
    """Nearest-neighbour upscale of uint8 (..., S, S, 3) -> (..., S*k, S*k, 3): crisp pixels, as the game shows them."""
    return frames.repeat(k, axis=-3).repeat(k, axis=-2)


def encode_video(frames: np.ndarray, suffix: str, fps: float) -> bytes:
    """uint8 (T, H, W, 3) -> the bytes of a looping GIF or an H.264 MP4 (H, W even)."""
    import imageio.v3 as iio

    if suffix == ".gif":
        # GIF durations are in hundredths of a second: round to what the format can say.
        return iio.imwrite("<bytes>", frames, extension=".gif", duration=round(100 / fps) * 10, loop=0)
    try:
        import av  # noqa: F401  (PyAV: ffmpeg's libraries, shipped inside its wheel)
    except ImportError:
        raise UserError("writing MP4 needs PyAV and its ffmpeg libraries: `pip install av`, or write a .gif") from None
    try:
        return iio.imwrite(
            "<bytes>",
            frames,
            extension=".mp4",
            plugin="pyav",
            codec="libx264",
            fps=int(round(fps)),
            out_pixel_format="yuv420p",
        )  # yuv420p: what browsers and players decode
    except Exception as e:  # a PyAV build without an H.264 encoder
        raise UserError(f"could not encode MP4 with ffmpeg ({e}); write a .gif instead") from None
