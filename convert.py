"""Convert PyTorch .bin checkpoints to safetensors, without torch and without running the file.

    python convert.py --pt_filename ckpts/hunyuan_clip/clip_text_encoder/pytorch_model.bin \
        --sf_filename ckpts/hunyuan_clip/clip_text_encoder/model.safetensors \
        --config_path ckpts/hunyuan_clip/clip_text_encoder/config.json

    python convert.py --pt_dir some_model/            # every .bin there (sharded or not)

    python convert.py --quantize int8 --model_dir ckpts/stepvideo-t2v   # -> ckpts/stepvideo-t2v/transformer_int8
"""
from __future__ import annotations

import argparse
import sys

from stepvideo_ms.formats.bin_convert import ConvertError, convert_dir, convert_file
from stepvideo_ms.formats.torch_bin import TorchBinError

EPILOG = """\
int8 DiT:     --quantize int8 --model_dir M [--transformer_dir transformer] [--out DIR]
  Writes the transformer folder with the blocks' linear weights in int8 and one bfloat16 scale
  per output channel beside each (X.weight int8, X.weight_scale), the other tensors copied, in
  the released layout (the same shards and index; config.json records the quantization), to
  M/transformer_int8 by default; run with run_parallel.py --transformer_dir transformer_int8.
single file:  --pt_filename F.bin [--sf_filename F.safetensors] [--config_path config.json]
directory:    --pt_dir DIR [--sf_dir OUT] [--config_path config.json]
  In directory mode a sharded checkpoint (pytorch_model.bin.index.json with
  pytorch_model-0000x-of-0000N.bin) becomes model-0000x-of-0000N.safetensors and
  model.safetensors.index.json; without an index every .bin is converted
  (pytorch_model.bin -> model.safetensors). DIR/config.json is copied to OUT.

The .bin may be the zip format of torch>=1.6 or the legacy format. Its pickle is read
with an allow-list: a file that names anything but tensor-rebuilding globals (for
instance os.system) is refused and nothing in it runs. Every tensor name is kept,
tied or shared ones included; bfloat16 stays bfloat16. The output is written to a
temporary file, re-read and checked (names, shapes, dtypes, CRC-32 of the bytes), then
renamed into place; on any error no output is left behind. Missing output folders are
created. Existing outputs are kept unless --overwrite is given.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert a PyTorch .bin checkpoint to safetensors (no torch needed; nothing in the file is run).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pt_filename", default="",
                        help="the PyTorch file to convert, e.g. pytorch_model.bin")
    parser.add_argument("--sf_filename", default="",
                        help="the safetensors file to write (default: beside the .bin, pytorch_model.bin -> "
                             "model.safetensors, X.bin -> X.safetensors)")
    parser.add_argument("--config_path", default="",
                        help="the model's config.json, copied beside the output as config.json when not already "
                             "there (in directory mode, DIR/config.json is used when this is not given)")
    parser.add_argument("--pt_dir", default="",
                        help="directory mode: a folder of .bin files, sharded (with *.bin.index.json) or not")
    parser.add_argument("--sf_dir", default="",
                        help="directory mode: where to write the safetensors files (default: --pt_dir)")
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="int8: write the DiT transformer folder of --model_dir with int8 block weights")
    parser.add_argument("--model_dir", default="", help="--quantize: the downloaded model directory")
    parser.add_argument("--transformer_dir", default="transformer", help="--quantize: the DiT's sub-folder (transformer)")
    parser.add_argument("--out", default="", help="--quantize: the folder to write (default: MODEL_DIR/transformer_int8)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quantize or args.model_dir or args.out:
        return quantize(parser, args)
    if bool(args.pt_filename) == bool(args.pt_dir):
        parser.error("give either --pt_filename (one .bin file) or --pt_dir (a folder of .bin files)")
    if args.pt_dir and args.sf_filename:
        parser.error("--sf_filename goes with --pt_filename; with --pt_dir use --sf_dir")
    if args.pt_filename and args.sf_dir:
        parser.error("--sf_dir goes with --pt_dir; with --pt_filename use --sf_filename")
    try:
        if args.pt_filename:
            report = convert_file(args.pt_filename, args.sf_filename or None, args.config_path or None,
                                  overwrite=args.overwrite, progress=not args.no_progress)
        else:
            report = convert_dir(args.pt_dir, args.sf_dir or None, args.config_path or None,
                                 overwrite=args.overwrite, progress=not args.no_progress)
    except ConvertError as exc:
        parser.error(str(exc))
    except (TorchBinError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    print(f"Conversion successful! {report.tensors} tensors, {report.nbytes / 2**20:.1f} MiB, "
          f"written and verified in {report.seconds:.1f} s:")
    for path in report.outputs:
        print(f"  {path}")
    return 0


def quantize(parser, args) -> int:
    import os

    if not args.quantize or not args.model_dir:
        parser.error("give --quantize int8 together with --model_dir M (and optionally --out DIR)")
    if args.pt_filename or args.pt_dir or args.sf_filename or args.sf_dir or args.config_path:
        parser.error("--quantize takes --model_dir [--out]; the .bin arguments are a separate conversion")
    if not os.path.isdir(args.model_dir):
        parser.error(f"--model_dir {args.model_dir}: no such directory")
    from stepvideo_ms.formats.checkpoint import CheckpointError
    from stepvideo_ms.models.int8_folder import QuantizeError, quantize_folder

    src = os.path.join(args.model_dir, args.transformer_dir)
    out = args.out or os.path.join(args.model_dir, "transformer_int8")
    try:
        report = quantize_folder(src, out, overwrite=args.overwrite, progress=not args.no_progress)
    except (QuantizeError, CheckpointError) as exc:
        parser.error(str(exc))
    except OSError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    print(f"Quantization successful! {report.quantized} weights to int8 (+ scales), {report.copied} tensors copied; "
          f"{report.bytes_in / 2**20:.1f} MiB -> {report.bytes_out / 2**20:.1f} MiB, written and verified in "
          f"{report.seconds:.1f} s: {out}\n  run with --transformer_dir {os.path.relpath(out, args.model_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
