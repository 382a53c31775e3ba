"""Peak resident memory of one DiT forward on the CPU backend, for tests/test_plan.py (run as a script):

    python tests/rss_probe.py CONFIG_JSON FRAMES HEIGHT WIDTH

Warms MindSpore up on a very small model, then builds the model of CONFIG_JSON with random weights
and runs one [cond, uncond] forward on latents of FRAMES x HEIGHT x WIDTH. Prints JSON: the RSS
growth once the weights are set, and the peak RSS growth (VmHWM) over the start-up baseline.
"""
import gc
import json
import sys

import numpy as np


def _status(field: str) -> int:
    with open("/proc/self/status", "r", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def main(argv) -> int:
    config_json, frames, height, width = argv[0], *map(int, argv[1:4])
    from stepvideo_ms import runtime

    runtime.init("CPU")
    from mindspore import Tensor
    from mindspore.nn.utils import no_init_parameters
    from stepvideo_ms.models.dit import StepVideoModel

    config = json.loads(config_json)
    text, clip = config["caption_channels"]
    channels = config["in_channels"]

    def forward(model, grid):
        rng = np.random.default_rng(0)
        f, h, w = grid
        return model(Tensor(rng.standard_normal((2, f, channels, h, w)).astype(np.float32)),
                     Tensor(np.array([500.0, 500.0], np.float32)),
                     Tensor(rng.standard_normal((2, 6, text)).astype(np.float32)), Tensor(np.ones((2, 6), np.int64)),
                     Tensor(rng.standard_normal((2, 3, clip)).astype(np.float32))).asnumpy()

    forward(StepVideoModel.from_config(dict(config, num_layers=1, num_attention_heads=1)), (1, 2, 2))  # kernels
    gc.collect()
    base = _status("VmRSS")
    with no_init_parameters():  # as checkpoint.build_and_load: no buffer before the real values
        model = StepVideoModel.from_config(config)
    rng = np.random.default_rng(1)
    for _, param in model.parameters_and_names():  # written values: zero pages would not count
        param.set_data(Tensor((0.02 * rng.standard_normal(tuple(param.shape))).astype(np.float32)))
    gc.collect()
    weights = _status("VmRSS") - base
    forward(model, (frames, height, width))
    print(json.dumps({"weights": weights, "peak": _status("VmHWM") - base}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
