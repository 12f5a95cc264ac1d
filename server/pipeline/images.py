"""Image encoding for the response: PNG data URLs."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

# zlib level 1: several times faster than PIL's default 6 on large images, still lossless.
PNG_COMPRESS_LEVEL = 1


def png_data_url(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
