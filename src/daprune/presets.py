"""Named bundles of settings: the measured best rows as one flag (``--preset``).

The rows that held-out text chose (docs/quality.md) take eight or nine settings each; typing them out is where
users go wrong (drop ``--recovery-inputs`` and the row is another row). A preset is only those settings, as
``PruneConfig`` fields: every one of them can still be set explicitly, which wins, and ``report.json`` records
the preset's name next to every setting in effect, so a report never depends on what a preset meant in some
other version.

Only rows that were measured go here, each with where it was measured. Both were chosen on SmolLM2-135M. ``quality``
fits one scale on the logits after the last block since session 32 (``--logit-scale fit``: lower on every column of
each of the seven seeds, about 1%; measured on the seven prunes of sessions 29-30, the fit being the last step), and
reads 512 rows since session 29 (256 before: over seeds 0-6 twice the rows lowered the held-out texts by 1-2% on
average and WikiText-2 on six of the seven, PTB level, docs/quality.md); its 256-row form is ``--preset quality
--nsamples 256``, which is what sessions 22-28 measured, on Gemma-3-270M too (session 26, docs/gemma3.md: better on
held-out LAMBADA and WikiText-2 than Gemma's own best row, ``--error-weight fisher --token-weight first`` on
generated text, worse on PTB); the 512-row form and the logit scale are not measured on Gemma. ``data-free`` was not
measured on Gemma (Gemma chose other settings for generated text, and the block-target re-fit was worse there), and
has no logit scale (not measured on generated text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from daprune.errors import ConfigError

# the "w/ remedy" stack: the allocation from measured sensitivity, then the held-out-chosen re-fit of every
# linear toward the dense block's output; unaligned FFN widths (--channel-multiple 1), as every quality row was
# measured (multiples of 16 run faster in llama.cpp for about +2% perplexity: docs/layout.md)
_REMEDY: dict[str, Any] = {
    "nsamples": 256,
    "schedule": "sensitivity",
    "recovery": "heldout",
    "heldout_nsamples": 16,
    "recovery_target": "block",
    "recovery_inputs": True,
    "channel_multiple": 1,
}


@dataclass(frozen=True)
class Preset:
    """A name, what it is for, its settings (``PruneConfig`` fields) and where it was measured."""

    name: str
    summary: str
    settings: dict[str, Any]
    measured: str


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("quality",
           "the best held-out mean measured: CoQA stories, Wikipedia paragraphs and the model's own text in turn, "
           "512 rows, measured allocation, held-out-chosen re-fit, the logits scaled to the dense model's (about 25 "
           "minutes for a 135M model on 2 cores)",
           {**_REMEDY, "calibration": "coqa+wiki+self", "sensitivity_nsamples": 8, "nsamples": 512,
            "logit_scale": "fit"},
           "SmolLM2-135M at 20%: WikiText-2 88.86 (1.577x dense), PTB 147.08, mean of seeds 0-6 (docs/quality.md, "
           "session 32, the scale fitted on the prunes of sessions 29-30; without it 89.86 (1.595x) / 148.39; with 256 "
           "rows and no scale 91.49 (1.624x) / 147.19); Gemma-3-270M at 20% of its blocks, with 256 rows and no scale "
           "only: WikiText-2 64.09, PTB 340.27 (docs/gemma3.md, session 26)"),
    Preset("data-free",
           "no text at all: 256 rows of the model's own text, measured allocation, held-out-chosen re-fit "
           "(about 12 minutes for a 135M model on 2 cores, generation cached)",
           {**_REMEDY, "calibration": "self"},
           "SmolLM2-135M at 20%: WikiText-2 101.23, PTB 141.96 (README settings table, session 10)"),
)}


def preset_settings(name: str) -> dict[str, Any]:
    """The settings of preset ``name``; an unknown name is refused with the list of known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return dict(PRESETS[name].settings)


def overridden(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The preset's settings that ``settings`` (a PruneConfig as a dict) holds other values for: what the run
    changed from the preset, as {field: value in effect}."""
    return {k: settings[k] for k, v in preset_settings(name).items() if settings[k] != v}
