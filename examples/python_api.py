"""The README's Python example, runnable: embed a folder, read it back, run the model directly.

    python examples/python_api.py [MODEL] [OUT]

MODEL defaults to `small` (downloaded once into the Hugging Face cache); the tests run this
script with a tiny local checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import dinoreg

IMAGES = Path(__file__).resolve().parent / "images"


def main(model: str = "small", out: str = "feats.h5") -> None:
    summary = dinoreg.embed(str(IMAGES), out, model=model, batch_size=32, overwrite=True)
    print(f"{summary.rows} rows in {out}")
    with dinoreg.read(out) as rows:  # streams rows from either format; closes its files
        for row in rows:
            print(row.path, row.cls.shape, row.registers.shape, row.patches.shape)
    net = dinoreg.load_model(model)  # eval mode, ready for inference
    pixels = dinoreg.preprocess_image(IMAGES / "chelsea.jpg")  # (1, 3, 224, 224)
    tokens = net.forward_features(pixels)  # TokenOutput(cls, registers, patches)
    print("cls", tuple(tokens.cls.shape), "patches", tuple(tokens.patches.shape))


if __name__ == "__main__":
    main(*sys.argv[1:3])
