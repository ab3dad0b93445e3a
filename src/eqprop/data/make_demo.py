"""Regenerate the shipped mnist-demo subset from the real MNIST files.

Usage: ``python -m eqprop.data.make_demo --data-dir DIR [--output FILE]``,
where ``DIR`` holds ``mnist/``. The output defaults to the package's own
``mnist_demo.npz``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from eqprop.data.demo import DEMO_FILE, DEMO_SIZES, demo_keys
from eqprop.data.errors import DataError
from eqprop.data.mnist import load_mnist
from eqprop.data.paths import resolve_data_root


def build_demo(data_root: Path, output: Path) -> None:
    """Write the first images and labels of each real MNIST split to ``output`` (compressed npz)."""
    arrays = {}
    for split, count in DEMO_SIZES.items():
        data = load_mnist(data_root, split)
        images_key, labels_key = demo_keys(split)
        arrays[images_key] = data.x[:count, 0].numpy()
        arrays[labels_key] = data.y[:count].numpy().astype(np.uint8)
    np.savez_compressed(output, **arrays)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", help="data root holding mnist/ (default: $EQPROP_DATA or the user cache)"
    )
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).with_name(DEMO_FILE), help="npz file to write"
    )
    args = parser.parse_args(argv)
    try:
        build_demo(resolve_data_root(args.data_dir), args.output)
    except DataError as error:
        parser.exit(1, f"error: {error}\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
