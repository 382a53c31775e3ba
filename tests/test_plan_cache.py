"""The planner's step time with the step cache (parallel/plan_cache.py, `describe --plan --cache_share S`)."""
import pytest

from stepvideo_ms.parallel import plan as planner
from stepvideo_ms.parallel.plan_cache import cache_table, cached_fraction, cached_step_s, mean_step_s
from stepvideo_ms.tools.describe import latent_grid, main

GRID = latent_grid(204, 544, 992)


def released_plan(**layout):
    return planner.plan(planner.ModelShape.from_config({}), planner.Layout(**layout), GRID)


def test_cached_fraction_is_the_busiest_stage_share():
    assert cached_fraction(48, 1, 8, 0) == pytest.approx(8 / 48)
    assert cached_fraction(48, 2, 8, 0) == pytest.approx(8 / 24)   # stage 0 runs its 8 probe blocks
    assert cached_fraction(48, 4, 8, 0) == pytest.approx(8 / 12)
    assert cached_fraction(48, 2, 8, 8) == pytest.approx(8 / 24)   # both stages run 8
    assert cached_fraction(48, 1, 4, 4) == pytest.approx(8 / 48)


def test_mean_step_between_cached_and_uncached():
    hw = planner.Hardware()
    p = released_plan(cfg=2, ulysses=2, pp=1, shard=True)
    cached = cached_step_s(p, 48, hw, 8, 0)
    out_s = p.sent_bytes["output gather"] / (hw.link_gb_s * 1e9)
    assert out_s < cached < p.step_s * 8 / 48 + out_s + 1e-9
    assert mean_step_s(p, 48, hw, 0.0, 8, 0) == pytest.approx(p.step_s)
    assert mean_step_s(p, 48, hw, 1.0, 8, 0) == pytest.approx(cached)
    assert mean_step_s(p, 48, hw, 0.4, 8, 0) == pytest.approx(0.6 * p.step_s + 0.4 * cached)


def test_table_refuses_a_share_out_of_range_and_marks_short_first_stages():
    hw = planner.Hardware()
    with pytest.raises(ValueError, match="--cache_share 1.5 must be a share of steps"):
        cache_table([released_plan(cfg=1, ulysses=4, pp=1, shard=False)], 48, hw, 1.5)
    text = cache_table([released_plan(cfg=1, ulysses=1, pp=8, shard=False)], 48, hw, 0.4, first=8)
    assert "(first stage < --cache_first)" in text


def test_describe_prints_the_step_time_with_the_share(capsys):
    assert main(["--plan", "--cards", "4", "--card_gb", "64", "--cache_share", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "with the step cache, 40% of steps cached (your figure)" in out and "(predictions)" in out
    hw = planner.Hardware()
    p = released_plan(cfg=2, ulysses=2, pp=1, shard=True)
    name = p.layout.name()
    rows = [line[len(name):].split() for line in out.splitlines() if line.startswith(name + " ")]
    row = [r for r in rows if len(r) == 3]  # the cache table's: step s, cached step s, mean step s
    assert row and float(row[0][-1]) == pytest.approx(mean_step_s(p, 48, hw, 0.4, 8, 0), abs=0.05)
