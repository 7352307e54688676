"""Aggregators: what happens between a client's local training and the server's rule.

``simulate(..., aggregator=fs.aggregators.median())``; the default is :func:`mean`. A rule of
one's own is an :class:`Aggregator` (a record of pure functions), unit-tested with
:func:`aggregate` on stacked updates. See :mod:`fedjax_sim.aggregators._base` for the stages and
for what an aggregator applies to.
"""

from fedjax_sim.aggregators._base import (REDUCTIONS, Aggregator, CohortInfo, StreamSums,
                                          aggregate, check, prepare, tree_norm, weighted_sums)
from fedjax_sim.aggregators.clip import clip, clip_by_norm
from fedjax_sim.aggregators.compress import quantize, random_k, sign, top_k
from fedjax_sim.aggregators.dp import dp_mean
from fedjax_sim.aggregators.mean import mean, weighted_mean
from fedjax_sim.aggregators.median import masked_median, median
from fedjax_sim.aggregators import robust
from fedjax_sim.aggregators.robust import centered_clip, geometric_median, krum, trimmed_mean
from fedjax_sim.aggregators.secure import secure_mean

# name -> factory, for the CLI (``aggregator`` and ``aggregator_options.*``)
REGISTRY = {"mean": mean, "median": median, "clip": clip, "dp_mean": dp_mean,
            "trimmed_mean": trimmed_mean, "krum": krum, "geometric_median": geometric_median,
            "centered_clip": centered_clip, "quantize": quantize, "top_k": top_k,
            "random_k": random_k, "sign": sign, "secure_mean": secure_mean}

__all__ = ["Aggregator", "CohortInfo", "REDUCTIONS", "REGISTRY", "StreamSums", "aggregate",
           "centered_clip", "check", "clip", "clip_by_norm", "dp_mean", "geometric_median", "krum",
           "masked_median", "mean", "median", "prepare", "quantize", "random_k", "robust",
           "secure_mean", "sign", "top_k", "tree_norm", "trimmed_mean", "weighted_mean",
           "weighted_sums"]
