"""The same as search_session.sh, from Python: embed a folder, nearest rows, near-duplicates.

python examples/search_dedup.py [MODEL] [OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import dinoreg

IMAGES = Path(__file__).resolve().parent / "images"


def main(model: str = "small", out: str = "feats.h5") -> None:
    dinoreg.embed(str(IMAGES), out, model=model, tokens="cls", overwrite=True)
    (result,) = dinoreg.search(out, [0], k=3)  # row 0 of the file: itself first, score 1.0
    for rank, hit in enumerate(result.hits, start=1):
        print(f"row 0\t{rank}\t{hit.path}\t{hit.score:.4f}")
    for number, group in enumerate(dinoreg.dedup(out, threshold=0.95), start=1):
        for member in group.members:
            print(f"{number}\t{member.path}\t{member.score:.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
