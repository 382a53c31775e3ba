"""Step caching (`--cache_threshold R`): skip the middle blocks of a step whose work barely changes.

The rule (DBCache's, Cache-DiT): at every step the first `first` blocks always run; their output is
the probe. Its relative L1 change since the last fully computed step,

    sum |probe - probe_then| / sum |probe_then|

(over every sample and every real token of the step's batch), decides: under `threshold`, past the
`warmup` steps and with fewer than `max_skip` cached steps in a row, the middle blocks (all but the
first `first` and the last `last`) do not run and their residual (output minus input of the middle
span) from the last computed step is added instead; otherwise they run and the residual is refreshed.
The last `last` blocks always run.

Defaults, from the published settings (documented in docs/step-cache.md):
- threshold 0 (off; today's run exactly). Cache-DiT's DBCache default is 0.08, SGLang's published
  DBCache example uses 0.12, FastVideo's TeaCache on Step-Video used 0.23 (a different signal: the
  accumulated change of the first block's modulated input); a user picks R against an uncached run.
- warmup 8 (DBCache's max_warmup_steps 8), first 8 and last 0 (DBCache's default F8B0),
  max_skip 2 (SGLang's published max_continuous_cached_steps 2; DBCache's own default is unlimited).

`CacheSettings` holds the settings and their checks (each error names the flag); `StepCache` is one
denoising loop's decisions and record (the run's JSON `cache` entry). The forward that uses them on
every layout is parallel/dit_forward.py with parallel/step_plan.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

# the cache settings a video may set, their types, defaults and ranges: one place for all of them
CACHE_SETTINGS = {"cache_threshold": float, "cache_warmup": int, "cache_first": int, "cache_last": int,
                  "cache_max_skip": int}
CACHE_DEFAULTS = {"cache_threshold": 0.0, "cache_warmup": 8, "cache_first": 8, "cache_last": 0,
                  "cache_max_skip": 2}
CACHE_RANGES = {"cache_threshold": (0.0, 10.0), "cache_warmup": (0, 1000), "cache_first": (1, 1000),
                "cache_last": (0, 1000), "cache_max_skip": (1, 1000)}
CACHE_HINTS = {"cache_threshold": "0 off; 0.08-0.12 DBCache's published values, see docs/step-cache.md"}


@dataclass(frozen=True)
class CacheSettings:
    threshold: float = CACHE_DEFAULTS["cache_threshold"]
    warmup: int = CACHE_DEFAULTS["cache_warmup"]
    first: int = CACHE_DEFAULTS["cache_first"]
    last: int = CACHE_DEFAULTS["cache_last"]
    max_skip: int = CACHE_DEFAULTS["cache_max_skip"]

    @classmethod
    def of(cls, values) -> "CacheSettings":
        """From an object or a dict holding cache_threshold, cache_warmup, ... (None: the default)."""
        get = values.get if isinstance(values, dict) else (lambda k, d=None: getattr(values, k, d))
        picked = {k: get(k) for k in CACHE_SETTINGS}
        picked = {k: CACHE_DEFAULTS[k] if v is None else v for k, v in picked.items()}
        return cls(float(picked["cache_threshold"]), int(picked["cache_warmup"]), int(picked["cache_first"]),
                   int(picked["cache_last"]), int(picked["cache_max_skip"]))

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def check_model(self, num_layers: int, stages: Optional[Sequence[range]] = None) -> None:
        """Refuse settings the model (and the pipeline stages) cannot take, naming the flag."""
        if not self.enabled:
            return
        if self.first + self.last >= num_layers:
            raise ValueError(f"--cache_first {self.first} + --cache_last {self.last} leave no middle block of the "
                             f"model's {num_layers} to skip: make their sum at most {num_layers - 1}")
        if stages is not None and self.first > len(stages[0]):
            raise ValueError(f"--cache_first {self.first}: the first pipeline stage holds {len(stages[0])} blocks and "
                             "must run every probe block (it decides for the world): give --cache_first "
                             f"{len(stages[0])} or less, or fewer pipeline stages")

    def middle(self, num_layers: int) -> range:
        return range(self.first, num_layers - self.last)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepCache:
    """One denoising loop's decisions, the same on every rank (every rank decides from the same world
    sums). `decide` is called once per step with the probe's summed change and size."""

    settings: CacheSettings
    num_layers: int = 0
    step: int = 0
    in_a_row: int = 0
    has_reference: bool = False
    cached_steps: List[int] = field(default_factory=list)
    changes: List[Optional[float]] = field(default_factory=list)  # relative L1 per step (None: no reference)
    state: Dict[object, object] = field(default_factory=dict)  # this rank's probes and residuals

    def count_computed(self) -> None:
        """A step run without the cache (threshold 0): counted for the record."""
        self.changes.append(None)
        self.step += 1

    def decide(self, diff: float, ref: float) -> bool:
        """True: reuse the middle blocks' residual at this step. Advances the step."""
        s = self.settings
        change = diff / ref if self.has_reference and ref > 0 else None
        reuse = (change is not None and self.step >= s.warmup and self.in_a_row < s.max_skip
                 and change < s.threshold)
        self.changes.append(change)
        if reuse:
            self.cached_steps.append(self.step)
            self.in_a_row += 1
        else:
            self.in_a_row = 0
            self.has_reference = True
        self.step += 1
        return reuse

    def record(self) -> dict:
        """The run's JSON `cache` entry."""
        middle = len(self.settings.middle(self.num_layers)) if self.num_layers else 0
        skipped = middle * len(self.cached_steps)
        return dict(self.settings.to_dict(), steps=self.step, cached_steps=list(self.cached_steps),
                    blocks_run=self.step * self.num_layers - skipped, blocks_skipped=skipped,
                    relative_l1=[None if c is None else round(c, 6) for c in self.changes])
