"""Command line: forecaster run | demo | train | evaluate | plot | bench | check-config."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from forecaster.errors import ForecasterError

log = logging.getLogger("forecaster")


def cmd_train(args: argparse.Namespace) -> int:

    from forecaster.model import ModelConfig
    from forecaster.runtime import tune_process
    from forecaster.train import Recipe, plot_training, save_result, train_default, train_seed

    tune_process(args.threads)
    if args.recipe == "seed":
        if args.episodes is not None:
            raise ForecasterError("--episodes is for the default recipe; the seed's takes --steps")
        result = train_seed(steps=args.steps or 100, seed=args.seed)
    else:
        recipe = Recipe(seed=args.seed, **({"episodes": args.episodes} if args.episodes else {}))
        config = ModelConfig(args.cell, args.hidden_size, args.num_layers)
        result = train_default(recipe, config, steps=args.steps)
    save_result(result, args.out)
    tail = result.losses[-20:]
    print(
        f"checkpoint: {args.out} ({len(result.losses)} optimizer steps, "
        f"final loss {sum(tail) / len(tail):.3g})"
    )
    if args.plot:
        plot_training(result, args.plot)
        print(f"plot: {args.plot}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:

    from forecaster.evaluate import read_csv, read_timestamps, run_series, score
    from forecaster.persist import load_checkpoint
    from forecaster.plots import plot_run
    from forecaster.runtime import tune_process
    from simulators.signals import sine_wave

    tune_process(1)
    checkpoint = load_checkpoint(args.checkpoint, device=args.device)
    timestamps = None
    if args.csv:
        values = read_csv(args.csv, args.column)
        timestamps = read_timestamps(args.csv)  # the samples' times, as a sender's ts
        title = f"{args.csv.name}"
    else:
        values = sine_wave(
            args.samples,
            amplitude=args.amplitude,
            offset=args.offset,
            freq_scale=args.freq_scale,
            noise=args.noise,
            seed=args.seed,
        )
        title = (
            f"sine: amplitude {args.amplitude:g}, offset {args.offset:g}, "
            f"freq x{args.freq_scale:g}, noise {args.noise:g}"
        )
    learn = None
    if args.learn:
        from forecaster.config import OnlineLearningConfig

        learn = OnlineLearningConfig(enabled=True, seed=args.seed)
        if args.config:
            from forecaster.config import load_config

            learn = load_config(args.config).online_learning.model_copy(update={"enabled": True})
    run = run_series(
        values,
        checkpoint.model,
        checkpoint.normalizer,
        device=args.device,
        progress=True,  # drawn on a terminal or with --progress, on stderr
        learn=learn,
        timestamps=timestamps,
    )
    scores = score(run, args.warmup)
    if args.plot:
        plot_run(run, args.plot, title, args.warmup)
    if args.json:
        print(json.dumps(scores.as_dict()))
    else:
        print(title)
        print(f"  samples scored  {scores.samples}")
        print(f"  model   MSE {scores.mse:.6g}  MAE {scores.mae:.6g}")
        print(f"  naive   MSE {scores.naive_mse:.6g}  MAE {scores.naive_mae:.6g}")
        print(f"  skill   {scores.skill:.4f}  (1 - MSE/naive MSE)")
        if args.plot:
            print(f"  plot    {args.plot}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from forecaster.config import load_config

    config = load_config(args.config)
    print(f"{args.config}: ok")
    if args.verbose:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import signal

    from forecaster import runtime
    from forecaster.config import load_config
    from forecaster.daemon import Daemon
    from forecaster.reload import write_pid

    config = load_config(args.config)
    if args.accept_state_loss:
        state = config.state.model_copy(update={"accept_state_loss": True})
        config = config.model_copy(update={"state": state})
    if args.challenger is not None:
        model = config.model.model_copy(update={"challenger": args.challenger})
        config = config.model_copy(update={"model": model})
    logging.getLogger().setLevel(config.logging.level if not args.verbose else logging.DEBUG)
    runtime.tune_process(config.model.threads)
    daemon = Daemon(config)

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        daemon.request_stop()

    def on_hangup(signum: int, frame: object) -> None:
        daemon.request_reload(args.config)  # applied between two ticks

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    signal.signal(signal.SIGUSR1, lambda signum, frame: daemon.request_swap("promote"))
    signal.signal(signal.SIGUSR2, lambda signum, frame: daemon.request_swap("rollback"))
    daemon.start()
    pid_file = write_pid(config.state.dir)
    runtime.settle(learner=config.online_learning.enabled)
    try:
        daemon.run()
    finally:
        pid_file.unlink(missing_ok=True)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    from forecaster.config import load_config
    from forecaster.reload import send_reload

    pid = send_reload(load_config(args.config))
    print(
        f"sent SIGHUP to the daemon (pid {pid}): it re-reads {args.config} between two ticks;"
        " its log and forecaster_config_reloads_total{outcome} say what it applied"
    )
    return 0


def cmd_swap(args: argparse.Namespace) -> int:
    from forecaster.config import load_config
    from forecaster.lifecycle import SIGNALS, send

    pid = send(load_config(args.config), args.action)
    print(
        f"sent {SIGNALS[args.action].name} to the daemon (pid {pid}): it will {args.action}"
        " between two ticks; its log and forecaster_model_promotions_total{outcome} say whether"
        " it did"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from forecaster.demo import run_demo

    return run_demo(args.duration, args.streams, args.rate, args.metrics_port, args.broker)


def cmd_plot(args: argparse.Namespace) -> int:
    from forecaster.evaluate import collect_forecasts, read_forecast_records
    from forecaster.plots import plot_forecasts

    if args.file:
        records = read_forecast_records(args.file)
    else:
        host, _, port = args.broker.rpartition(":")
        records = collect_forecasts(
            host or "localhost", int(port), args.topic, args.duration, args.protocol
        )
        if args.record:
            args.record.write_text("".join(json.dumps(r) + "\n" for r in records))
            print(f"recorded {len(records)} forecasts to {args.record}")
    streams = [s for s in args.streams.split(",") if s] if args.streams else None
    drawn, note = plot_forecasts(records, streams, args.out)
    print(f"plot: {args.out}: {', '.join(drawn)}; {note}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from forecaster.bench import PARTS

    PARTS[args.part](args)
    return 0


DESCRIPTION = """Streaming time-series forecaster: MQTT samples in, one-step-ahead forecasts out,
Prometheus metrics. Start with: forecaster demo. Each command's options: forecaster COMMAND --help."""


def add_progress(parser: argparse.ArgumentParser) -> None:
    """The shared ``--progress`` flag of the commands that draw progress bars."""
    parser.add_argument(
        "--progress",
        action="store_true",
        help="draw progress bars even when stderr is not a terminal (default: terminal only)",
    )


def build_parser() -> argparse.ArgumentParser:
    from forecaster.bench import PARTS  # light: each bench module loads when its part runs

    parser = argparse.ArgumentParser(prog="forecaster", description=DESCRIPTION)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging; check-config: also print the resolved config (goes before the"
        " command: forecaster -v check-config FILE)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model offline on sine signals")
    train.add_argument("--recipe", choices=["default", "seed"], default="default")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--steps",
        type=int,
        help="optimizer steps (default: 100 for the seed recipe; episodes x windows per episode)",
    )
    train.add_argument(
        "--episodes", type=int, help="default recipe: episodes of fresh streams (default 1000)"
    )
    train.add_argument("--cell", choices=["rnn", "gru", "lstm"], default="rnn")
    train.add_argument("--hidden-size", type=int, default=32)
    train.add_argument("--num-layers", type=int, default=1)
    train.add_argument("--threads", type=int, default=1, help="torch threads")
    train.add_argument("--out", type=Path, default=Path("model.safetensors"))
    train.add_argument("--plot", type=Path, help="PNG: loss curve and prediction vs actual")
    add_progress(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="replay a series through the engine and score it")
    source = ev.add_mutually_exclusive_group()
    source.add_argument("--sine", action="store_true", help="the seed's sine (default source)")
    source.add_argument("--csv", type=Path, help="CSV file (NAB format: timestamp,value)")
    ev.add_argument("--column", default="value", help="CSV column to forecast")
    ev.add_argument("--noise", type=float, default=0.0, help="Gaussian noise sigma")
    ev.add_argument("--amplitude", type=float, default=1.0)
    ev.add_argument("--offset", type=float, default=0.0)
    ev.add_argument("--freq-scale", type=float, default=1.0, help="2 = twice the seed's frequency")
    ev.add_argument("--samples", type=int, default=2000)
    ev.add_argument("--seed", type=int, default=0, help="noise seed")
    ev.add_argument("--warmup", type=float, default=0.1, help="share of samples not scored")
    ev.add_argument("--checkpoint", type=Path, help="model checkpoint (default: the shipped one)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--learn", action="store_true", help="fine-tune online while replaying")
    ev.add_argument("-c", "--config", type=Path, help="take online_learning settings from a config")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--plot", type=Path, help="PNG: actual vs prediction and error over time")
    add_progress(ev)
    ev.set_defaults(func=cmd_evaluate)

    run = sub.add_parser("run", help="run the daemon: MQTT in, forecasts out, /metrics")
    run.add_argument("-c", "--config", type=Path, help="YAML config (default: built-in defaults)")
    run.add_argument(
        "--challenger",
        type=Path,
        help="a second model (.safetensors) run in the shadow on every sample, scored, never"
        " published (as model.challenger)",
    )
    run.add_argument(
        "--accept-state-loss",
        action="store_true",
        help="start even when journaled samples are missing (logged and counted; as"
        " state.accept_state_loss: true)",
    )
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="broker + simulator + daemon + live view, one command")
    demo.add_argument("--duration", type=float, help="seconds, then exit 0 (default: until Ctrl-C)")
    demo.add_argument("--streams", type=int, default=4)
    demo.add_argument("--rate", type=float, default=20.0, help="samples/s per stream")
    demo.add_argument(
        "--metrics-port",
        type=int,
        help="default: 9108, or any free port when 9108 is taken (the view prints the URL)",
    )
    demo.add_argument(
        "--broker",
        choices=["auto", "mosquitto", "amqtt"],
        default="auto",
        help="embedded broker: mosquitto when on PATH, else amqtt (pure Python)",
    )
    demo.set_defaults(func=cmd_demo)

    plot = sub.add_parser("plot", help="PNG of actual vs predicted and error over time per stream")
    plot_source = plot.add_mutually_exclusive_group(required=True)
    plot_source.add_argument("--file", type=Path, help="recorded forecasts, one JSON per line")
    plot_source.add_argument("--broker", help="HOST:PORT: record the daemon's forecast topic")
    plot.add_argument(
        "--topic", default="forecasts/+", help="forecast topic filter (with --broker)"
    )
    plot.add_argument("--duration", type=float, default=30.0, help="seconds to record")
    plot.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    plot.add_argument("--record", type=Path, help="also save what was recorded (JSON lines)")
    plot.add_argument("--streams", help="comma-separated stream ids (default: the first 4 by name)")
    plot.add_argument("--out", type=Path, default=Path("forecasts.png"))
    add_progress(plot)
    plot.set_defaults(func=cmd_plot)

    bench = sub.add_parser("bench", help="benchmarks (figures, not tests)")
    bench.add_argument(
        "part",
        choices=list(PARTS),
        help="scrape: /metrics size and latency; drift: learning off vs on across a regime change;"
        " engine: ns per stream-step of a tick vs a bare nn.RNN call, and RSS at 100k streams;"
        " throughput: the daemon vs a no-model relay over Mosquitto (rate, latency, CPU, RSS);"
        " accuracy: one-step-ahead error against peers on every CSV under --data;"
        " anomaly: interval coverage and anomaly alarms on labelled NAB files;"
        " journal: cost of journaling a tick beside the tick, and of a checkpoint;"
        " profile: where the engine thread's time goes on device frames (cProfile, no broker)",
    )
    bench.add_argument(
        "--out", type=Path, help="anomaly: write NAB-format results files under this folder"
    )
    bench.add_argument(
        "--threshold", type=float, help="anomaly: alarm threshold (default anomaly.threshold)"
    )
    bench.add_argument(
        "--data",
        type=Path,
        help="accuracy: folder of CSVs (timestamp,value); anomaly: NAB folder (with labels/)",
    )
    bench.add_argument("--plot", type=Path, help="accuracy: folder for one PNG per file")
    bench.add_argument("--seed", type=int, default=0, help="accuracy: learner and torch seed")
    bench.add_argument("--models", help="accuracy: comma-separated subset (naive always runs)")
    bench.add_argument("--offline", action="store_true", help="drift: skip the live broker runs")
    bench.add_argument("--streams", type=int, default=5000)
    bench.add_argument("--cap", type=int, default=100, help="metrics.stream_label_cap")
    bench.add_argument("--sizes", default="1,100,1000,10000", help="throughput: stream counts")
    bench.add_argument(
        "--count", type=int, default=20_000, help="throughput: messages per run, at least"
    )
    bench.add_argument(
        "--seconds", type=float, default=10.0, help="throughput: each offer lasts at least this"
    )
    bench.add_argument(
        "--down",
        type=float,
        default=60.0,
        help="throughput, backlog: seconds of 1,000 streams' QoS 1 samples queued while the"
        " daemon is down (0: throughput skips the backlog part)",
    )
    bench.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="throughput: interleaved relay-then-daemon pairs per stream count (medians reported)",
    )
    bench.add_argument(
        "--device",
        default="cpu",
        help="engine: where the model and hidden states live (cpu, cuda, cuda:1; not cpu: no"
        " memory row, larger sizes)",
    )
    bench.add_argument(
        "--checkpoint", help="engine: a trained model to time instead of the shipped one"
    )
    bench.add_argument(
        "--busy",
        type=int,
        default=0,
        help="engine: processes spinning beside the timed ticks (a busy machine; 2 on 2 cores)",
    )
    bench.add_argument("--json", action="store_true")
    add_progress(bench)
    bench.set_defaults(func=cmd_bench)

    reload = sub.add_parser(
        "reload", help="make the running daemon re-read its config (SIGHUP): live keys apply"
    )
    reload.add_argument("-c", "--config", type=Path, required=True, help="the daemon's config")
    reload.set_defaults(func=cmd_reload)
    for action, what in (
        ("promote", "the shadow challenger serves from the next sample, with its warmed states"),
        ("rollback", "the model the last promotion replaced serves again"),
    ):
        swap = sub.add_parser(action, help=f"{what} (model.challenger)")
        swap.add_argument("-c", "--config", type=Path, required=True, help="the daemon's config")
        swap.set_defaults(func=cmd_swap, action=action)

    check = sub.add_parser("check-config", help="validate a config file without connecting")
    check.add_argument("config", type=Path)
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "progress", False):
        from forecaster.progress import force

        force()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except ForecasterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
