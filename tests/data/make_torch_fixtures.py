"""Regenerate the torch-written fixtures in this folder (needs torch; the tests do not).

    python -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 "numpy<2"
    /tmp/torchvenv/bin/python tests/data/make_torch_fixtures.py

Writes, with a fixed seed:
- torch_views_zip.bin / torch_views_legacy.bin: the same state dict in the zip and the legacy
  format: tensors sharing one storage (a transpose, a strided slice, a row, a stride-0 expand),
  every converted dtype (bfloat16 too, also transposed), a 0-d and an empty tensor, a Parameter,
  and the OrderedDict `_metadata` attribute that model.state_dict() carries;
- torch_views_expected.npz: what each tensor must read as (contiguous; bfloat16 as uint16 bits);
- torch_uint16.bin: a uint16 tensor (saved through _rebuild_tensor_v3), a dtype we refuse;
- torch_nested.bin: {"state_dict": {...}, "epoch": 3}, the trainer layout convert.py unwraps.
"""
import os
from collections import OrderedDict

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16).copy()
    return t.numpy().copy()


def main():
    torch.manual_seed(0)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    bf = torch.randn(3, 5).to(torch.bfloat16)
    sd = OrderedDict()
    sd["base"] = base
    sd["base_t"] = base.t()
    sd["strided"] = base[1:3, ::2]
    sd["row"] = base[2]
    sd["expanded"] = base[0:1].expand(3, 6)
    sd["bf16"] = bf
    sd["bf16_t"] = bf.t()
    sd["f16"] = torch.randn(2, 3).half()
    sd["f64"] = torch.randn(3, dtype=torch.float64)
    sd["i8"] = torch.tensor([-128, 0, 127], dtype=torch.int8)
    sd["i16"] = torch.tensor([-32768, 7, 32767], dtype=torch.int16)
    sd["i32"] = torch.tensor([[-(2**31), 5], [2**31 - 1, 0]], dtype=torch.int32)
    sd["i64"] = torch.tensor([-(2**62), 2**62 + 3], dtype=torch.int64)
    sd["u8"] = torch.arange(250, 256, dtype=torch.uint8)
    sd["flags"] = torch.tensor([True, False, True])
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.zeros(0, 3)
    sd["param"] = torch.nn.Parameter(torch.linspace(-1, 1, 4))
    sd._metadata = OrderedDict({"": {"version": 1}})
    torch.save(sd, os.path.join(HERE, "torch_views_zip.bin"))
    torch.save(sd, os.path.join(HERE, "torch_views_legacy.bin"), _use_new_zipfile_serialization=False)
    np.savez(os.path.join(HERE, "torch_views_expected.npz"), **{k: as_numpy(v) for k, v in sd.items()})
    u16 = torch.tensor([1, 2, 65535], dtype=torch.int32).to(torch.uint16)
    torch.save({"ok": torch.ones(2), "u16": u16}, os.path.join(HERE, "torch_uint16.bin"))
    torch.save({"state_dict": {"w": torch.ones(2, 2), "b": torch.zeros(2)}, "epoch": 3},
               os.path.join(HERE, "torch_nested.bin"))


if __name__ == "__main__":
    main()
