"""The offload planner counts host memory PER HOST (parallel/host_memory.py, plan.plan(ranks_per_host)):
where the host blocks are not pinned (CPU; Ascend without Tensor.pin_memory) the ranks of a host that run
the same stage share one copy, where they are pinned every rank keeps its own; msrun numbers ranks host by
host. By-hand arithmetic on a small model, describe --cards_per_host, $STEPVIDEO_RANKS_PER_HOST and the
run's refusal."""
import re

import pytest

from stepvideo_ms.capabilities import asynchronous_offload
from stepvideo_ms.diffusion.settings import GenerationSettings
from stepvideo_ms.generation.checks import check_fits
from stepvideo_ms.parallel import Mesh
from stepvideo_ms.parallel import plan as planner
from stepvideo_ms.parallel.host_memory import (HOST_SHARE, RANKS_PER_HOST_ENV, host_blocks_shared, physical_memory_gib,
                                               ranks_on_this_host)
from stepvideo_ms.tools import describe

SMALL = planner.ModelShape(num_layers=8, heads=4, head_dim=8, block_params=1000, other_params=0)
BLOCK = 1000 * 2  # bf16 bytes of one block
GRID = (1, 2, 2)
PINNED = planner.Hardware()  # the 910B profile: every rank its own pinned copy
SHARED = planner.Hardware(host_blocks_shared=True)


def host_blocks(layout, hardware, ranks_per_host=None, model=SMALL):
    p = planner.plan(model, layout, GRID, hardware=hardware, ranks_per_host=ranks_per_host)
    assert p.host_bytes == -(-model.num_layers // layout.pp) * BLOCK  # per rank: the largest stage, unchanged
    assert p.host_gib == p.host_total_bytes / planner.GIB
    return p.host_total_bytes // BLOCK


def test_cfg2_ulysses2_on_one_host_of_four():
    # every rank runs the whole model (one stage): shared, the host holds it once; pinned, four times
    layout = planner.Layout(2, 2, 1, False, offload=True)
    assert host_blocks(layout, SHARED) == 8
    assert host_blocks(layout, PINNED) == 4 * 8
    assert host_blocks(layout, SHARED, 4) == 8 and host_blocks(layout, PINNED, 4) == 32  # None = the whole world


def test_ulysses2_pp2_on_one_host_and_on_two():
    layout = planner.Layout(1, 2, 2, False, offload=True)  # ranks 0,1: stage 0 (layers 0-3); ranks 2,3: stage 1
    assert host_blocks(layout, SHARED) == 8  # one host: both stages once
    assert host_blocks(layout, PINNED) == 16  # four ranks, four half models
    # 2 per host: each host holds one stage's two sp ranks
    assert host_blocks(layout, SHARED, 2) == 4
    assert host_blocks(layout, PINNED, 2) == 8  # two stages-worth


def test_cfg2_pp2_hosts_hold_both_stages_and_uneven_stages_count():
    layout = planner.Layout(2, 1, 2, False, offload=True)  # ranks 0,1: cfg 0 stages 0,1; ranks 2,3: cfg 1
    assert host_blocks(layout, SHARED, 2) == 8 and host_blocks(layout, PINNED, 2) == 8
    assert host_blocks(layout, SHARED) == 8 and host_blocks(layout, PINNED) == 16
    seven = planner.ModelShape(num_layers=7, heads=4, head_dim=8, block_params=1000, other_params=0)
    pp2 = planner.Layout(1, 1, 2, False, offload=True)  # stages of 4 and 3 layers (mesh.layer_partition)
    assert host_blocks(pp2, PINNED, 1, seven) == 4  # the host of the larger stage
    assert host_blocks(pp2, SHARED, None, seven) == 7
    # a last host with fewer ranks (hosts of 3 over 4 ranks of ulysses 1 x pp 4): 2 + 2 + 2 blocks, then 2
    assert host_blocks(planner.Layout(1, 1, 4, False, offload=True), PINNED, 3) == 6


def test_fits_checks_the_host_per_host():
    layout = planner.Layout(1, 2, 2, False, offload=True)
    one, two = (planner.plan(SMALL, layout, GRID, hardware=PINNED, ranks_per_host=r) for r in (None, 2))
    bound = 12 * BLOCK / planner.GIB  # between two hosts' 8 blocks and one host's 16
    assert two.fits(None, bound) and not one.fits(None, bound)
    assert planner.choose([one], None, bound) is None and planner.choose([two], None, bound) is two
    without = planner.plan(SMALL, planner.Layout(1, 2, 2, False), GRID, hardware=PINNED, ranks_per_host=2)
    assert without.host_gib == 0


def test_the_profiles_and_the_device_rule():
    assert planner.CPU.host_blocks_shared and not planner.Hardware().host_blocks_shared
    assert host_blocks_shared("CPU") is True
    for device in ("Ascend", "ascend-sim"):  # pinned exactly where offload copies asynchronously
        assert host_blocks_shared(device) is (not asynchronous_offload(device))
        assert planner.hardware_for(device).host_blocks_shared is host_blocks_shared(device)
        assert planner.hardware_for(device).name == "Ascend 910B"
    assert planner.hardware_for("CPU") == planner.CPU
    assert "host blocks pinned per rank" in planner.Hardware().describe()
    assert "host blocks shared per stage" in planner.CPU.describe()


def test_ranks_per_host_from_the_environment(monkeypatch):
    monkeypatch.delenv(RANKS_PER_HOST_ENV, raising=False)
    assert ranks_on_this_host(4) == 4  # unset: the whole world on one host
    assert ranks_on_this_host(4, {RANKS_PER_HOST_ENV: "2"}) == 2
    monkeypatch.setenv(RANKS_PER_HOST_ENV, "4")
    assert ranks_on_this_host(8) == 4
    for bad in ("3", "0", "-2", "two", "8"):
        with pytest.raises(ValueError, match=rf"{RANKS_PER_HOST_ENV}='{bad}' must be a positive whole number of "
                                             r"ranks per host that divides the world of 4 rank\(s\)"):
            ranks_on_this_host(4, {RANKS_PER_HOST_ENV: bad})


def run_describe(capsys, *argv):
    code = describe.main(["--plan", *argv])
    return code, capsys.readouterr().out


def host_column(out, name):
    row = next(line for line in out.splitlines() if line.startswith(name + " "))
    return float(row[len(name):].split()[3])


def test_describe_cards_per_host(capsys):
    # ulysses 2 x pp 2 + offload of the released model, bf16: 24 blocks of 1.125 GiB per stage
    code, four = run_describe(capsys, "--cards", "4", "--card_gb", "32", "--host_gb", "160", "--all")
    assert code == 0
    assert ("host GiB: per host of 4 cards (--cards_per_host, default up to 8), Ascend 910B: pinned per rank "
            "(each rank its own copy)") in four
    assert host_column(four, "ulysses 2 x pp 2 + offload") == 108.0
    assert re.search(r"^cfg 2 x ulysses 2 x pp 1 \+ offload .* 216\.0 .* no$", four, re.M)  # over 128 GiB
    code, two = run_describe(capsys, "--cards", "4", "--card_gb", "32", "--host_gb", "160", "--cards_per_host", "2",
                             "--all")
    assert code == 0 and "host GiB: per host of 2 cards (2 hosts) (--cards_per_host), Ascend 910B" in two
    assert host_column(two, "ulysses 2 x pp 2 + offload") == 54.0  # each host: one stage's two sp ranks
    assert re.search(r"^cfg 2 x ulysses 2 x pp 1 \+ offload .* 108\.0 .* yes$", two, re.M)  # fits a host now
    code, sixteen = run_describe(capsys, "--cards", "16", "--card_gb", "32")
    assert "host GiB: per host of 8 cards (2 hosts) (--cards_per_host, default up to 8)" in sixteen
    with pytest.raises(SystemExit):
        describe.main(["--plan", "--cards", "4", "--cards_per_host", "0"])
    assert "--cards_per_host 0 must be a positive number of cards" in capsys.readouterr().err


def test_describe_advice_keeps_cards_per_host(capsys):
    code, out = run_describe(capsys, "--cards", "1", "--card_gb", "32", "--host_gb", "48", "--cards_per_host", "2")
    assert code == 1
    suggested = [line for line in out.splitlines() if "python -m stepvideo_ms describe --plan --cards" in line]
    assert suggested and all("--host_gb 48 --cards_per_host 2" in line for line in suggested)


def _mesh(world, ulysses, pp, cfg=1):
    return Mesh.create(world, 0, ulysses, pp, cfg_degree=cfg, offload=True)


def test_the_run_refuses_per_host_and_says_whether_copies_are_shared(monkeypatch):
    """run_parallel.py's check (generation/checks.check_fits) on this machine's memory: the released model's
    ulysses 2 x pp 2 + offload on 4 ranks, on CPU (float32, shared: one copy per stage) and on Ascend (bf16,
    shared only without Tensor.pin_memory)."""
    host = HOST_SHARE * physical_memory_gib()
    if host >= 27.0:
        pytest.skip(f"this host allows {host:.0f} GiB of offloaded blocks: a bf16 stage of the released model fits")
    settings = GenerationSettings("plan", "t2v").resolved()
    monkeypatch.delenv(RANKS_PER_HOST_ENV, raising=False)
    with pytest.raises(ValueError) as one_host:
        check_fits(10_000, _mesh(4, 2, 2), {}, settings, "CPU")
    assert ("--offload: ulysses 2 x pp 2 + offload keeps 108.0 GiB of offloaded blocks in this host's memory for its "
            "4 rank(s) here (the ranks of one stage share one copy), over ") in str(one_host.value)
    assert "spread the ranks over more hosts, or use --shard_weights instead of --offload" in str(one_host.value)
    monkeypatch.setenv(RANKS_PER_HOST_ENV, "2")
    with pytest.raises(ValueError, match=r"keeps 54\.0 GiB .* for its 2 rank\(s\) here \(the ranks of one stage"):
        check_fits(10_000, _mesh(4, 2, 2), {}, settings, "CPU")
    for device in ("Ascend", "ascend-sim"):  # bf16; pinned per rank where MindSpore has Tensor.pin_memory
        shared = host_blocks_shared(device)
        with pytest.raises(ValueError) as ascend:
            check_fits(10_000, _mesh(4, 2, 2), {}, settings, device)
        words = "(the ranks of one stage share one copy)" if shared else "(each rank pins its own copy)"
        assert f"keeps {27.0 if shared else 54.0:.1f} GiB of offloaded blocks in this host's memory for its 2 " \
               f"rank(s) here {words}" in str(ascend.value)
    monkeypatch.setenv(RANKS_PER_HOST_ENV, "3")
    with pytest.raises(ValueError, match=f"{RANKS_PER_HOST_ENV}='3' must be a positive whole number"):
        check_fits(10_000, _mesh(4, 2, 2), {}, settings, "CPU")
