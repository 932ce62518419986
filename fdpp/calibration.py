"""Unified-max calibration (FlashDecoding++ section 1): choose phi per layer from real attention scores.

The asynchronized softmax computes e^{s - phi} with a fixed phi. A row (one query of one head) is
trusted when its max score m satisfies lo < m - phi < hi, (lo, hi) being the safe window of the model
dtype (fdpp.ops.attention.safe_window); other rows are recomputed by the synchronized kernel, so phi
only decides speed (the fallback rate), never the result.

`calibrate` runs built-in text through the model on the reference attention path, records per layer
the distribution of the scaled scores and of each row's max (the quantity the kernels check), slides
the window over the row-max histogram to find the phi that keeps the most rows inside (with a margin),
decides whether one phi for the whole model is as good as one per layer, predicts the fallback rate,
and falls back to the synchronized kernels when no phi keeps enough rows inside (the paper's OPT-6.7B
case: scores span (-497, 364)). Results are cached as JSON per model.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from fdpp.ops.attention import observe_scores, safe_window
from fdpp.ops.backend import use_backends
from fdpp.utils import cache_dir, dtype_name

CALIBRATION_VERSION = 1
# Histogram of scores and row maxima: fixed bins over [-HIST_RANGE, HIST_RANGE), BIN_WIDTH nats wide.
HIST_RANGE = 1024.0
BIN_WIDTH = 0.125
# phi is chosen for a window narrowed by MARGIN on each side, leaving headroom for unseen text.
MARGIN = 1.0
# Above this predicted fallback rate the model runs the synchronized kernels.
MAX_FALLBACK_RATE = 0.02
# A single per-model phi is used when it costs at most this much extra fallback rate.
MODEL_PHI_TOLERANCE = 0.002

BUILTIN_TEXTS = [
    # Prose
    ("The lighthouse keeper had kept a log for thirty-one years, and in all that time he had never "
    "missed an entry. Most days the log said little: wind from the south-west, a fishing boat at dawn, "
    "fog lifting by noon. But on the night of the great storm the entries ran for four pages, written in "
    "a hand that grew steadily worse as the lamp swung and the rain hammered the glass. Historians who "
    "later read the log noticed that he described the waves not by their height but by the sounds they "
    "made against the rocks, as if he had long ago stopped trusting his eyes in the dark."),
    # Expository / science
    ("Photosynthesis converts light energy into chemical energy. In the light-dependent reactions, "
    "chlorophyll absorbs photons and splits water, releasing oxygen and producing ATP and NADPH. The "
    "Calvin cycle then uses that energy to fix carbon dioxide into three-carbon sugars. Because the "
    "enzyme RuBisCO also reacts with oxygen, plants in hot, dry climates evolved C4 and CAM pathways "
    "that concentrate carbon dioxide around the enzyme and reduce wasteful photorespiration."),
    # Code
    ("def merge_intervals(intervals):\n"
    "    \"\"\"Merge overlapping [start, end] intervals and return them sorted.\"\"\"\n"
    "    intervals = sorted(intervals, key=lambda iv: iv[0])\n"
    "    merged = []\n"
    "    for start, end in intervals:\n"
    "        if merged and start <= merged[-1][1]:\n"
    "            merged[-1][1] = max(merged[-1][1], end)\n"
    "        else:\n"
    "            merged.append([start, end])\n"
    "    return merged\n\n"
    "assert merge_intervals([[1, 3], [2, 6], [8, 10], [15, 18]]) == [[1, 6], [8, 10], [15, 18]]\n"
    "for i in range(10):\n    print(f\"{i:3d} {i * i:5d} {2 ** i:6d}\")\n"),
    # Numbers and tables
    ("Quarterly results (in millions of USD): Q1 revenue 412.7, cost 298.1, margin 27.8%; Q2 revenue "
    "455.2, cost 310.4, margin 31.8%; Q3 revenue 430.9, cost 305.0, margin 29.2%; Q4 revenue 501.3, "
    "cost 342.6, margin 31.7%. Year total: 1800.1 revenue. Phone: +1 (555) 013-2749. Dates: 2024-03-15, "
    "1999-12-31, 07/04/1776. Pi is 3.14159265358979, e is 2.71828182845904, and 2^32 = 4294967296."),
    # Dialogue / instructions
    ("User: Can you explain how to make a simple sourdough starter?\nAssistant: Sure. Mix equal weights "
    "of whole-wheat flour and water in a clean jar, cover it loosely, and keep it at room temperature. "
    "Every day, discard about half and feed it with fresh flour and water. After five to ten days it "
    "should double within a few hours of feeding and smell pleasantly sour. Then it is ready to bake.\n"
    "User: What if it smells like nail polish?\nAssistant: That usually means it is hungry: feed it more often."),
]


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------

def _num_bins() -> int:
    return int(2 * HIST_RANGE / BIN_WIDTH)


def _bin_left(i: int) -> float:
    return -HIST_RANGE + i * BIN_WIDTH


class _LayerCollector:
    """Histograms of all finite scores and of every row's max score for one layer."""

    def __init__(self):
        self.score_hist = torch.zeros(_num_bins(), dtype=torch.float64)
        self.rowmax_hist = torch.zeros(_num_bins(), dtype=torch.float64)
        self.min = float("inf")
        self.max = float("-inf")
        self.num_scores = 0
        self.num_rows = 0

    def add(self, scores: torch.Tensor) -> None:
        scores = scores.detach().float()
        finite = scores[torch.isfinite(scores)]
        if finite.numel() == 0:
            return
        rowmax = scores.amax(dim=-1).reshape(-1)
        rowmax = rowmax[torch.isfinite(rowmax)]
        self.min = min(self.min, float(finite.min()))
        self.max = max(self.max, float(finite.max()))
        self.num_scores += finite.numel()
        self.num_rows += rowmax.numel()
        self.score_hist += _hist(finite)
        self.rowmax_hist += _hist(rowmax)


def _hist(x: torch.Tensor) -> torch.Tensor:
    # Values outside the range are clamped into the edge bins (they are extreme either way).
    x = x.clamp(-HIST_RANGE, HIST_RANGE - BIN_WIDTH / 2)
    return torch.histc(x.cpu().float(), bins=_num_bins(), min=-HIST_RANGE, max=HIST_RANGE).double()


def _quantile(hist: torch.Tensor, q: float) -> float:
    total = float(hist.sum())
    if total == 0:
        return float("nan")
    cdf = torch.cumsum(hist, 0) / total
    idx = int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64)))
    return _bin_left(min(idx, hist.numel() - 1)) + BIN_WIDTH / 2


def _best_phi(rowmax_hist: torch.Tensor, window: tuple[float, float]) -> float:
    """phi maximising the rows with max in (phi + lo + MARGIN, phi + hi - MARGIN); the middle of the
    best plateau."""
    lo, hi = window
    width = max(1, int((hi - lo - 2 * MARGIN) / BIN_WIDTH))
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(rowmax_hist, 0)])
    inside = csum[width:] - csum[:-width]  # rows in bins [i, i + width)
    best = float(inside.max())
    starts = torch.nonzero(inside >= best - 1e-9).flatten()
    start = int(starts[len(starts) // 2])
    left_edge = _bin_left(start)
    return left_edge - (lo + MARGIN)


def _fallback_rate(rowmax_hist: torch.Tensor, phi: float, window: tuple[float, float]) -> float:
    """Fraction of rows whose max m has m - phi outside (lo, hi) (bin centres)."""
    total = float(rowmax_hist.sum())
    if total == 0:
        return 0.0
    centres = -HIST_RANGE + BIN_WIDTH * (torch.arange(rowmax_hist.numel(), dtype=torch.float64) + 0.5)
    rel = centres - phi
    ok = (rel > window[0]) & (rel < window[1])
    return 1.0 - float(rowmax_hist[ok].sum()) / total


# ------------------------------------------------------------------------------------------------
# Result
# ------------------------------------------------------------------------------------------------

@dataclass
class CalibrationResult:
    """What calibration decided for one model.

    mode: "unified" (use phi) or "synchronized" (the score range is too wide for one phi).
    phi_per_layer / model_phi: the best phi per layer and for the whole model; use_model_phi says which
    one `phi_for_layer` returns. window: (lo, hi) of s - phi for `dtype`.
    predicted_fallback_rate: fraction of calibration rows (query x head) the chosen phis send to the
    fallback (prefill flags whole query tiles, so its rate runs higher).
    layers: per-layer statistics (score range and quantiles, row-max quantiles, chosen phi, rate).
    """
    model_key: str
    dtype: str
    mode: str
    window: tuple[float, float]
    phi_per_layer: list[float]
    model_phi: float
    use_model_phi: bool
    predicted_fallback_rate: float
    num_tokens: int
    score_range: tuple[float, float]
    reason: str = ""
    layers: list[dict] = field(default_factory=list)
    version: int = CALIBRATION_VERSION

    def phi_for_layer(self, layer_idx: int) -> float | None:
        """phi for `layer_idx`, or None when the model must run the synchronized kernels."""
        if self.mode != "unified":
            return None
        if self.use_model_phi or layer_idx >= len(self.phi_per_layer):
            return self.model_phi
        return self.phi_per_layer[layer_idx]

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)  # atomic: a reader never sees half a file

    @classmethod
    def load(cls, path: str) -> CalibrationResult:
        with open(path) as f:
            data = json.load(f)
        if data.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"calibration file {path} has version {data.get('version')}, "
                             f"expected {CALIBRATION_VERSION}; run `fdpp calibrate` again")
        data["window"] = tuple(data["window"])
        data["score_range"] = tuple(data["score_range"])
        return cls(**data)

    def summary(self) -> str:
        if self.mode != "unified":
            return (f"{self.model_key}: synchronized softmax ({self.reason}); scores span "
                    f"({self.score_range[0]:.1f}, {self.score_range[1]:.1f})")
        which = f"one phi = {self.model_phi:.2f}" if self.use_model_phi else "per-layer phi " + ", ".join(
            f"{p:.1f}" for p in self.phi_per_layer)
        return (f"{self.model_key}: unified max, {which}; window {self.window}; predicted fallback rate "
                f"{100 * self.predicted_fallback_rate:.3f}% over {self.num_tokens} tokens")


# ------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------

def make_model_key(model: str, config: dict | str | None = None, dtype: torch.dtype | str | None = None) -> str:
    """A file-name-safe key: the model's name plus a hash of its path/name, config and dtype."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(os.path.normpath(str(model))) or "model")[:64]
    cfg = json.dumps(config, sort_keys=True, default=str) if isinstance(config, dict) else str(config)
    digest = hashlib.sha1(f"{model}|{cfg}|{dtype}".encode()).hexdigest()[:12]
    return f"{name}-{digest}"


def cache_path(model_key: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_key)
    return os.path.join(cache_dir("calibration"), f"{safe}.json")


def load_or_none(model_key: str) -> CalibrationResult | None:
    """The cached calibration of `model_key`, or None if there is none (or it is stale/unreadable)."""
    path = cache_path(model_key)
    if not os.path.exists(path):
        return None
    try:
        return CalibrationResult.load(path)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None


# ------------------------------------------------------------------------------------------------
# Calibrate
# ------------------------------------------------------------------------------------------------

def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, str(dtype).replace("torch.", ""))


def decide(collectors: Sequence[_LayerCollector], *, dtype, model_key: str, num_tokens: int) -> CalibrationResult:
    """Choose phi per layer / per model from collected statistics (separate from the model run)."""
    window = safe_window(_as_dtype(dtype))
    layer_phis, layer_rates, layers = [], [], []
    total_rows = 0.0
    combined = torch.zeros(_num_bins(), dtype=torch.float64)
    for i, c in enumerate(collectors):
        rows = float(c.rowmax_hist.sum())
        phi = _best_phi(c.rowmax_hist, window) if rows > 0 else 0.0
        rate = _fallback_rate(c.rowmax_hist, phi, window)
        layer_phis.append(round(phi, 4))
        layer_rates.append(rate)
        combined += c.rowmax_hist
        total_rows += rows
        layers.append({
            "layer": i, "phi": round(phi, 4), "predicted_fallback_rate": rate, "num_rows": int(rows),
            "num_scores": c.num_scores, "score_min": c.min, "score_max": c.max,
            "score_q0001": _quantile(c.score_hist, 1e-4), "score_q9999": _quantile(c.score_hist, 1 - 1e-4),
            "rowmax_q01": _quantile(c.rowmax_hist, 0.01), "rowmax_q50": _quantile(c.rowmax_hist, 0.5),
            "rowmax_q99": _quantile(c.rowmax_hist, 0.99)})
    if total_rows == 0:
        raise RuntimeError("calibration saw no attention scores: did the model run on the reference "
                           "attention path (use_backends(attention='reference'))?")
    rate_per_layer = sum(r * float(c.rowmax_hist.sum()) for r, c in zip(layer_rates, collectors)) / total_rows
    model_phi = round(_best_phi(combined, window), 4)
    rate_model = _fallback_rate(combined, model_phi, window)
    use_model_phi = rate_model <= rate_per_layer + MODEL_PHI_TOLERANCE
    rate = rate_model if use_model_phi else rate_per_layer
    all_scores = sum((c.score_hist for c in collectors), torch.zeros(_num_bins(), dtype=torch.float64))
    score_range = (min(c.min for c in collectors), max(c.max for c in collectors))
    if rate > MAX_FALLBACK_RATE:
        mode = "synchronized"
        reason = (f"no phi keeps {100 * (1 - MAX_FALLBACK_RATE):.0f}% of rows inside the {window} window "
                  f"(best: {100 * rate:.2f}% would fall back); 99.99% of scores lie in "
                  f"({_quantile(all_scores, 1e-4):.1f}, {_quantile(all_scores, 1 - 1e-4):.1f})")
    else:
        mode = "unified"
        reason = "per-model phi is as good as per-layer" if use_model_phi else "per-layer phi is better"
    return CalibrationResult(
        model_key=model_key, dtype=dtype_name(dtype), mode=mode, window=tuple(window),
        phi_per_layer=layer_phis, model_phi=model_phi, use_model_phi=use_model_phi,
        predicted_fallback_rate=rate, num_tokens=num_tokens, score_range=score_range, reason=reason,
        layers=layers)


def calibrate(run_model: Callable[[list[int]], object], *, num_layers: int, dtype, model_key: str,
              texts: Sequence[str | Sequence[int]] | None = None, tokenizer=None,
              save: bool = True, path: str | None = None) -> CalibrationResult:
    """Run calibration text through `run_model(token_ids)` and choose the unified max per layer.

    run_model: runs one forward pass of the model over a list of token ids (a prefill); attention must
    go through fdpp.ops.attention.attention (the reference backend is forced here so the score
    observer sees every score). texts: strings (need `tokenizer`, anything with .encode(str) ->
    list[int]) or lists of token ids; default: the built-in mix of prose, code and numbers.
    Saves to `path` or the cache (see `cache_path`) when save=True.
    """
    texts = list(BUILTIN_TEXTS if texts is None else texts)
    token_lists = []
    for t in texts:
        if isinstance(t, str):
            if tokenizer is None:
                raise ValueError("calibrate: text given as strings needs a tokenizer (or pass token id lists)")
            ids = tokenizer.encode(t)
            ids = list(ids.ids) if hasattr(ids, "ids") else list(ids)
        else:
            ids = [int(x) for x in t]
        if ids:
            token_lists.append(ids)
    if not token_lists:
        raise ValueError("calibrate: no calibration tokens")

    collectors = [_LayerCollector() for _ in range(num_layers)]

    def observe(layer_idx: int, scores: torch.Tensor) -> None:
        if not 0 <= layer_idx < num_layers:
            raise ValueError(f"calibrate: the model reported layer {layer_idx}, but num_layers={num_layers}")
        collectors[layer_idx].add(scores)

    with torch.no_grad(), use_backends(attention="reference"), observe_scores(observe):
        for ids in token_lists:
            run_model(ids)
    result = decide(collectors, dtype=dtype, model_key=model_key, num_tokens=sum(map(len, token_lists)))
    if save:
        result.save(path or cache_path(model_key))
    return result
