"""Convert an official PyTorch DVT checkpoint (.pth.tar) to a MindSpore checkpoint and a metadata JSON.

usage: python scripts/convert_pytorch.py --src FILE.pth.tar --arch dvt_t2t_vit_12 --dst OUT.ckpt
Needs torch (pip install -r requirements-convert.txt). num_classes is read from the head's shape.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.convert import ConversionError, convert_checkpoint  # noqa: E402
from src.metadata import meta_path  # noqa: E402
from src.models import list_models  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="official checkpoint, e.g. DVT_T2t_vit_12.pth.tar")
    parser.add_argument("--arch", required=True, choices=list_models(), metavar="NAME",
                        help="registered model name: " + ", ".join(list_models()))
    parser.add_argument("--dst", required=True, help="output MindSpore checkpoint (.ckpt)")
    args = parser.parse_args(argv)
    try:
        info = convert_checkpoint(args.src, args.arch, args.dst)
    except (ConversionError, OSError, ImportError) as err:  # OSError: src.atomic.WriteFailed, an unwritable folder
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst} ({info['model']}, {info['num_classes']} classes) and {meta_path(args.dst)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
