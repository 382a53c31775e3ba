"""The planner when the host memory decides (describe --plan --host_gb, run_parallel.py's check): one rule
for both (parallel/host_memory.py: the offloaded blocks of a host's ranks may take 80 % of its memory),
said in the output with the host GiB needed and given; the advice names only layouts that fit both the
cards and the host and keeps --host_gb in its commands; the run's time for the steps asked; on one card,
where the encoders and the VAE run."""
import re
import shlex

import pytest

from stepvideo_ms.diffusion.settings import GenerationSettings
from stepvideo_ms.generation.checks import check_fits
from stepvideo_ms.parallel import Mesh
from stepvideo_ms.parallel import plan as planner
from stepvideo_ms.parallel.host_memory import HOST_SHARE, host_limit, physical_memory_gib
from stepvideo_ms.tools import describe

SUGGESTED = "python -m stepvideo_ms describe --plan "


def run_describe(capsys, *argv):
    code = describe.main(["--plan", *argv])
    return code, capsys.readouterr().out


def test_one_32_gib_card_on_a_48_gib_host_says_the_host_decides(capsys):
    code, out = run_describe(capsys, "--cards", "1", "--card_gb", "32", "--host_gb", "48")
    assert code == 1
    assert "offloaded blocks (all ranks of the host) may take 38.4 GiB (80% of --host_gb 48 GiB)" in out
    # the card holds the offload layout (30.2 GiB): the host is the limit, not "-1.8 GiB over 32"
    assert "the host memory decides: ulysses 1 x pp 1 + offload + seq cfg + chunks" in out
    assert "fits the card (30.2 of 32 GiB) but needs 54.0 GiB of host memory per host" in out
    assert "GiB over 32" not in out and "a host of 68 GiB would hold it" in out
    # no video of any size fits this card with this host: the largest-video answer is not the refused video
    assert "largest video" not in out and "no video fits 1 card of 32 GiB and 38.4 GiB" in out
    suggested = [line[line.index(SUGGESTED):] for line in out.splitlines() if SUGGESTED in line]
    assert suggested and all("--host_gb 48" in line for line in suggested)
    assert "fewest cards of 32 GiB within the host memory for 204 frames 544x992: 4 " in out


def test_the_suggested_cards_fit_both_and_one_less_does_not(capsys):
    _, out = run_describe(capsys, "--cards", "1", "--card_gb", "32", "--host_gb", "48")
    command = next(line[line.index(SUGGESTED):] for line in out.splitlines() if "fewest cards" in line)
    argv = shlex.split(command)[4:]
    code, answer = run_describe(capsys, *argv)
    assert code == 0, answer
    cards = argv.index("--cards") + 1
    assert run_describe(capsys, *argv[:cards], str(int(argv[cards]) - 1), *argv[cards + 1:])[0] == 1
    # the previous answer, 2 cards, fits the cards only: its layouts pin 108 GiB of host memory
    assert run_describe(capsys, "--cards", "2", "--card_gb", "32")[0] == 0
    assert run_describe(capsys, "--cards", "2", "--card_gb", "32", "--host_gb", "48")[0] == 1


def test_largest_video_fits_the_host_too(capsys):
    # 1 card of 64 GiB on a 96 GiB host (76.8 GiB for blocks): offload fits; on a 48 GiB host it does not
    assert run_describe(capsys, "--cards", "1", "--card_gb", "64", "--host_gb", "96")[0] == 0
    code, out = run_describe(capsys, "--cards", "2", "--card_gb", "24", "--host_gb", "96")
    assert code == 1
    match = re.search(r"largest video on 2 cards of 24 GiB and 76\.8 GiB \(80% of --host_gb 96 GiB\) of host "
                      r"memory: (\d+) frames (\d+)x(\d+) .*?(--cards 2 .*)$", out, re.M)
    assert match, out
    argv = shlex.split(match.group(4))
    assert "--host_gb" in argv and run_describe(capsys, *argv)[0] == 0  # what it names fits both


def test_run_parallel_and_describe_apply_the_same_host_rule(capsys):
    """For this machine's memory, the layouts of one 64 GiB card that describe --host_gb counts as fitting
    are exactly those run_parallel.py's check lets through (released config, 910B profile)."""
    host_gib = physical_memory_gib()
    limit = host_limit(this_host=True)
    assert limit.gib == pytest.approx(HOST_SHARE * host_gib, abs=0.1) and limit.source == "this host's memory"
    _, out = run_describe(capsys, "--cards", "1", "--card_gb", "64", "--host_gb", f"{limit.host_gib:g}", "--all")
    said = {line[:47].strip(): line.rstrip().endswith("yes") for line in out.splitlines()
            if line.startswith("ulysses 1 x pp 1")}
    settings = GenerationSettings("plan", "t2v").resolved()
    checked = {}
    for layout in planner.layouts(1, 48, 48):
        mesh = Mesh.create(1, 0, layout.ulysses, layout.pp, cfg_degree=layout.cfg, shard_weights=layout.shard,
                           offload=layout.offload, sequential_cfg=layout.seq_cfg, chunk_tokens=layout.chunk)
        try:
            check_fits(64, mesh, {}, settings, "Ascend")
            checked[layout.name()] = True
        except ValueError as exc:
            checked[layout.name()] = False
            if "in this host's memory" in str(exc):  # the host's refusal names the rule
                assert f"({HOST_SHARE:.0%} of this host's memory {limit.host_gib:g} GiB)" in str(exc)
    assert said == checked


def test_host_gb_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        describe.main(["--plan", "--cards", "1", "--host_gb", "0"])
    assert "--host_gb 0 must be positive" in capsys.readouterr().err


def test_the_time_of_the_steps_asked_and_one_card_backends(capsys):
    code, out = run_describe(capsys, "--cards", "1", "--card_gb", "64", "--host_gb", "96", "--infer_steps", "15")
    assert code == 0 and "75,888 tokens, 15 steps" in out and " 15 steps " in out.splitlines()[3]
    chosen = re.search(r"chosen .*: peak [\d.]+ GiB per card, host [\d.]+ GiB, step ([\d.]+) s, 15 steps (\d+) min",
                       out)
    assert chosen and int(chosen.group(2)) == round(float(chosen.group(1)) * 15 / 60)
    assert "on 1 card the text encoders and the VAE run either on servers on other cards" in out
    assert "--caption_url local --vae_url local" in out and "--local_in_turn" in out
    _, four = run_describe(capsys, "--cards", "4", "--card_gb", "64")
    assert "50 steps" in four and "on 1 card" not in four
