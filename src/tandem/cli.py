"""`tandem run | profile | eval | list`: the command line mirrors the Python API."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from .errors import CheckpointError, TandemError

BUNDLED_RECIPES = Path(__file__).with_name("bundled_recipes")   # shipped in the package (pyproject.toml)


def bundled_recipes() -> list[str]:
    """Names of the recipes shipped with tandem: `tandem run NAME` finds them from any folder."""
    return sorted(p.stem for p in BUNDLED_RECIPES.glob("*.yaml"))


def _split_run_args(args: list[str]) -> tuple[str | None, list[str]]:
    """The first argument without '=' is the recipe file; the rest are key=value overrides.
    A key and its value written apart (`train.epochs 5`) is refused here: read as a recipe
    file, it would only say that no file `train.epochs` exists."""
    if not args or "=" in args[0]:
        return None, args
    first, rest = args[0], args[1:]
    value = rest[0] if rest and "=" not in rest[0] else None
    recipe = Path(first).is_file() or Path(first).suffix in (".yaml", ".yml") or first in bundled_recipes()
    dotted_key = re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", first)
    if not recipe and (dotted_key or value is not None):
        given = first if value is None else f"{first} {value}"
        raise TandemError(f"{given}: write overrides as key=value, e.g. {first}={value if value is not None else 'VALUE'}"
                          f" (a recipe is a .yaml file or a bundled recipe's name: tandem list)")
    return first, rest


def _set_threads(ns) -> int | None:
    """--threads N: torch's intra-op threads for this process (each process, under --nproc); N."""
    if ns.threads is None:
        return None
    try:
        threads = int(ns.threads)
    except ValueError:
        threads = 0
    if threads < 1:
        raise TandemError(f"--threads {ns.threads}: must be a whole number >= 1 (threads per process)")
    import torch
    torch.set_num_threads(threads)
    return threads


def _launch_torchrun(ns, argv: list[str]) -> int:
    """`tandem run --nproc N ...` = `torchrun --nproc_per_node=N -m tandem.cli run ...`."""
    import subprocess

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ns.nproc}",
           "-m", "tandem.cli", *rest]
    print("launching: " + " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)


def _seeds(ns, overrides: list[str]) -> list[int] | None:
    """--seeds as whole numbers, each once; the seed= override would contradict them."""
    from .recipes import parse_overrides

    if ns.seeds is None:
        return None
    seeds = []
    for text in ns.seeds:
        try:
            seed = int(text)
        except ValueError:
            raise TandemError(f"--seeds: {text!r} is not a seed (a whole number >= 0); "
                              f"put key=value overrides before --seeds") from None
        if seed < 0:
            raise TandemError(f"--seeds: seed {seed} is negative; seeds are whole numbers >= 0")
        if seed in seeds:
            raise TandemError(f"--seeds: seed {seed} is given twice")
        seeds.append(seed)
    if any(key == "seed" for key, _ in parse_overrides(overrides)):
        raise TandemError("--seeds sets the seed of each run; drop the seed= override")
    if (getattr(ns, "nproc", 0) or 0) > 1 or "WORLD_SIZE" in os.environ:
        raise TandemError("--seeds runs the seeds one after another in one process; with several processes, "
                          "run each seed alone (seed=N --out DIR/seedN)")
    return seeds


def _run_seeds(ns, recipe, recipe_path, overrides, seeds: list[int]) -> int:
    """`tandem run --seeds`: one normal run folder per seed, OUT/seed<N>/, then the summary in OUT.
    OUT keeps the recipe (seed aside) and seeds.json, so `--resume --out OUT` needs nothing else."""
    from .files import atomic_write
    from .grid import run_folder
    from .recipes import dump_recipe, load_recipe, same_recipe
    from .runner import default_out_dir
    from .summary import summarize, summary_markdown, write_summary

    out = Path(ns.out) if ns.out else default_out_dir(recipe)
    saved = out / "recipe.yaml"
    if ns.resume:
        if not out.exists():
            raise TandemError(f"cannot resume: run folder {out} does not exist")
        if saved.exists() and not (out / "seeds.json").exists():
            raise TandemError(f"{out} holds one run, not runs over seeds; resume it without --seeds")
        if saved.exists() and not same_recipe(saved, recipe):
            raise TandemError(f"{out} was run with a different recipe (changed overrides or file); "
                              f"resume with the same recipe and overrides, or none")
    elif out.exists() and any(out.iterdir()):
        raise TandemError(f"run folder {out} already holds a run; pass --resume to continue it, or choose another --out")
    recipes = [load_recipe(recipe_path, overrides + [f"seed={s}"]) for s in seeds]   # all valid before any work
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(saved, lambda tmp: Path(tmp).write_text(dump_recipe(recipe)))
    atomic_write(out / "seeds.json", lambda tmp: Path(tmp).write_text(json.dumps({"seeds": seeds})))
    try:
        results = [run_folder(out / f"seed{s}", r, log=lambda msg: print(msg, file=sys.stderr), what="seeds")
                   for s, r in zip(seeds, recipes)]
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished epochs are checkpointed. Resume with:\n"
              f"  tandem run --resume --out {out}", file=sys.stderr)
        return 130
    summary = summarize(seeds, [r["models"] for r in results], command="run", recipe=recipe.model_dump(mode="json"))
    write_summary(out, summary)
    print(summary_markdown(summary))
    print(f"\nseed folders and summary in {out}")
    return 0


def cmd_run(ns) -> int:
    from .engine import distributed
    from .recipes import load_recipe
    from .runner import default_out_dir, run

    recipe_path, overrides = _split_run_args(ns.args)
    seeds = _seeds(ns, overrides)
    threads = _set_threads(ns)
    if ns.resume and not ns.out:
        raise TandemError("--resume needs --out RUN_DIR, the folder of the run to continue")
    if seeds is None and ns.resume and (Path(ns.out) / "seeds.json").exists():
        seeds = json.loads((Path(ns.out) / "seeds.json").read_text())["seeds"]   # a run over seeds
    if recipe_path is None and ns.resume and (Path(ns.out) / "recipe.yaml").exists():
        recipe_path = str(Path(ns.out) / "recipe.yaml")   # resume exactly what was started
    recipe = load_recipe(recipe_path, overrides)
    if threads and recipe.train.threads and recipe.train.threads != threads:
        raise TandemError(f"--threads {ns.threads} and train.threads = {recipe.train.threads} disagree; give one")
    if seeds is not None:
        return _run_seeds(ns, recipe, recipe_path, overrides, seeds)
    if ns.nproc and ns.nproc > 1:   # check here what would fail in every rank, then launch
        if recipe.train.batch_size % ns.nproc:
            raise TandemError(f"train.batch_size = {recipe.train.batch_size} must be divisible by the "
                              f"number of processes ({ns.nproc}); it is the global batch")
        return _launch_torchrun(ns, ns.argv)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    # the folder is named here, before any work, so an interruption can say how to resume
    out = ns.out or (default_out_dir(recipe) if "WORLD_SIZE" not in os.environ else None)
    try:
        results = run(recipe, out, resume=ns.resume)
    except KeyboardInterrupt:
        if main_rank:
            print(f"\ninterrupted; finished epochs are checkpointed. Resume with:\n"
                  f"  tandem run --resume --out {out or 'RUN_DIR'}", file=sys.stderr)
        return 130
    finally:
        distributed.cleanup()
    if main_rank:
        from .report import markdown_table
        print(markdown_table(results["models"]))
        print(f"\nwall time {results['wall_time_s']:.1f} s; report in {out or 'runs/'}")
    return 0


def cmd_grid(ns) -> int:
    from .grid import DEFAULT_PRUNERS, DEFAULT_QUANTIZERS, parse_list, run_grid

    recipe_path, overrides = _split_run_args(ns.args)
    seeds = _seeds(ns, overrides)
    _set_threads(ns)
    if seeds is not None:
        from .grid import run_grid_seeds
        from .summary import summary_markdown
        print(summary_markdown(run_grid_seeds(recipe_path, parse_list(ns.pruners, DEFAULT_PRUNERS),
                                              parse_list(ns.quantizers, DEFAULT_QUANTIZERS), seeds, out=ns.out,
                                              overrides=overrides)))
        return 0
    summary = run_grid(recipe_path, parse_list(ns.pruners, DEFAULT_PRUNERS),
                       parse_list(ns.quantizers, DEFAULT_QUANTIZERS), out=ns.out, overrides=overrides)
    from .grid import grid_markdown
    print(grid_markdown(summary))
    return 0


def _load_model_file(path: Path, factory: str | None = None) -> tuple:
    """(model, metadata) of a model file or of a packed export (`*.packed.safetensors`, which
    keeps its model file's dataset record)."""
    from .engine import load_model

    if not path.name.endswith(".packed.safetensors"):
        return load_model(path, factory=factory)
    if factory is not None:
        raise TandemError(f"--factory applies to model files (models/*.safetensors); {path.name} is a packed export, "
                          f"which rebuilds from its own record")
    from safetensors import SafetensorError, safe_open
    from .export import load_packed

    try:
        model = load_packed(path)
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items() if k != "format"}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a packed model file ({exc})") from None
    if "dataset" not in meta:
        raise CheckpointError(f"{path} does not record its dataset (exported by an older tandem); export it again")
    return model, meta


def cmd_profile(ns) -> int:
    """A registered model at the given size and bits, or a model file as it was trained: its
    dataset's input size, its quantized layers' own bits, its pruned widths."""
    from . import cost
    from .data import dataset_of
    from .models import create_model

    path = Path(ns.model)
    is_file = path.suffix == ".safetensors" or path.is_file()
    if ns.factory is not None and not is_file:
        raise TandemError(f"--factory applies to a model file; {ns.model!r} is a registered model's name")
    if is_file:
        model, meta = _load_model_file(path, ns.factory)
        if ns.input_size is not None:
            channels = ns.in_channels or (meta.get("config") or {}).get("in_channels") or 3
            shape = (channels, ns.input_size, ns.input_size)
        elif meta.get("input_size"):   # recorded by the run that saved it
            shape = tuple(meta["input_size"])
        else:   # an older file: its dataset says the size
            data = dataset_of(meta, ns.data_root, source=str(path))
            shape = (data.in_channels, *data.image_size)
    else:
        model = create_model(ns.model, num_classes=ns.num_classes, in_channels=ns.in_channels or 3)
        shape = (ns.in_channels or 3, ns.input_size or 32, ns.input_size or 32)
    report = cost.profile(model, shape, w_bits=ns.w_bits, a_bits=ns.a_bits, first_last_bits=ns.first_last_bits)
    out = report.to_dict()
    if ns.latency:
        from .latency import measure
        _set_threads(ns)
        out.update(measure(model, shape, batch=ns.latency_batch))
    if ns.json:
        print(json.dumps(out, indent=2))
        return 0
    print(report.table())
    if ns.latency:
        setup = out["latency_setup"]
        for runtime, by_batch in out["latency_ms"].items():
            print(f"latency {runtime}: " + ", ".join(f"{ms:.3f} ms at batch {b}" for b, ms in by_batch.items()))
        print(f"(CPU, {setup['threads']} threads, median of {setup['rounds']} interleaved rounds; CPU flags "
              f"{' '.join(setup['cpu_flags']) or 'unknown'}; load average {setup['load_average_1min']}"
              + (f"; not exported: {setup['onnx_error']}" if "onnx_error" in setup else "") + ")")
    return 0


def listings() -> dict[str, list[str]]:
    """What `tandem list` shows: one entry per registry."""
    from .data import list_datasets
    from .methods import list_methods
    from .models import list_models

    from .prune import list_criteria

    from .quant import list_quantizers

    return {"models": list_models(), "datasets": list_datasets(), "methods": list_methods(),
            "pruning criteria": list_criteria(), "quantizers": list_quantizers(), "recipes": bundled_recipes()}


def cmd_list(ns) -> int:
    for title, names in listings().items():
        print(f"{title}: {', '.join(names)}")
    return 0


def cmd_eval(ns) -> int:
    """Test top-1 of every model of a run folder, of one model file or of a packed export."""
    from .data import BatchLoader, dataset_of
    from .engine import evaluate, resolve_device

    target = Path(ns.checkpoint)
    files = sorted((target / "models").glob("*.safetensors")) if target.is_dir() else [target]
    if not files:
        raise TandemError(f"no model files (*.safetensors) in {target / 'models'}")
    device = resolve_device(ns.device)
    cache = {}
    for path in files:
        model, meta = _load_model_file(path, ns.factory)
        key = json.dumps([meta.get("dataset"), meta.get("seed")], sort_keys=True)
        if key not in cache:
            cache[key] = dataset_of(meta, ns.data_root, source=str(path))
        data = cache[key]
        loader = BatchLoader(data.test, 1024, mean=data.mean, std=data.std, device=device)
        result = evaluate(model.to(device), loader)
        print(f"{path.name}: test top-1 {result['top1']:.2f}% on {result['n']} images of {meta['dataset']['name']}")
    return 0


def cmd_export(ns) -> int:
    from .export import export_run

    rows = export_run(ns.target, ns.format, out_dir=ns.out, data_root=ns.data_root, allow_mismatch=ns.allow_mismatch,
                      runtime=ns.runtime, factory=ns.factory)
    return 0 if ns.allow_mismatch or all(r.get("parity", True) for r in rows) else 1


def _version() -> str:
    """The installed distribution's version; the package's own where tandem is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tandem")
    except PackageNotFoundError:
        from . import __version__
        return __version__


def _factory_option(parser) -> None:
    parser.add_argument("--factory", metavar="MODULE:CLASS",
                        help="rebuild a user's model from this, for files whose recorded factory cannot be imported "
                             "(e.g. '__main__:Net', written from a script)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem", description="Prune, quantize and distill CNNs together.")
    p.add_argument("--version", action="version", version=f"tandem {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a recipe (no recipe: the default job on digits)")
    r.add_argument("args", nargs="*", metavar="RECIPE | key=value",
                   help="a recipe YAML (or a bundled recipe's name: tandem list), then overrides such as "
                        "train.epochs=5")
    r.add_argument("--out", help="run folder (default runs/<recipe>-<time>)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--nproc", type=int, default=0,
                   help="train with N processes on this machine (launches torchrun --nproc_per_node=N)")
    r.add_argument("--seeds", nargs="+", metavar="N",
                   help="run once per seed, each a normal run folder OUT/seed<N>/ (resumable), then "
                        "OUT/summary.{json,md,png}: mean, std and 95%% interval of test top-1 per row, and each "
                        "method minus its control paired by seed; put key=value overrides before --seeds")
    r.add_argument("--threads", metavar="N", help="torch threads per process (torch.set_num_threads), "
                                                  "set before any work")
    r.set_defaults(fn=cmd_run)

    g = sub.add_parser("grid", help="pruners x quantizers, each pair trained by mutual learning and "
                                    "independently (the control); one table and plot")
    g.add_argument("args", nargs="*", metavar="RECIPE | key=value",
                   help="a recipe YAML (its prune:/quant:/mutual: sections), then overrides")
    g.add_argument("--pruners", help="comma-separated pruning criteria (default l1,fpgm,hrank)")
    g.add_argument("--quantizers", help="comma-separated quantizers (default dorefa,pact,lsq)")
    g.add_argument("--out", help="grid folder (default runs/grid-<recipe>-<time>); run again to resume")
    g.add_argument("--seeds", nargs="+", metavar="N",
                   help="one whole grid per seed in OUT/seed<N>/, then OUT/summary.{json,md,png} over the seeds "
                        "(each control counted once: one per pruner, one per quantizer); run again to resume")
    g.add_argument("--threads", metavar="N", help="torch threads per process (torch.set_num_threads), "
                                                  "set before any work")
    g.set_defaults(fn=cmd_grid)

    pr = sub.add_parser("profile", help="per-layer and total params, MACs, BOPs and bytes of a model")
    pr.add_argument("model", help="a registered model's name, or a model file (models/*.safetensors, or a packed "
                                  "export): profiled as trained, at its dataset's input size and its layers' bits")
    pr.add_argument("--input-size", type=int, default=None, help="default 32; a model file: its dataset's size")
    pr.add_argument("--in-channels", type=int, default=None, help="default 3; a model file: its own")
    pr.add_argument("--num-classes", type=int, default=10)
    pr.add_argument("--w-bits", type=int, default=32)
    pr.add_argument("--a-bits", type=int, default=32)
    pr.add_argument("--first-last-bits", type=int, default=None,
                    help="bits of the first conv and last linear layer (default: same as the others)")
    pr.add_argument("--data-root", help="a model file's dataset location, if it moved since training")
    _factory_option(pr)
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--latency", action="store_true",
                    help="also measure inference latency on this CPU: eager and onnxruntime, batch 1 and "
                         "--latency-batch (use --threads to set the threads)")
    pr.add_argument("--latency-batch", type=int, default=32)
    pr.add_argument("--threads", metavar="N", help="torch and onnxruntime threads for --latency")
    pr.set_defaults(fn=cmd_profile)

    ls = sub.add_parser("list", help="list models, datasets and methods")
    ls.set_defaults(fn=cmd_list)

    ev = sub.add_parser("eval", help="test accuracy of a saved model file or of every model in a run folder")
    ev.add_argument("checkpoint", help="a models/*.safetensors file, a packed export (export/*.packed.safetensors) "
                                       "or a run folder")
    ev.add_argument("--data-root", help="dataset location, if it moved since training")
    _factory_option(ev)
    ev.add_argument("--device", default="auto")
    ev.set_defaults(fn=cmd_eval)

    ex = sub.add_parser("export", help="export every model of a run folder (or one model file) to int8 ONNX "
                                       "or to safetensors with bit-packed weights, checked on the test set")
    ex.add_argument("target", metavar="RUN_DIR", help="a run folder or a models/*.safetensors file")
    ex.add_argument("--format", choices=["onnx", "safetensors"], default="onnx")
    ex.add_argument("--out", help="output folder (default RUN_DIR/export)")
    ex.add_argument("--data-root", help="dataset location, if it moved since training")
    _factory_option(ex)
    ex.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime",
                    help="run the ONNX check in this runtime (openvino: pip install openvino; CPU, f32 precision "
                         "hint, recorded in export-onnx.json)")
    ex.add_argument("--allow-mismatch", action="store_true",
                    help="keep an ONNX file that onnxruntime runs differently from PyTorch (same prediction on "
                         "< 99%% of the test images) and exit 0; without it such a file is removed and the exit "
                         "status is 1")
    ex.set_defaults(fn=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = build_parser().parse_args(argv)
    ns.argv = argv
    try:
        return ns.fn(ns)
    except TandemError as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
