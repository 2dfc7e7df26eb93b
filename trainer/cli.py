"""`rectok` command line: train, submit, sweep, eval, report, profile, data write-ffcv, cache-latents, sample,
export, import-official, info, config, demo."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights are local files; never wait on a hub


def _train(args) -> int:
    """Under torchrun every process runs this; the world comes from the launcher's environment."""
    import torch.distributed as dist

    from .config import load_config
    from .distributed import env_from_launcher
    from .loop import Trainer
    from .preemption import StopRequest
    env = env_from_launcher()
    stop = StopRequest().install()  # USR2 / TERM (sbatch --signal, scancel, torchrun passing TERM on): save, stop
    try:
        result = Trainer(load_config(args.config, args.overrides, env.world), env, stop).fit()  # files checked first
    finally:
        stop.uninstall()
        if dist.is_initialized():
            dist.destroy_process_group()
    if env.main:
        print(json.dumps({k: v for k, v in result.items() if k not in ("last_train", "at_start")}, indent=2))
    return 0


def _export(args) -> int:
    if args.official:
        from .official import export_official
        print(json.dumps(export_official(args.checkpoint, args.out), indent=2))
        return 0
    from .checkpoint import export_weights
    print(json.dumps(export_weights(args.checkpoint, args.out, use_ema=not args.raw), indent=2))
    return 0


def _import_official(args) -> int:
    from .official import import_official
    out = import_official(args.tokenizer, args.dit, args.guide, args.size, args.out, args.tokenizer_config,
                          args.dit_config, args.guide_config, args.overrides, args.trust_pickle, args.force)
    print(json.dumps(out, indent=2))
    return 0


def _info(args) -> int:
    import torch
    from models import build_model
    with torch.device("meta"):  # shapes only: instant even for the full-size models
        model = build_model(args.name, latent_channels=args.latent_channels)
    print(json.dumps({"name": args.name, "latent_channels": args.latent_channels,
                      "params": model.param_counts(), "forward_flops_per_image": model.flops_per_sample()},
                     indent=2))
    return 0


def _config(args) -> int:
    from .config import config_docs, dump_config, load_config
    if args.docs:
        print(config_docs())
        return 0
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _cache_latents(args) -> int:
    from .config import ConfigError, load_config
    from .latents import cache_latents
    from .loop import resolve_device
    cfg = load_config(args.config, args.overrides)
    if cfg.task != "dit":
        raise ConfigError(f"{args.config} is a {cfg.task!r} recipe; cache-latents reads a DiT recipe "
                                f"(it names the tokenizer, the data and the cache directory)")
    out = cache_latents(cfg, resolve_device(cfg.run.device), args.batch_size, args.rank, args.world)
    print(json.dumps(out, indent=2))
    return 0


def _sample(args) -> int:
    from .sampling import sample_from_checkpoint
    labels = [int(v) for v in args.labels.split(",")] if args.labels else None
    out = sample_from_checkpoint(args.checkpoint, args.overrides, args.out, args.num_images, labels,
                                 use_ema=not args.raw)
    print(json.dumps({k: v for k, v in out.items() if k not in ("images", "labels")}, indent=2))
    return 0


def _write_ffcv(args) -> int:
    from data.ffcv_loader import report_path
    from data.ffcv_writer import write_ffcv
    report = write_ffcv(args.src, args.out, args.size, args.storage, args.quality, args.workers, args.root)
    summary = {k: v for k, v in report.items() if k not in ("skipped_files", "classes")}
    print(json.dumps({**summary, "classes": len(report["classes"] or []), "report": report_path(args.out)}, indent=2))
    return 0


# `rectok submit` flags and the config keys they set (the config tree stays the one source).
SUBMIT_FLAGS = {"nodes": int, "gpus_per_node": int, "cpus_per_task": int, "partition": str, "account": str,
                "qos": str, "constraint": str, "time_min": int}


def _submit(args) -> int:
    from slurm.submit import submit

    from .config import load_config
    overrides = [f"slurm.{k}={getattr(args, k)}" for k in SUBMIT_FLAGS if getattr(args, k) is not None]
    if args.sbatch:
        overrides.append("slurm.extra_sbatch=" + json.dumps(args.sbatch))  # JSON: values may hold commas
    if args.local:
        overrides.append("slurm.executor=local")
    cfg = load_config(args.config, list(args.overrides) + overrides)
    job = submit(cfg, args.argv)
    print(json.dumps({"job_id": str(job.job_id), "run_dir": cfg.run_dir,
                      "logs": os.path.join(cfg.run_dir, "slurm")}, indent=2))
    if args.wait:
        result = job.results()[0]  # rank 0's result
        print(json.dumps({k: v for k, v in result.items() if k not in ("last_train", "at_start")}, indent=2))
    return 0


def _eval_ref_stats(args) -> int:
    from .config import TrainConfig
    from .evaluate import reference_stats
    weights = args.inception_weights or TrainConfig().eval.inception_weights
    return _print_main(lambda: reference_stats(args.data, args.out, weights, args.loader, args.size,
                                               args.batch_size, args.device))


def _eval_out(args) -> str:
    """--out, by default the run's eval/ folder (where `rectok sweep --plot` finds the results)."""
    from .checkpoint import run_dir_of
    return args.out or os.path.join(run_dir_of(args.checkpoint), "eval")


def _eval_generator(args) -> int:
    from .evaluate import evaluate_generator
    return _print_main(lambda: evaluate_generator(args.checkpoint, args.overrides, args.num_images, _eval_out(args),
                                                  use_ema=not args.raw))


def _eval_tokenizer(args) -> int:
    from .evaluate import evaluate_tokenizer
    return _print_main(lambda: evaluate_tokenizer(args.checkpoint, args.overrides, args.num_images, _eval_out(args),
                                                  args.batch_size))


def _eval_probe(args) -> int:
    from .probe import linear_probe
    out = linear_probe(args.checkpoint, args.overrides, args.t, args.num_train, args.num_val, args.pool, args.epochs,
                       use_ema=not args.raw, out_dir=_eval_out(args))
    print(json.dumps(out, indent=2))
    return 0


def _print_main(run) -> int:
    """Run a (possibly torchrun-launched) evaluation; rank 0 prints its result."""
    import torch.distributed as dist
    try:
        out = run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(out, indent=2))
    return 0


def _report(args) -> int:
    from .report import run_report
    print(json.dumps(run_report(args.run, args.out, args.overrides, args.columns, not args.raw), indent=2))
    return 0


def _sweep(args) -> int:
    from slurm.sweep import format_table, load_sweep, submit_sweep, variant_status
    if args.plot:
        from .report import sweep_report
        print(json.dumps(sweep_report(args.sweep, args.overrides), indent=2))
        return 0
    if args.status:
        spec, variants = load_sweep(args.sweep, args.overrides)
        print(f"sweep {spec.name}: {len(variants)} variants")
        print(format_table(variant_status(variants)))
        return 0
    out = submit_sweep(args.sweep, args.overrides, args.argv, args.dry_run, args.max_running,
                       "local" if args.local else None)
    submitted = sum(r["action"] == "submit" for r in out["variants"])
    verb = "would submit" if args.dry_run else "submitted"
    print(f"sweep {out['sweep']} ({out['executor']}): {verb} {submitted} of {len(out['variants'])} variants"
          + (f" as job {out['job_ids'][0].split('_')[0]}" if out["job_ids"] and out["executor"] == "slurm" else ""))
    print(format_table(out["variants"], action=True))
    return 0


def _profile(args) -> int:
    from .profile import run_profile
    ints = lambda text: tuple(int(v) for v in text.split(","))  # noqa: E731
    run_profile(args.config, args.overrides, args.warmup, args.steps, args.trace, args.sweep, args.scaling,
                ints(args.gpus), args.gpus_per_node, args.intra_gbps, args.inter_gbps, ints(args.epochs), args.json)
    return 0


def _demo(args) -> int:
    from .demo import run_demo
    run_demo(os.path.abspath(args.output_dir), args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rectok", description="RecTok tokenizer and DiT^DH trainer")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a recipe: rectok train CONFIG [key=value ...]")
    t.add_argument("config", help="YAML recipe path or bundled name (e.g. rectok/tiny_stage1)")
    t.add_argument("overrides", nargs="*", help="dotted overrides such as optim.base_lr=2e-4")
    t.set_defaults(fn=_train)
    data = sub.add_parser("data", help="dataset preparation").add_subparsers(dest="data_command", required=True)
    w = data.add_parser("write-ffcv", help="an image folder or list file -> an FFCV .beton of ADM centre crops")
    w.add_argument("--src", required=True,
                   help="a split folder (<synset>/<image>, labels in sorted-synset order) or a list file of "
                        "'<relative path> <label>' lines")
    w.add_argument("--out", required=True, help="output .beton (written to a temporary file, renamed when complete)")
    w.add_argument("--size", type=int, default=256, help="output resolution of the ADM centre crop")
    w.add_argument("--storage", choices=("jpeg", "raw"), default="jpeg", help="JPEG (about 8x smaller) or raw pixels")
    w.add_argument("--quality", type=int, default=95, help="JPEG quality")
    w.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    w.add_argument("--root", default=None, help="list files: the folder paths are relative to (default: the list's)")
    w.set_defaults(fn=_write_ffcv)
    sb = sub.add_parser("submit", help="one training run as a Slurm job (or local processes without Slurm)")
    sb.add_argument("config", help="YAML recipe path or bundled name")
    sb.add_argument("overrides", nargs="*", help="dotted overrides, slurm.* included")
    for key, kind in SUBMIT_FLAGS.items():
        sb.add_argument("--" + key.replace("_", "-").replace("time-min", "time"), dest=key, type=kind,
                        help=f"sets slurm.{key}")
    sb.add_argument("--sbatch", action="append", default=[], help="extra sbatch option key=value (repeatable)")
    sb.add_argument("--local", action="store_true", help="run as local processes even where Slurm is")
    sb.add_argument("--wait", action="store_true", help="wait for the job and print rank 0's result")
    sb.set_defaults(fn=_submit)
    sw = sub.add_parser("sweep", help="the variants of a sweep file as one Slurm array job; --status, --dry-run")
    sw.add_argument("sweep", help="sweep YAML path or bundled name (e.g. sweeps/latent_dims)")
    sw.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant")
    sw.add_argument("--status", action="store_true", help="print each variant's state, step, metrics and run dir")
    sw.add_argument("--dry-run", action="store_true", help="resolve and validate every variant; submit nothing")
    sw.add_argument("--max-running", type=int, default=None, help="array tasks at once (default: the file's)")
    sw.add_argument("--local", action="store_true", help="run as local processes even where Slurm is")
    sw.add_argument("--plot", action="store_true", help="PNGs of the variants' metrics against the sweep's setting "
                    "and of their tracked evaluation against epochs, in the sweep folder")
    sw.set_defaults(fn=_sweep)
    ev = sub.add_parser("eval", help="evaluation by the paper's protocol").add_subparsers(dest="eval_command",
                                                                                      required=True)
    rs = ev.add_parser("ref-stats", help="FID reference statistics (.npz: mu, sigma, features) of a dataset")
    rs.add_argument("--data", required=True, help="a .beton (--loader ffcv) or an image folder / list file (pil)")
    rs.add_argument("--out", required=True, help="output .npz")
    rs.add_argument("--loader", choices=("ffcv", "pil"), default="ffcv")
    rs.add_argument("--size", type=int, default=256, help="image size (the ADM centre crop for pil)")
    rs.add_argument("--inception-weights", default=None, help="local Inception-v3 file (default: eval.inception_weights)")
    rs.add_argument("--batch-size", type=int, default=100)
    rs.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    rs.set_defaults(fn=_eval_ref_stats)
    eg = ev.add_parser("generator", help="gFID, IS, precision and recall of a DiT checkpoint's samples")
    eg.add_argument("checkpoint", help="DiT run directory or checkpoint directory")
    eg.add_argument("overrides", nargs="*", help="e.g. eval.reference=REF.npz sample.guidance=cfg sample.scale=1.5")
    eg.add_argument("--num-images", type=int, default=50_000, help="samples, balanced over the classes")
    eg.add_argument("--out", default=None, help="folder for eval_generator.json (default: RUN/eval)")
    eg.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    eg.set_defaults(fn=_eval_generator)
    et = ev.add_parser("tokenizer", help="rFID and PSNR of a tokenizer's reconstructions (raw and EMA weights)")
    et.add_argument("checkpoint", help="tokenizer run directory or checkpoint directory")
    et.add_argument("overrides", nargs="*", help="e.g. eval.reference=VAL.npz data.val=VAL.beton")
    et.add_argument("--num-images", type=int, default=0, help="N validation images spread over the classes (0 = all)")
    et.add_argument("--out", default=None, help="folder for eval_tokenizer.json (default: RUN/eval)")
    et.add_argument("--batch-size", type=int, default=50)
    et.set_defaults(fn=_eval_tokenizer)
    ep = ev.add_parser("probe", help="top-1 of linear probes on a tokenizer's latents and on the noised x_t")
    ep.add_argument("checkpoint", help="tokenizer run directory or checkpoint directory")
    ep.add_argument("overrides", nargs="*", help="e.g. data.train=... data.val=...")
    ep.add_argument("--t", type=float, default=0.5, help="flow time of x_t (1 = data, 0 = noise)")
    ep.add_argument("--pool", choices=("mean", "flatten"), default="mean", help="features: pooled or all tokens")
    ep.add_argument("--num-train", type=int, default=0, help="N training images spread over the classes (0 = all)")
    ep.add_argument("--num-val", type=int, default=0, help="N validation images spread over the classes (0 = all)")
    ep.add_argument("--epochs", type=int, default=100)
    ep.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    ep.add_argument("--out", default=None, help="folder for eval_probe.json (default: RUN/eval)")
    ep.set_defaults(fn=_eval_probe)
    rp = sub.add_parser("report", help="the pictures of a tokenizer or DiT run, as PNGs in RUN/pictures")
    rp.add_argument("run", help="run directory or checkpoint directory")
    rp.add_argument("overrides", nargs="*", help="e.g. data.val=VAL.beton sample.steps=50 sample.guidance=autoguidance")
    rp.add_argument("--out", default=None, help="folder for the PNGs (default: RUN/pictures)")
    rp.add_argument("--columns", type=int, default=0, help="images (tokenizer, 8) or classes (DiT, 10) per row")
    rp.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    rp.set_defaults(fn=_report)
    cl = sub.add_parser("cache-latents", help="encode a dataset once into a latent cache for DiT training")
    cl.add_argument("config", help="the DiT recipe (it names dit.tokenizer, data and dit.cache_dir)")
    cl.add_argument("overrides", nargs="*")
    cl.add_argument("--batch-size", type=int, default=64, help="images per encoder forward pass")
    cl.add_argument("--rank", type=int, default=0, help="this worker's share of the shards (shard %% world)")
    cl.add_argument("--world", type=int, default=1, help="number of workers writing the cache together")
    cl.set_defaults(fn=_cache_latents)
    s = sub.add_parser("sample", help="images from a DiT checkpoint: PNGs and samples.npz")
    s.add_argument("checkpoint", help="DiT run directory, checkpoint directory or state file")
    s.add_argument("overrides", nargs="*", help="e.g. sample.guidance=cfg sample.scale=1.5 sample.steps=150")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--num-images", type=int, default=50, help="images, class i mod K for image i")
    s.add_argument("--labels", help="comma-separated class labels instead (one image each)")
    s.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    s.set_defaults(fn=_sample)
    e = sub.add_parser("export", help="one consolidated safetensors file of a checkpoint's EMA weights, or "
                       "--official: raw and EMA weights in the released code's layout")
    e.add_argument("checkpoint", help="run directory or checkpoint directory (any strategy, any world size)")
    e.add_argument("--out", required=True, help="output .safetensors file (--official: .pth)")
    e.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    e.add_argument("--official", action="store_true", help="a .pth with `model` and `model_ema` in the released "
                   "RecTok / DiT^DH key layout (SPEC 7)")
    e.set_defaults(fn=_export)
    io = sub.add_parser("import-official", help="the released RecTok / DiT^DH files -> runs that sample, evaluate "
                        "and start training like ours")
    io.add_argument("overrides", nargs="*", help="applied to every imported run's config (e.g. data.train=... "
                    "dit.tokenizer=RUN for a DiT whose tokenizer was imported before)")
    io.add_argument("--tokenizer", help="RecTok.pth (stage 1) or RecTok_decft.pth (decoder fine-tuned)")
    io.add_argument("--dit", help="a DiT^DH file (e.g. DiT^DH-XL after 80 or 600 epochs)")
    io.add_argument("--size", help="--dit's size (S, B, L, XL): read from the file when left out, checked when given")
    io.add_argument("--guide", help="the 30-epoch DiT^DH-S: imported too; the --dit run then samples with "
                    "AutoGuidance by it at w = 1.29")
    io.add_argument("--out", default="runs/official", help="folder of the imported runs, one per file, named after it")
    io.add_argument("--tokenizer-config", help="recipe for the tokenizer run (default: rectok/stage1_d128 for a "
                    "file with its semantic decoder, else rectok/stage2_decoder_ft)")
    io.add_argument("--dit-config", help="recipe for the DiT run (default: dit/ditdh_<size>)")
    io.add_argument("--guide-config", help="recipe for the guide run (default: dit/ditdh_s_guide_30ep)")
    io.add_argument("--trust-pickle", action="store_true", help="load files that pickle Python objects besides "
                    "tensors (unpickling can run code: only for files you trust)")
    io.add_argument("--force", action="store_true", help="replace the checkpoints of runs imported before")
    io.set_defaults(fn=_import_official)
    i = sub.add_parser("info", help="parameter counts and forward FLOPs of a registered model (JSON)")
    i.add_argument("name")
    i.add_argument("--latent-channels", type=int, default=128)
    i.set_defaults(fn=_info)
    c = sub.add_parser("config", help="print the resolved config, or --docs for every key")
    c.add_argument("config", nargs="?")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--docs", action="store_true")
    c.set_defaults(fn=_config)
    pf = sub.add_parser("profile", help="img/s, MFU, step split and memory of a recipe's training step on this "
                        "machine (synthetic data by default)")
    pf.add_argument("config", help="YAML recipe path or bundled name (e.g. dit/ditdh_xl)")
    pf.add_argument("overrides", nargs="*", help="e.g. data.global_batch=256 parallel.compile=true")
    pf.add_argument("--warmup", type=int, default=3, help="steps before timing (compilation, allocator)")
    pf.add_argument("--steps", type=int, default=10, help="timed steps")
    pf.add_argument("--trace", default=None, help="folder for a torch.profiler trace of 3 more steps")
    pf.add_argument("--sweep", default=None, help="KEY=V1,V2,...: one row per value (batch = data.global_batch)")
    pf.add_argument("--scaling", action="store_true", help="predicted img/s and training time on N GPUs")
    pf.add_argument("--gpus", default="8,32,256", help="--scaling: GPU counts")
    pf.add_argument("--gpus-per-node", type=int, default=8, help="--scaling: GPUs sharing NVLink")
    pf.add_argument("--intra-gbps", type=float, default=0.0, help="--scaling: all-reduce bus GB/s within a node "
                    "(default: measured on this group under torchrun, else 350)")
    pf.add_argument("--inter-gbps", type=float, default=0.0, help="--scaling: all-reduce bus GB/s across nodes "
                    "(default: measured on this group under torchrun, else 40)")
    pf.add_argument("--epochs", default="80,600", help="--scaling: training lengths to time")
    pf.add_argument("--json", default=None, help="also write the rows to this JSON file")
    pf.set_defaults(fn=_profile)
    d = sub.add_parser("demo", help="the whole pipeline at toy size on the default dataset (CPU, minutes)")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("overrides", nargs="*")
    d.set_defaults(fn=_demo)
    return p


def configure_logging(main_rank: bool) -> None:
    """INFO from rank 0, warnings from the others (rank 0 speaks for all)."""
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    configure_logging(int(os.environ.get("RANK", 0)) == 0)  # under torchrun, RANK is set
    parser = build_parser()
    # Dotted overrides may follow options (`rectok sample RUN --out D sample.steps=50`): argparse leaves
    # them unparsed, so they are collected here; anything else unknown is still an error.
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded with each submission
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    from .config_tree import ConfigError
    from data import DataError
    from models.official import OfficialLayoutError
    from models.weights import MissingWeightsError, UnreadableWeightsError

    from .latents import ForeignCacheError
    try:
        return args.fn(args)
    except (ConfigError, DataError, MissingWeightsError, UnreadableWeightsError, OfficialLayoutError,
            FileNotFoundError, ForeignCacheError) as e:
        print(f"rectok: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
