"""Load time and bytes read of the DiT with --weights int8, from the released bf16 layout (quantized while
loading) and from a convert.py --quantize int8 folder, beside --weights full; also one rank's share with
--shard_weights over 4 ranks. One process, interleaved rounds (the page cache is warm after round 1).

    .venv/bin/python bench/bench_int8_load.py [--layers 8] [--heads 16] [--head_dim 64] [--rounds 3]

The model is random, written as bf16 safetensors in the released layout (2 shards + index). Bytes
read are counted at the safetensors reader: the bytes of every tensor (or range) the loader asked for.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_bf16_folder(folder: str, config: dict, seed: int = 0) -> None:
    """A random bf16 transformer folder: config.json, 2 shards, the index (raw safetensors writing)."""
    from stepvideo_ms.models.dit import StepVideoModel
    from stepvideo_ms.models.int8_folder import _header
    from stepvideo_ms.formats.safetensors_io import f32_to_bf16_bits
    from mindspore.nn.utils import no_init_parameters

    with no_init_parameters():
        model = StepVideoModel.from_config(config)
    shapes = {n: tuple(int(s) for s in p.shape) for n, p in model.parameters_and_names()}
    names = sorted(shapes)
    halves = (names[:len(names) // 2], names[len(names) // 2:])
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    weight_map = {}
    for i, keys in enumerate(halves):
        shard = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        entries = [(k, "BF16", shapes[k], None) for k in keys]
        head, _ = _header(entries, {"format": "pt"})
        with open(os.path.join(folder, shard), "wb") as fh:
            fh.write(head)
            for k in keys:
                fan_in = shapes[k][1] if len(shapes[k]) > 1 else 1
                w = rng.standard_normal(shapes[k]).astype(np.float32) / np.sqrt(fan_in)
                fh.write(f32_to_bf16_bits(w).tobytes())
        weight_map.update({k: shard for k in keys})
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh)


class ByteCounter:
    """Counts the bytes the loaders ask the safetensors reader for."""

    def __init__(self):
        from stepvideo_ms.formats import safetensors_io as st

        self.st, self.count = st, 0
        self._get, self._range = st.SafetensorsFile.get, st.SafetensorsFile.get_range
        counter = self

        def get(f, name, upcast_bf16=True):
            b, e = f._entries[name]["data_offsets"]
            counter.count += e - b
            return counter._get(f, name, upcast_bf16)

        def get_range(f, name, start, stop):
            counter.count += (stop - start) * np.dtype(st._DTYPES[f._entries[name]["dtype"]]).itemsize
            return counter._range(f, name, start, stop)

        st.SafetensorsFile.get, st.SafetensorsFile.get_range = get, get_range


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    from stepvideo_ms import runtime
    runtime.init("CPU")
    import mindspore as ms
    from stepvideo_ms.models.dit import StepVideoModel
    from stepvideo_ms.models.int8_folder import quantize_folder
    from stepvideo_ms.parallel import Mesh
    from stepvideo_ms.parallel.shard import load_sharded_stage

    config = {"num_attention_heads": a.heads, "attention_head_dim": a.head_dim, "num_layers": a.layers,
              "in_channels": 16, "out_channels": 16, "caption_channels": [256, 128]}
    with tempfile.TemporaryDirectory() as tmp:
        bf16_dir, int8_dir = os.path.join(tmp, "transformer"), os.path.join(tmp, "transformer_int8")
        write_bf16_folder(bf16_dir, config)
        t0 = time.perf_counter()
        report = quantize_folder(bf16_dir, int8_dir, progress=False)
        convert_s = time.perf_counter() - t0
        counter = ByteCounter()

        def held(model):
            return sum(int(np.prod(q.shape)) * (1 if q.dtype == ms.int8 else 4) for _, q in model.parameters_and_names()
                       if not q.has_init)

        def whole(folder, weights):
            return [lambda: StepVideoModel.from_pretrained(folder, progress=False, weights=weights)]

        def shares(folder, weights):  # the 4 ranks' loads of ulysses 4 --shard_weights, one after the other
            return [lambda r=r: load_sharded_stage(folder, Mesh.create(4, r, 4, 1, shard_weights=True), ms.float32,
                                                   False, weights) for r in range(4)]

        runs = {"full, released bf16": whole(bf16_dir, "full"), "int8, released bf16": whole(bf16_dir, "int8"),
                "int8, converted int8": whole(int8_dir, None), "shard 4 ranks, full, bf16": shares(bf16_dir, "full"),
                "shard 4 ranks, int8, bf16": shares(bf16_dir, "int8"),
                "shard 4 ranks, int8, int8": shares(int8_dir, None)}
        times = {k: [] for k in runs}
        read, memory = {}, {}
        for _ in range(a.rounds):
            for name, parts in runs.items():
                reads, held_bytes, elapsed = [], [], 0.0
                for part in parts:  # one model, or each rank's share
                    counter.count = 0
                    t0 = time.perf_counter()
                    out = part()
                    elapsed += time.perf_counter() - t0
                    reads.append(counter.count)
                    held_bytes.append(held(out[0]) + out[1].nbytes() if isinstance(out, tuple) else held(out))
                    del out
                times[name].append(elapsed)
                read[name], memory[name] = reads, held_bytes
        params = sum(int(np.prod(q.shape)) for _, q in StepVideoModel.from_pretrained(
            int8_dir, progress=False).parameters_and_names() if not q.name.endswith("_scale"))
        print(f"load average {os.getloadavg()[0]:.1f}; DiT {a.layers} blocks x {a.heads} heads x {a.head_dim} "
              f"({params / 1e6:.0f} M parameters); released bf16 folder {folder_bytes(bf16_dir) / 2**20:.0f} MiB, "
              f"int8 folder {folder_bytes(int8_dir) / 2**20:.0f} MiB (convert.py --quantize int8: {convert_s:.1f} s, "
              f"{report.quantized} weights); median of rounds 2..{a.rounds} (CPU policy: full = float32 in memory)")
        base = np.median(times["full, released bf16"][1:] or times["full, released bf16"])
        print("  (shard rows: the 4 ranks' loads in turn; read and held per rank, min-max)")
        for name in runs:
            t = np.median(times[name][1:] or times[name])
            r, m = np.array(read[name]) / 2**20, np.array(memory[name]) / 2**20
            span = (lambda v: f"{v.min():6.1f}" + (f"-{v.max():.1f}" if len(v) > 1 else "      "))
            print(f"  {name:26s} load {t:6.2f} s (x{t / base:.2f})  read {span(r)} MiB  held {span(m)} MiB")


if __name__ == "__main__":
    main()
