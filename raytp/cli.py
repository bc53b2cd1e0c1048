"""The ``raytp`` command line: ``raytp demo``, ``raytp bench``, ``raytp serve``."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raytp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a TP MLP on the digits set through TPCluster")
    demo.add_argument("--tp", type=int, default=2)
    demo.add_argument("--epochs", type=int, default=15)
    demo.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    demo.add_argument("--no-progress", action="store_true")
    bench = commands.add_parser(
        "bench", help="benchmarks: with no mode, every contender on every workload (raytp bench -h)",
        description="Every contender (one GPU, PyTorch TP, raytp, raytp with overlap, raytp on CuPy "
                    "NCCL) on the MLP, block and GPT workloads on the same GPUs, then the control "
                    "plane and the same code under torchrun. Prints a report, writes JSON.")
    _bench_options(bench)
    modes = bench.add_subparsers(dest="mode")
    control = modes.add_parser("control-plane",
                               help="driver-coordinated steps against the same steps looped in the actors")
    control.add_argument("--tp", type=int, default=2)
    control.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    control.add_argument("--tokens", type=int, default=512)
    control.add_argument("--steps", type=int, default=30)
    control.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    control.add_argument("--json", default=None, help="write the results here")
    recipe = modes.add_parser("recipe", help="the training recipe's settings on one model: bf16, mixed "
                                             "precision, activation checkpointing, compile")
    recipe.add_argument("--tp", type=int, default=1)
    recipe.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    recipe.add_argument("--quick", action="store_true", help="a tiny model (CPU smoke test)")
    recipe.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    recipe.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 1)")
    recipe.add_argument("--json", default=None, help="write the results here")
    recipe.add_argument("--settings", type=_csv(str), default=None,
                        help="comma-separated settings to run (default: all), e.g. bf16,mixed")
    recipe.add_argument("--compile-backend", default="inductor",
                        help="the torch.compile backend of the +compile settings (aot_eager: no code "
                             "generation, for a quick check on CPU)")
    _decode_options(modes.add_parser(
        "decode", help="generation: transformers (dynamic cache, static compiled) against raytp (eager, "
                       "CUDA graphs) on a 1.1B Llama at batch 1, 32 and 100 ragged prompts"))
    _serve_options(commands.add_parser(
        "serve", help="an OpenAI-compatible completions endpoint for a checkpoint, on Ray Serve",
        description="Serve the Hugging Face checkpoint PATH (and its tokenizer.json) at "
                    "http://HOST:PORT/v1 through Ray Serve, on tp x dp ranks. The API key, if any, "
                    "is read from the RAYTP_API_KEY environment variable."))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from raytp.driver.demo import main as demo_main

        accuracy = demo_main(tp=args.tp, epochs=args.epochs, device=args.device,
                             progress=not args.no_progress)
        return 0 if accuracy >= 0.95 else 1
    if args.command == "serve":
        return _serve(args)
    if args.command == "bench" and args.mode == "control-plane":
        from raytp.driver.overhead import main as control_main

        control_main(tp=args.tp, sizes=tuple(args.sizes), tokens=args.tokens, steps=args.steps,
                     device=args.device, json_path=args.json)
        return 0
    if args.command == "bench" and args.mode == "recipe":
        from raytp.driver.recipe import run as recipe_run

        recipe_run(tp=args.tp, device=args.device, quick=args.quick, warmup=args.warmup, steps=args.steps,
                   json_path=args.json, only=args.settings, compile_backend=args.compile_backend,
                   command="raytp " + " ".join(sys.argv[1:] if argv is None else argv))
        return 0
    if args.command == "bench" and args.mode == "decode":
        return _decode(args, argv)
    if args.command == "bench":
        return _bench(args, argv)
    return 2


def _csv(kind):
    return lambda text: tuple(kind(part) for part in text.split(",") if part)


def _bench_options(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("--tp", type=int, default=2)
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    bench.add_argument("--workloads", type=_csv(str), default=None,
                       help="kinds (mlp,block,gpt) or names (mlp-8192,block-2048-sp,...); default all")
    bench.add_argument("--sizes", type=_csv(int), default=None,
                       help="MLP hidden sizes and block token counts to keep, e.g. 2048,8192")
    bench.add_argument("--contenders", type=_csv(str), default=None,
                       help="one-gpu,torch-tp,raytp,raytp-overlap,raytp-cupy,raytp-symm-mem (default all)")
    bench.add_argument("--json", default=None, help="write the full results here")
    bench.add_argument("--quick", action="store_true", help="tiny sizes, few steps (CPU smoke test)")
    bench.add_argument("--warmup", type=int, default=None, help="untimed steps first (5; quick 1)")
    bench.add_argument("--iters", type=int, default=None, help="timed steps per contender (20; quick 3)")
    bench.add_argument("--rounds", type=int, default=None, help="interleaving rounds (4; quick 1)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--no-control-plane", action="store_true")
    bench.add_argument("--no-torchrun", action="store_true")
    bench.add_argument("--no-exposed-comm", action="store_true",
                       help="skip the raytp runs without collectives (no exposed-communication figures)")


def _serve_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("path", help="a Hugging Face checkpoint directory (config.json, safetensors)")
    serve.add_argument("--tp", type=int, default=2)
    serve.add_argument("--dp", type=int, default=1)
    serve.add_argument("--host", default="127.0.0.1", help="where to listen (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=None, help="KV cache slots (default: from memory)")
    serve.add_argument("--max-len", type=int, default=None, help="positions per slot (default: from memory)")
    serve.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    serve.add_argument("--dtype", default="float32", help="the weights' dtype on the ranks (float32, "
                                                          "bfloat16, float16, float64)")
    serve.add_argument("--model-name", default=None, help="the model's id in the API (default: the "
                                                          "directory's name)")


def _serve(args) -> int:
    import os

    try:
        import raytp.serve as rserve
    except ImportError as e:
        raise SystemExit(f"raytp serve needs Ray Serve: pip install 'raytp[serve]' ({e})") from None
    try:
        app = rserve.app(args.path, tp=args.tp, dp=args.dp, max_batch=args.max_batch, max_len=args.max_len,
                         device=args.device, dtype=args.dtype, model_name=args.model_name,
                         api_key=os.environ.get(rserve.API_KEY_ENV) or None)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(f"serving {args.path} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)")
    try:
        _stop_on_sigterm()
        rserve.run(app, host=args.host, port=args.port)
    except KeyboardInterrupt:
        from ray import serve

        print("stopping: the replica, its ranks and their placement group")
        serve.shutdown()
    return 0


def _stop_on_sigterm() -> None:
    """Join or start Ray first, then make SIGTERM (``kill``, ``docker stop``, Kubernetes) stop
    the server as Ctrl-C does. After ``ray.init``: Ray installs its own SIGTERM handler there,
    which dumps a stack and leaves Serve's actors to die with the process."""
    import signal

    from raytp.driver.launch import connect

    connect(None)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _decode_options(decode: argparse.ArgumentParser) -> None:
    decode.add_argument("--tp", type=int, default=1)
    decode.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    decode.add_argument("--quick", action="store_true", help="a tiny model and few tokens (CPU smoke test)")
    decode.add_argument("--only", type=_csv(str), default=None,
                        help="contenders or groups: transformers,raytp,hf-dynamic,hf-static,raytp-eager,"
                             "raytp-graphs (default all)")
    decode.add_argument("--scenarios", type=_csv(str), default=None,
                        help="batch-1,batch-32,ragged-100 (quick: batch-1,batch-4,ragged-10); default all")
    decode.add_argument("--rounds", type=int, default=None, help="timed rounds per scenario (2; quick 1)")
    decode.add_argument("--json", default=None, help="write the results here")


def _decode(args, argv) -> int:
    from raytp.bench.decode import LLAMA_1B, QUICK
    from raytp.driver.decode import pick_scenarios, run, select

    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    if rounds < 1:
        raise SystemExit(f"--rounds {rounds}: must be at least 1")
    config = QUICK if args.quick else LLAMA_1B
    try:  # bad options end here, before any work
        contenders = select(args.only)
        pick_scenarios(config, args.scenarios)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    run(config, contenders=contenders, device=args.device, tp=args.tp, rounds=rounds,
        only_scenarios=args.scenarios, quick=args.quick, json_path=args.json,
        command="raytp " + " ".join(sys.argv[1:] if argv is None else argv))
    return 0


def _bench(args, argv) -> int:
    from raytp.bench.contenders import CONTENDERS
    from raytp.bench.runner import BenchOptions
    from raytp.driver.bench import main as bench_main

    defaults = (1, 3, 1) if args.quick else (5, 20, 4)
    warmup, iters, rounds = (d if v is None else v for v, d in
                             zip((args.warmup, args.iters, args.rounds), defaults, strict=True))
    options = BenchOptions(workloads=args.workloads, sizes=args.sizes,
                           contenders=args.contenders or CONTENDERS, quick=args.quick, warmup=warmup,
                           iters=iters, rounds=rounds, seed=args.seed, exposed_comm=not args.no_exposed_comm)
    command = "raytp " + " ".join(sys.argv[1:] if argv is None else argv)
    bench_main(options, tp=args.tp, device=args.device, json_path=args.json,
               control_plane=not args.no_control_plane, torchrun=not args.no_torchrun, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
