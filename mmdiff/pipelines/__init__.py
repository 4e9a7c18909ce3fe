"""mmdiff.pipelines: diffusers ``DiffusionPipeline`` wrappers over the unified model.

    t2i.py   MMDiffT2IPipeline: prompt -> PIL images, save_pretrained / from_pretrained

Imported lazily (diffusers is heavy): ``from mmdiff.pipelines import MMDiffT2IPipeline``.
"""

from __future__ import annotations

__all__ = ["MMDiffT2IPipeline"]


def __getattr__(name: str):
    if name == "MMDiffT2IPipeline":
        from mmdiff.pipelines.t2i import MMDiffT2IPipeline

        return MMDiffT2IPipeline
    raise AttributeError(f"module 'mmdiff.pipelines' has no attribute {name!r}")
