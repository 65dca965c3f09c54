"""``forecaster bench accuracy``: one-step-ahead error against the peers a user would pick."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from forecaster.errors import ForecasterError
from forecaster.progress import progress_bar
from forecaster.runtime import tune_process

RIVER_MODELS = ("river_snarimax", "river_holtwinters")
FORECASTER_MODELS = ("forecaster", "forecaster_learn", "forecaster_gru", "forecaster_lstm")


class RiverModel:
    """A River forecaster behind the bench's verbs; the last value until it can forecast
    (River's HoltWinters has no level before its first values)."""

    def __init__(self, model: object) -> None:
        self.model = model
        self.last = 0.0

    def forecast(self) -> float:
        try:
            value = float(self.model.forecast(horizon=1)[0])  # type: ignore[attr-defined]
        except (IndexError, TypeError, ZeroDivisionError):
            return self.last
        return value if np.isfinite(value) else self.last

    def learn_one(self, y: float) -> None:
        self.model.learn_one(y)  # type: ignore[attr-defined]
        self.last = y


def river_available() -> bool:
    try:
        import river  # noqa: F401
    except ImportError:
        return False
    return True


def accuracy_models(seed: int = 0, models_dir: Path | None = None) -> dict[str, object]:
    """Name -> factory of a fresh model per file. Every peer's settings are fixed here, the same
    for every file (nothing is tuned per file); those of the smoothers and SNARIMAX are the best
    of a small grid on the NAB developer set (docs/accuracy.md), so the peers get their best shot."""
    import torch

    from forecaster.config import OnlineLearningConfig
    from forecaster.evaluate import EngineModel
    from forecaster.peers import (
        DoubleExponentialSmoothing,
        LastValue,
        OnlineAR,
        SeasonalHoltWinters,
        SeasonalNaive,
    )
    from forecaster.persist import DEFAULT_CHECKPOINT, load_checkpoint

    folder = models_dir or DEFAULT_CHECKPOINT.parent
    loaded: dict[str, object] = {}

    def engine(file: str, learn: bool = False) -> object:
        def make() -> EngineModel:
            if file not in loaded:  # loaded once, on first use
                loaded[file] = load_checkpoint(folder / file)
            checkpoint = loaded[file]
            torch.manual_seed(seed)
            return EngineModel(
                checkpoint.model,  # type: ignore[attr-defined]
                checkpoint.normalizer,  # type: ignore[attr-defined]
                OnlineLearningConfig(enabled=True, seed=seed) if learn else None,
            )

        return make

    factories: dict[str, object] = {
        "naive": LastValue,
        "ar8_rls": lambda: OnlineAR(p=8, forgetting=0.999),
        "prometheus_des": lambda: DoubleExponentialSmoothing(sf=0.9, tf=0.5),
        # the season found causally (peers.SeasonalPeriod), the same way for both peers
        "seasonal_naive": SeasonalNaive,
        "holtwinters_seasonal": SeasonalHoltWinters,
    }
    if river_available():
        from river import linear_model, optim, preprocessing, time_series

        # River's default SGD step (0.01) diverges on several NAB files; 0.001 does not.
        factories["river_snarimax"] = lambda: RiverModel(
            time_series.SNARIMAX(
                p=8,
                d=1,
                q=2,
                regressor=preprocessing.StandardScaler()
                | linear_model.LinearRegression(optimizer=optim.SGD(0.001)),
            )
        )
        factories["river_holtwinters"] = lambda: RiverModel(
            time_series.HoltWinters(alpha=0.7, beta=0.01)
        )
    factories.update(
        {
            "forecaster": engine("default.safetensors"),
            "forecaster_learn": engine("default.safetensors", learn=True),
            "forecaster_gru": engine("gru.safetensors"),
            "forecaster_lstm": engine("lstm.safetensors"),
        }
    )
    return factories


def mean_ranks(mse: dict[str, dict[str, float]], files: list[str]) -> dict[str, float]:
    """Average over ``files`` of each model's rank by MSE (1 = best; ties share the mean rank).

    >>> mean_ranks({"a": {"f": 1.0, "g": 2.0}, "b": {"f": 2.0, "g": 2.0}}, ["f", "g"])
    {'a': 1.25, 'b': 1.75}
    """
    totals = dict.fromkeys(mse, 0.0)
    for name in files:
        for model in mse:
            below = sum(mse[other][name] < mse[model][name] for other in mse)
            tied = sum(mse[other][name] == mse[model][name] for other in mse)
            totals[model] += below + (tied + 1) / 2
    return {model: total / max(1, len(files)) for model, total in totals.items()}


def bench_accuracy(
    data: Path,
    seed: int = 0,
    warmup: float = 0.1,
    plot_dir: Path | None = None,
    only: list[str] | None = None,
    models_dir: Path | None = None,
) -> dict[str, object]:
    """Every model on every CSV under ``data``, one protocol: each series in units of its warm-up
    block (``warmup_zscore``), progressive validation, the warm-up not scored."""

    from forecaster.evaluate import (
        EngineModel,
        progressive,
        read_csv,
        read_timestamps,
        score,
        warmup_zscore,
    )

    tune_process(1)
    paths = sorted(data.rglob("*.csv"))
    if not paths:
        raise ForecasterError(f"{data}: no CSV files")
    factories = accuracy_models(seed, models_dir)
    if only:
        factories = {k: v for k, v in factories.items() if k in only or k == "naive"}
    series = {str(p.relative_to(data)): warmup_zscore(read_csv(p), warmup) for p in paths}
    # The rows' times reach the engine as a sender's ts would (its time-of-day feature reads them)
    stamps = {str(p.relative_to(data)): read_timestamps(p) for p in paths}
    files: dict[str, dict[str, dict[str, float]]] = {name: {} for name in factories}
    predictions: dict[str, dict[str, np.ndarray]] = {}
    total = sum(len(v) for v in series.values()) * len(factories)
    with progress_bar(total=total, desc="bench accuracy", unit="sample", leave=False) as bar:
        for name, values in series.items():
            predictions[name] = {}
            for model, factory in factories.items():
                bar.set_postfix_str(f"{model} on {Path(name).name}")
                peer = factory()  # type: ignore[operator]
                if isinstance(peer, EngineModel):
                    peer.timestamps = stamps[name]
                run = progressive(peer, values, bar)
                scores = score(run, warmup)
                files[model][name] = {
                    "mse": scores.mse,
                    "mae": scores.mae,
                    "rel_mse": scores.mse / scores.naive_mse if scores.naive_mse > 0 else None,
                }
                predictions[name][model] = run.predictions
    scored = [name for name in series if files["naive"][name]["mse"] > 0]
    mse = {model: {name: per[name]["mse"] for name in series} for model, per in files.items()}
    ranks = mean_ranks(mse, scored)
    result: dict[str, object] = {
        "models": {
            model: {
                "geo_rel_mse": float(
                    np.exp(np.mean([np.log(per[name]["rel_mse"]) for name in scored]))
                )
                if scored
                else None,
                "mean_rank": ranks[model],
                "beats_naive": sum(per[name]["rel_mse"] < 1 for name in scored),
                "files": per,
            }
            for model, per in files.items()
        },
        "scored_files": scored,
        "skipped_files": [name for name in series if name not in scored],
        "seed": seed,
        "warmup": warmup,
    }
    if not river_available():
        result["skipped_models"] = {
            name: "river is not installed (pip install 'forecaster[bench]')"
            for name in RIVER_MODELS
        }
    if plot_dir is not None:
        plot_dir.mkdir(parents=True, exist_ok=True)
        for name, values in series.items():
            best = sorted(mse, key=lambda m: mse[m][name])[:2]
            plot_accuracy(values, {m: predictions[name][m] for m in best}, warmup, name, plot_dir)
    return result


def plot_accuracy(
    values: np.ndarray, forecasts: dict[str, np.ndarray], warmup: float, name: str, folder: Path
) -> Path:
    """Actual vs the forecasts of the best models: the whole series and its last 300 samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(values)
    t = np.arange(n)
    fig, axes = plt.subplots(2, 1, figsize=(13, 7))
    for ax, lo in zip(axes, (0, max(0, n - 300)), strict=True):
        ax.plot(t[lo:], values[lo:], lw=1.2, color="black", label="actual")
        for model, prediction in forecasts.items():  # forecast of t + 1, drawn at t + 1
            ax.plot(t[lo + 1 :], prediction[lo : n - 1], "--", lw=0.9, label=model)
        ax.set(xlabel="sample", ylabel="value (warm-up z units)")
    start = math.ceil(warmup * n)
    axes[0].axvspan(0, start, color="grey", alpha=0.15, label="warm-up (not scored)")
    axes[0].set_title(f"{name}: actual vs the two best forecasts (lowest MSE)")
    axes[1].set_title("last 300 samples")
    axes[0].legend(loc="upper right")
    fig.tight_layout()
    path = folder / (name.replace("/", "__").removesuffix(".csv") + ".png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def shorten(name: str, width: int = 44) -> str:
    """A file's path cut to ``width`` characters, keeping the file name whole where it fits:
    the folder is cut, not the start of the name (``…_utilization_5f5533.csv`` says nothing).

    >>> shorten("realKnownCause/nyc_taxi.csv")
    'realKnownCause/nyc_taxi.csv'
    >>> shorten("realAWSCloudwatch/ec2_cpu_utilization_5f5533.csv", 40)
    'realAWSC…/ec2_cpu_utilization_5f5533.csv'
    >>> shorten("a_very_long_file_name_with_no_folder_at_all.csv", 24)
    'a_very_long_file_na….csv'
    """
    if len(name) <= width:
        return name
    folder, _, base = name.rpartition("/")
    if folder and len(base) + 2 < width:
        return folder[: width - len(base) - 2] + "…/" + base
    stem, dot, ext = base.rpartition(".")
    if not dot or len(ext) + 2 >= width:
        return base[: width - 1] + "…"
    return stem[: width - len(ext) - 2] + "…." + ext


def print_accuracy(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    models: dict[str, dict] = result["models"]  # type: ignore[assignment]
    scored: list[str] = result["scored_files"]  # type: ignore[assignment]
    order = sorted(models, key=lambda m: models[m]["geo_rel_mse"] or math.inf)
    print(
        f"one-step-ahead accuracy on {len(scored)} files (relative MSE = MSE / naive MSE; "
        f"first {result['warmup']:.0%} of each file not scored)"
    )
    print(f"  {'model':<20} {'geo_rel_mse':>11} {'mean_rank':>9} {'beats naive':>11}")
    for model in order:
        m = models[model]
        print(
            f"  {model:<20} {m['geo_rel_mse']:>11.4f} {m['mean_rank']:>9.2f} "
            f"{m['beats_naive']:>6}/{len(scored):<4}"
        )
    print("\nrelative MSE per file (* = lowest MSE on the file)")
    short = {m: m.replace("forecaster", "fc").replace("river_", "r_")[:10] for m in order}
    print(f"  {'file':<44}" + "".join(f" {short[m]:>10}" for m in order))
    for name in scored:
        best = min(order, key=lambda m: models[m]["files"][name]["mse"])
        cells = "".join(
            f" {models[m]['files'][name]['rel_mse']:>9.3f}{'*' if m == best else ' '}"
            for m in order
        )
        print(f"  {shorten(name):<44}{cells}")
    for name in result["skipped_files"]:  # type: ignore[union-attr]
        print(f"  {shorten(name):<44} skipped: naive has zero error")
    for model, why in dict(result.get("skipped_models", {})).items():  # type: ignore[call-overload]
        print(f"  {model}: skipped, {why}")
