"""Write a small LLaVA-format dataset of shape images, offline.

    python examples/make_dataset.py --out DIR --n 64 [--seed 0] [--multi-turn]

Then train with upstream's flags ``--data_path DIR/dataset.json --image_folder DIR``.
"""

import argparse

from sparsevlm_patch.tiny import make_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (images + dataset.json)")
    parser.add_argument("--n", type=int, default=64, help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--multi-turn", action="store_true",
                        help="2-3 question/answer rounds per sample instead of one")
    parser.add_argument("--size", type=int, default=336, help="image side in pixels")
    args = parser.parse_args()
    path = make_dataset(args.out, args.n, seed=args.seed, multi_turn=args.multi_turn,
                        size=args.size)
    print(path)


if __name__ == "__main__":
    main()
