"""The memory and traffic planner (parallel/plan.py, describe --plan): its arithmetic against the
released configuration's parameter count and hand-computed figures, its layouts against the mesh's
rules, its predictions against measured peak RSS of CPU runs and the two published points."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from stepvideo_ms.tools import describe
from stepvideo_ms.parallel import Mesh
from stepvideo_ms.parallel import plan as planner

RELEASED = planner.ModelShape.from_config({})
GRID_204F = (36, 34, 62)  # 204 frames 544x992 -> latents
GB = 1e9


def test_released_parameter_counts():
    assert RELEASED.total_params == 29_342_478_400  # describe's count of the released config
    assert RELEASED.block_params == 604_041_728 and RELEASED.num_layers == 48
    assert RELEASED.width == 6144
    assert describe.latent_grid(204, 544, 992) == GRID_204F


def test_weights_traffic_and_idle_by_hand():
    block, other, n = RELEASED.block_params, RELEASED.other_params, 75_888
    full = planner.plan(RELEASED, planner.Layout(1, 4, 1, False), GRID_204F)
    assert full.memory["weights"] == (48 * block + other) * 2
    assert full.memory["gather buffers"] == 0
    assert full.sent_bytes["all-to-all"] == 48 * 3 * 4 * 2 * (n // 4) * (6144 // 4) * 2  # (u-1) x qkv+out, batch 2
    shard = planner.plan(RELEASED, planner.Layout(1, 4, 1, True), GRID_204F)
    assert shard.memory["weights"] == 48 * (block // 4) * 2 + other * 2  # 1/4 of every block
    assert shard.memory["gather buffers"] == 3 * block * 2
    assert shard.sent_bytes["weight gathers"] == 48 * 3 * (block // 4) * 2
    assert shard.sent_bytes["all-to-all"] == full.sent_bytes["all-to-all"]
    assert shard.flops_per_card == full.flops_per_card
    pipe = planner.plan(RELEASED, planner.Layout(1, 2, 2, False), GRID_204F)
    assert pipe.idle_share == pytest.approx(1 / 3)  # 2 micro-batches through 2 stages: 3 ticks
    assert pipe.memory["weights"] == (24 * block + other) * 2
    assert pipe.sent_bytes["stage transfers"] == 2 * (n // 2) * 6144 * 2
    cfg = planner.plan(RELEASED, planner.Layout(2, 1, 2, False), GRID_204F)
    assert cfg.idle_share == pytest.approx(1 / 2)  # one sample per replica
    assert cfg.sent_bytes["all-to-all"] == 0
    # FLOPs: 2 x 14 D^2 of matmuls + 4 N D of attention + 4 Lk D of cross-attention per token and layer
    per = 28 * 6144 ** 2 + 4 * n * 6144 + 4 * planner.TEXT_TOKENS * 6144
    assert full.flops_per_card == pytest.approx(2 * n * 48 * per / 4)


def test_published_points_within_ten_percent():
    mindone = planner.plan(RELEASED, planner.Layout(1, 2, 2, False), GRID_204F)  # 45.83 GB per card
    upstream = planner.plan(RELEASED, planner.Layout(1, 4, 1, False), GRID_204F)  # 77.64 GB per card
    assert abs(mindone.peak_gib / 45.83 - 1) < 0.10, mindone.peak_gib
    assert abs(upstream.peak_gib / 77.64 - 1) < 0.10, upstream.peak_gib
    assert mindone.step_s == pytest.approx(3847 / 50, rel=0.10)  # the utilisation is calibrated on it


@pytest.mark.parametrize("cards", [1, 2, 4, 8])
def test_every_listed_layout_is_valid_for_the_mesh(cards):
    found = planner.layouts(cards, RELEASED.heads, RELEASED.num_layers)
    for layout in found:
        mesh = Mesh.create(cards, 0, layout.ulysses, layout.pp, cfg_degree=layout.cfg, shard_weights=layout.shard)
        mesh.check_model(RELEASED.heads, RELEASED.num_layers)
    names = {(lay.cfg, lay.ulysses, lay.pp, lay.shard) for lay in found}
    if cards == 4:
        assert {(1, 4, 1, True), (2, 2, 1, False), (1, 2, 2, False), (1, 1, 4, False)} <= names
        assert (1, 1, 4, True) not in names  # nothing to shard across
    assert all(lay.cfg == 1 for lay in planner.layouts(cards, 48, 48, guidance=False))


def test_describe_plan_lists_fitting_layouts(capsys):
    assert describe.main(["--plan", "--cards", "4", "--card_gb", "40"]) == 0
    out = capsys.readouterr().out
    assert "75,888 tokens" in out and "ulysses 4 x pp 1 + shard" in out
    assert "ulysses 4 x pp 1 " not in out.replace("ulysses 4 x pp 1 + shard", "")  # 72 GiB: does not fit
    assert "ulysses 2 x pp 2 " not in out.replace("ulysses 2 x pp 2 + shard", "")  # 47 GiB
    assert "assumed:" in out and "910B" in out
    with pytest.raises(SystemExit):
        describe.main(["--plan"])
    assert "--cards" in capsys.readouterr().err


PROBES = [  # (layers, heads, head_dim, latent grid): the default one is not the size the CPU activation
    (3, 16, 64, (3, 16, 32)),  # units were set on (that is the slow one)
    pytest.param(2, 12, 64, (4, 16, 32), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("layers,heads,head_dim,grid", PROBES)
def test_plan_matches_measured_cpu_rss(layers, heads, head_dim, grid):
    config = {"num_attention_heads": heads, "attention_head_dim": head_dim, "num_layers": layers, "in_channels": 8,
              "out_channels": 8, "caption_channels": [64, 32]}
    # a fixed mmap threshold: glibc's dynamic one would keep the freed numpy temporaries of the random
    # weights in the heap and count them as weights
    env = {**os.environ, "GLOG_v": "3", "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run([sys.executable, os.path.join(REPO, "tests", "rss_probe.py"), json.dumps(config),
                          *map(str, grid)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    predicted = planner.plan(planner.ModelShape.from_config(config), planner.Layout(1, 1, 1, False), grid,
                             hardware=planner.CPU, text_tokens=6 + 3)
    assert measured["weights"] == pytest.approx(predicted.memory["weights"], rel=0.05)
    assert measured["peak"] == pytest.approx(predicted.peak_bytes, rel=0.25), (measured, predicted.memory)


@pytest.mark.parametrize("cards,card_gb,expect", [
    # 4 x 32 GiB: the shard layouts are among those refused; 6 cards or 153 frames would fit
    (4, 32, ["0 of 9 layouts fit", "closest: cfg 2 x ulysses 2 x pp 1 + shard", "2.4 GiB over 32",
             "fewest cards of 32 GiB for 204 frames 544x992: 6 ", "--cards 6 --card_gb 32",
             "largest video on 4 cards of 32 GiB: 153 frames 544x992"]),
    # 1 x 64 GiB: sharding is impossible on one card; 17 frames fit it
    (1, 64, ["1 card of 64 GiB", "none of the 1 layouts of 1 card fits", "47.5 GiB over 64",
             "largest video on 1 card of 64 GiB: 17 frames 544x992", "fewest cards of 64 GiB for 204 frames 544x992: 2 "]),
    # 1 x 32 GiB: no size fits, the weights alone are larger
    (1, 32, ["no video fits 1 card of 32 GiB: the weights and the runtime reserve alone need 57.7 GiB"]),
])
def test_describe_plan_says_what_would_fit_and_exits_1(capsys, cards, card_gb, expect):
    assert describe.main(["--plan", "--cards", str(cards), "--card_gb", str(card_gb)]) == 1
    out = capsys.readouterr().out
    for part in expect:
        assert part in out, out
    assert "1 cards" not in out and "--all lists them" in out


def test_the_advice_is_the_planner_s_own_answer():
    """What the advice names does fit, and one less does not."""
    assert describe.main(["--plan", "--cards", "6", "--card_gb", "32"]) == 0
    assert describe.main(["--plan", "--cards", "5", "--card_gb", "32"]) == 1
    assert describe.main(["--plan", "--cards", "4", "--card_gb", "32", "--frames", "153"]) == 0
    assert describe.main(["--plan", "--cards", "4", "--card_gb", "32", "--frames", "170"]) == 1
    assert describe.main(["--plan", "--cards", "1", "--card_gb", "64", "--frames", "17"]) == 0
