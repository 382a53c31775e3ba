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
from stepvideo_ms.parallel import plan_advice

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
    listed = {line[:47].strip() for line in out.splitlines()}
    assert "ulysses 4 x pp 1" not in listed  # 72 GiB: does not fit
    assert "ulysses 2 x pp 2" not in listed  # 47 GiB
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


def test_int8_weights_by_hand_and_on_four_32_gib_cards():
    d = 6144
    assert RELEASED.block_int8_params == 16 * d * d  # wqkv 3, wo 1, wq 1, wkv 2, wo 1, ff 4 + 4 (x D^2)
    assert RELEASED.block_scales == 13 * d  # one per output channel of those weights
    block_bytes = 16 * d * d + (RELEASED.block_params - 16 * d * d + 13 * d) * 2
    assert RELEASED.block_bytes("int8", 2) == block_bytes
    full = planner.plan(RELEASED, planner.Layout(1, 4, 1, False, weights="int8"), GRID_204F)
    assert full.memory["weights"] == 48 * block_bytes + RELEASED.other_params * 2
    assert 27.5 < full.memory["weights"] / 2 ** 30 < 28.0  # from 54.7 GiB in bf16
    assert full.memory["dequantized weight"] == 0  # the W8A16 kernel takes the int8 weight
    shard = planner.plan(RELEASED, planner.Layout(1, 4, 1, True, weights="int8"), GRID_204F)
    bf16 = planner.plan(RELEASED, planner.Layout(1, 4, 1, True), GRID_204F)
    assert shard.sent_bytes["weight gathers"] == 48 * 3 * -(-block_bytes // 4)
    assert 0.49 < shard.sent_bytes["weight gathers"] / bf16.sent_bytes["weight gathers"] < 0.52
    fits = [p.layout for p in (planner.plan(RELEASED, lay, GRID_204F)
                               for lay in planner.layouts(4, 48, 48, weights="int8")) if p.fits(32)]
    assert fits and all((lay.shard or lay.offload) and lay.weights == "int8" for lay in fits)
    assert any(lay.offload for lay in fits)  # int8 blocks are streamed too (issue 26)
    assert not [lay for lay in planner.layouts(4, 48, 48, offload=False) if planner.plan(RELEASED, lay, GRID_204F).fits(32)]
    cpu = planner.plan(RELEASED, planner.Layout(1, 1, 1, False, weights="int8"), GRID_204F, hardware=planner.CPU)
    assert cpu.memory["dequantized weight"] == 4 * d * d * 4  # one float32 copy of the largest weight
    assert "--weights int8" in full.layout.arguments()


def test_int8_offload_by_hand_halves_host_memory_and_link_traffic():
    d = 6144
    block_bytes = RELEASED.block_bytes("int8", 2)
    one = planner.Layout(1, 1, 1, False, offload=True, seq_cfg=True)
    bf16 = planner.plan(RELEASED, one, GRID_204F)
    int8 = planner.plan(RELEASED, planner.Layout(1, 1, 1, False, True, True, weights="int8"), GRID_204F)
    assert int8.host_bytes == 48 * block_bytes and 27.0 < int8.host_gib < 27.6  # from 54.0 GiB in bf16
    assert 0.49 < int8.host_bytes / bf16.host_bytes < 0.52
    assert int8.host_copy_bytes == 48 * 2 * block_bytes  # every block copied once per micro-batch (seq CFG: 2)
    assert int8.memory["weights"] == 2 * block_bytes + RELEASED.other_params * 2  # two int8 working blocks
    assert bf16.memory["weights"] - int8.memory["weights"] == 2 * (RELEASED.block_params * 2 - block_bytes)
    assert int8.offload_s <= bf16.offload_s and int8.step_s <= bf16.step_s
    # one 32 GB card: the planner offers the int8 offload layouts and picks one
    plans = plan_advice.plans_for(RELEASED, 1, GRID_204F, weights="int8")
    chosen = planner.choose(plans, 32)
    assert chosen is not None and chosen.layout.offload and chosen.layout.weights == "int8"
    assert "--offload" in chosen.layout.arguments() and "--weights int8" in chosen.layout.arguments()
    assert 16 * d * d < block_bytes < 17 * d * d * 1.1


@pytest.mark.parametrize("cards,card_gb,expect", [
    # 2 x 16 GiB: even offload with sequential CFG and chunks misses; 3 cards or 153 frames would fit
    (2, 16, ["0 of 14 layouts fit", "closest: ulysses 2 x pp 1 + offload + seq cfg + chunks", "2.9 GiB over 16",
             "fewest cards of 16 GiB for 204 frames 544x992: 3 ", "--cards 3 --card_gb 16",
             "largest video on 2 cards of 16 GiB: 153 frames 544x992"]),
    # 1 x 16 GiB: sharding is impossible on one card; 68 frames fit it
    (1, 16, ["1 card of 16 GiB", "none of the 6 layouts of 1 card fits", "14.2 GiB over 16",
             "largest video on 1 card of 16 GiB: 68 frames 544x992", "fewest cards of 16 GiB for 204 frames 544x992: 3 "]),
    # 1 x 4 GiB: no size fits, what stays on the card is larger
    (1, 4, ["no video fits 1 card of 4 GiB: the weights and the runtime reserve alone need 5.9 GiB"]),
])
def test_describe_plan_says_what_would_fit_and_exits_1(capsys, cards, card_gb, expect):
    assert describe.main(["--plan", "--cards", str(cards), "--card_gb", str(card_gb)]) == 1
    out = capsys.readouterr().out
    for part in expect:
        assert part in out, out
    assert "1 cards" not in out and "--all lists them" in out


def test_the_advice_is_the_planner_s_own_answer():
    """What the advice names does fit, and one less does not."""
    assert describe.main(["--plan", "--cards", "3", "--card_gb", "16"]) == 0
    assert describe.main(["--plan", "--cards", "2", "--card_gb", "16"]) == 1
    assert describe.main(["--plan", "--cards", "2", "--card_gb", "16", "--frames", "153"]) == 0
    assert describe.main(["--plan", "--cards", "2", "--card_gb", "16", "--frames", "170"]) == 1
    assert describe.main(["--plan", "--cards", "1", "--card_gb", "16", "--frames", "68"]) == 0
    assert describe.main(["--plan", "--cards", "1", "--card_gb", "16", "--frames", "85"]) == 1


def test_the_advice_for_int8_suggests_int8_commands(capsys):
    assert describe.main(["--plan", "--cards", "1", "--card_gb", "24", "--weights", "int8"]) == 1
    out = capsys.readouterr().out
    suggested = [line for line in out.splitlines() if "python -m stepvideo_ms describe --plan --cards" in line]
    assert suggested and all(line.rstrip().endswith("--weights int8") or "--weights int8 " in line for line in suggested)


def test_the_in_process_vae_decode_on_rank_0_is_given_a_tile_or_refused():
    """Issue 26: the decode of an in-process VAE runs on rank 0's card after the DiT, in what the stage's
    resident weights, the reserve and the in-process models leave; the planner names the tile it expects,
    or refuses the layout with the numbers (204 frames 544x992, the released VAE in bf16: 34 x 62 latents,
    untiled about 51.6 GiB, 1-position tiles about 10.4 GiB)."""
    from stepvideo_ms.models.vae_config import SPATIAL_COMPRESSION, VAEConfig
    from stepvideo_ms.models.vae_tiled import choose_tile, decode_peak_bytes

    vae = VAEConfig.from_dict({})
    rows, cols = 544 // SPATIAL_COMPRESSION, 992 // SPATIAL_COMPRESSION
    assert 51 < decode_peak_bytes(vae, rows, cols, 2) / 2 ** 30 < 52
    assert 10 < decode_peak_bytes(vae, rows, cols, 2, 1) / 2 ** 30 < 11

    def tile_for(budget):
        return choose_tile(vae, rows, cols, 2, budget)

    held = 2 ** 29  # 0.5 GiB of in-process models on rank 0's card
    one = planner.plan(RELEASED, planner.Layout(1, 1, 1, False, True, True, planner.CHUNK_TOKENS), GRID_204F)
    tile, budget = planner.expected_decode_tile(one, 32, held, tile_for)
    assert budget == 32 * 2 ** 30 - one.memory["weights"] - 3 * 2 ** 30 - held  # 25.6 GiB
    assert 25.5 < budget / 2 ** 30 < 25.7 and tile == (13, 13)
    assert decode_peak_bytes(vae, rows, cols, 2, 13) <= budget < decode_peak_bytes(vae, rows, cols, 2, 14)
    # 17 frames on ulysses 4 with int8 weights fit 32 GiB cards (peak 31.9 GiB, 27.9 of weights), but the
    # decode (same per-chunk peak for any frame count) would have 0.84 GiB: refused
    u4 = planner.plan(RELEASED, planner.Layout(1, 4, 1, False, weights="int8"), plan_advice.video_grid(17, 544, 992))
    assert u4.fits(32)
    with pytest.raises(ValueError, match=r"ulysses 4 x pp 1 \+ int8: the VAE decode on rank 0's card, with the 0\.84 "
                                         r"GiB it has left: .* 1-position tiles need about 10\.39 GiB"):
        planner.expected_decode_tile(u4, 32, held, tile_for)
    # a card filled before the decode
    with pytest.raises(ValueError, match=r"rank 0's card \(30 GiB\) is filled"):
        planner.expected_decode_tile(u4, 30, held, tile_for)
