"""What every recipe shares: the flags, the run directory, running a stage, and the comparison report.

A recipe is a plain Python file that builds `StageConfig`s and objectives and calls `Run.stage(...)` for each stage
of each arm; this module keeps the recipes free of plumbing. Every recipe also runs under torchrun
(`torchrun --nproc_per_node=N recipes/<name>.py ...`): `parse_flags` joins the process group and picks this rank's
GPU, and rank 0 prints and writes the run's files. Shared flags only (STYLE.md):

    --out DIR        run directory (resolved config, identity, logs, grids, checkpoints, results.json); rerun the
                     same command to resume — a rerun with other settings or inputs is refused (docs/runs.md)
    --data PATH      dataset (EDM zip/folder) for recipes that need one
    --teacher PATH   EDM/ECT/CMT/EDM2 teacher .pkl for recipes that need one
    --weights DIR    pretrained files by their published names (teacher, guide, VGG16, Inception, DINOv2, VAE,
                     reference statistics); --teacher and the ENGINE_* variables override (engine/checkpoints/files.py)
    --kimg-scale X   multiplies every stage's budget (and its intervals)
    --device DEV     cpu | cuda | cuda:N (default: cuda if available)
    --seed N         the run's seed; a CPU run is deterministic for a given seed
    --smoke          a few iterations of everything on tiny networks / synthetic data (what CI runs)
    --dry-run        print and save the resolved configuration, train nothing
    --profile-steps N  time the phases of N steps of each stage into its log.jsonl (engine/training/step_profile.py)

One process runs in a directory at a time: the run holds an advisory lock on `<out>/run.lock` (fcntl.flock, rank 0
under torchrun) from its first write to its end, and the kernel drops it when the process dies; a second run into
the same --out is refused, naming the holder's pid (engine/pipelines/run_directory.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os

import torch

from engine import dist
from engine.checkpoints.edm_snapshots import TEACHER_ONLY_KEYS
from engine.checkpoints.files import atomic_write, set_weights_dir, short_list
from engine.checkpoints.identity import VERSION as IDENTITY_VERSION
from engine.checkpoints.identity import (IdentityMismatch, check_or_record, compare, dataset_fingerprint,
                                         file_fingerprint, plain, write_identity)
from engine.checks import SEED_LIMIT, nonneg_int_arg, positive_float_arg, positive_int_arg, seed_arg
from engine.cli import check_run_directory, resolve_device
from engine.errors import EngineError
from engine.pipelines.run_directory import (check_not_in_use, check_stage_directory, lock_run_directory, run_contents,
                                            unlock_run_directory)
from engine.training.loop import StageResult, initialise, train_stage
from engine.training.stage_config import StageConfig


def parse_flags(doc: str, argv=None, default_out: str = "runs/recipe", extra: dict | None = None) -> argparse.Namespace:
    """The recipes' shared flags, and a recipe's own `extra` ({flag: add_argument keywords})."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kw in (extra or {}).items():
        ap.add_argument(flag, **kw)
    ap.add_argument("--out", default=default_out, help=f"run directory (default {default_out})")
    ap.add_argument("--data", default=None, help="dataset zip/folder in EDM's format")
    ap.add_argument("--teacher", default=None, help="teacher checkpoint (.pkl from EDM/ECT/CMT/EDM2)")
    ap.add_argument("--weights", default=None, metavar="DIR",
                    help="directory of pretrained files under their published names; per-file flags and ENGINE_* "
                         "variables override")
    ap.add_argument("--kimg-scale", type=positive_float_arg, default=1.0, help="multiply every stage's budget")
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    ap.add_argument("--seed", type=seed_arg, default=0)
    ap.add_argument("--seeds", type=positive_int_arg, default=None, metavar="N",
                    help="repeat over seeds --seed … --seed + N − 1 (recipes that report seed statistics; their "
                         "default otherwise)")
    ap.add_argument("--smoke", action="store_true", help="tiny end-to-end run (CI)")
    ap.add_argument("--dry-run", action="store_true", help="print and save the resolved config; train nothing")
    ap.add_argument("--profile-steps", type=nonneg_int_arg, default=0, metavar="N",
                    help="time the phases of N steps of each stage (after its first) — data, teacher, forward, "
                         "backward, optimizer, EMA — into its log.jsonl (engine/training/step_profile.py); "
                         "the results do not change")
    ap.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                    help="torch.compile every block of the student and teachers (default mode, or "
                         "max-autotune-no-cudagraphs / aot_eager; engine/training/compiled.py); results equal eager "
                         "within "
                         "float tolerance, and a run may change it between reruns")
    args = ap.parse_args(argv)
    if args.seeds is not None and args.seed + args.seeds - 1 >= SEED_LIMIT:
        ap.error(f"--seed {args.seed} --seeds {args.seeds}: the last seed, {args.seed + args.seeds - 1}, is beyond "
                 "2**64 − 1 (torch's generators take 64-bit seeds)")
    # under torchrun: join the process group; each rank trains on its own GPU (cuda:LOCAL_RANK)
    local = dist.init()
    try:
        args.device = resolve_device(args.device)
        check_run_directory(args.out)
        set_weights_dir(args.weights)
    except EngineError as e:
        ap.error(str(e))
    if dist.is_distributed() and args.device == "cuda":
        args.device = str(local)
    return args


def begin(doc: str, name: str, config, smoke, argv=None):
    """What every recipe's `main` starts with: the shared flags, the full or (`--smoke`) reduced configuration,
    the run directory (its identity checked against a previous run's before anything is written), then torch's
    global generator seeded with `--seed`. Returns (args, cfg, run), or None after a `--dry-run` has printed and
    saved the configuration."""
    args = parse_flags(doc, argv, default_out=f"runs/{name}")
    cfg = smoke(config) if args.smoke else config
    run = Run(args, name, cfg)
    if args.dry_run:
        run.record(identity=False)
        return None
    torch.manual_seed(args.seed)
    return args, cfg, run


def scaled(cfg: StageConfig, factor: float) -> StageConfig:
    """The stage with budget and intervals multiplied by `factor` (--kimg-scale)."""
    if factor == 1.0:
        return cfg
    scale = lambda v: None if v is None else v * factor
    return dataclasses.replace(cfg, total_kimg=cfg.total_kimg * factor, log_kimg=scale(cfg.log_kimg),
                               ckpt_kimg=scale(cfg.ckpt_kimg), eval_kimg=scale(cfg.eval_kimg),
                               snapshot_kimg=scale(cfg.snapshot_kimg),
                               lr_ref_kimg=cfg.lr_ref_kimg * factor, lr_rampup_kimg=cfg.lr_rampup_kimg * factor,
                               ema_continue_kimg=cfg.ema_continue_kimg * factor)


FLAG_DEFAULTS = dict(seed=0, smoke=False, kimg_scale=1.0, seeds=None)


class Run:
    """A run directory shared by the stages of one or more arms.

    Its identity — recipe, resolved configuration, the flags that change the result, fingerprints of the input
    files (`--data`, `--teacher`, and `inputs`) — is compared with the one recorded in the directory when the run
    is created, so a rerun with other settings or inputs is refused before it writes anything; a new run's
    config.json and identity.json are written when its first stage starts (engine/checkpoints/identity.py, docs/runs.md).

    Check first, write after, whatever is missing: a directory that holds a run's files (trained stages, results)
    but no identity.json is checked against what is there — its config.json's recipe, configuration and flags now,
    and each stage, before the run writes anything, against the stage's identity.json or, without one, the
    identity its checkpoints were written for — and refused with a line saying how to go on when nothing there can
    vouch for it; it never adopts the new command's settings."""

    def __init__(self, args: argparse.Namespace, recipe: str, config, inputs: dict | None = None):
        self.args, self.recipe, self.out = args, recipe, args.out
        self.device = torch.device(args.device)
        self.lead = dist.rank() == 0  # under torchrun rank 0 prints and writes the run's files
        defaults = {}
        if dataclasses.is_dataclass(config):
            defaults = {f.name: f.default for f in dataclasses.fields(config)
                        if f.default is not dataclasses.MISSING}
            config = dataclasses.asdict(config)
        files = {k: getattr(args, k, None) for k in ("data", "teacher")}
        files.update(inputs or {})
        self.identity = dict(recipe=recipe, config=config,
                             flags=dict(seed=args.seed, smoke=bool(args.smoke), kimg_scale=args.kimg_scale,
                                        device_type=self.device.type, seeds=getattr(args, "seeds", None)),
                             inputs={k: _fingerprint(k, v) for k, v in files.items() if v is not None})
        self._defaults = dict(config=defaults, flags=FLAG_DEFAULTS)
        self._identity_file = os.path.join(self.out, "identity.json")
        self._hint = f"Use another --out directory, or move {self.out} away"
        self._resolved = json.dumps(dict(recipe=recipe, flags=vars(args), world_size=dist.world_size(),
                                         config=config), indent=1, default=_jsonable)
        self._locked = False
        self._check_directory()
        if self.lead:
            print(f"[{recipe}] resolved configuration:\n{self._resolved}", flush=True)
        self.results: dict = {"recipe": recipe, "runs": {}}

    def _check_directory(self) -> None:
        """The run's identity against the one its directory records; without one, against the config.json of the
        run files the directory holds (the class docstring). Reads only."""
        check_or_record(self._identity_file, self.identity, f"run {self.recipe!r}", defaults=self._defaults,
                        record=False, hint=self._hint)
        self._recorded = os.path.exists(self._identity_file)
        held = [] if self._recorded else run_contents(self.out)
        if not held:
            return
        path = os.path.join(self.out, "config.json")
        what = f"--out {self.out} holds a run ({short_list(held, 3)}) but no identity.json"
        if not os.path.isfile(path):
            raise IdentityMismatch(f"{what} or config.json recording its settings, so this command cannot be "
                                   f"checked against it; restore {self._identity_file}, or use another --out "
                                   f"directory (or move {self.out} away)")
        try:
            with open(path, encoding="utf-8") as f:
                recorded = _settings(json.load(f))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
            raise IdentityMismatch(f"{what}, and its config.json cannot be read ({type(e).__name__}: {e}); restore "
                                   f"{self._identity_file}, or use another --out directory (or move {self.out} "
                                   f"away)") from None
        defaults = plain(json.loads(json.dumps(self._defaults, default=_jsonable)))
        diff = compare(recorded, _settings(json.loads(self._resolved)), defaults)
        if diff:
            raise IdentityMismatch(f"run {self.recipe!r} in {self.out} was started with other settings or inputs; "
                                   f"refusing to resume it with: " + "; ".join(diff) + " (its identity.json is "
                                   "missing: checked against its config.json). " + self._hint)

    def _scaled(self, cfg: StageConfig) -> StageConfig:
        """The stage as this run trains it: budget and intervals × --kimg-scale, --compile."""
        cfg = scaled(cfg, self.args.kimg_scale)
        if getattr(self.args, "compile", None):
            cfg = dataclasses.replace(cfg, compile=self.args.compile)
        return cfg

    def steps(self, cfg: StageConfig) -> int:
        """How many steps stage `cfg` trains at this run's --kimg-scale (`StageConfig.steps`)."""
        return self._scaled(cfg).steps()

    def plan(self, *cfgs: StageConfig) -> None:
        """Check every stage's budget at this run's --kimg-scale (`StageConfig.budget`: at least one step, and the
        scaled settings' own checks) before the first stage trains, so that a scale too small for a later stage
        only is refused before anything is trained or written — not after the first stage, when a rerun with a
        larger scale would be refused as another run. Recipes pass all their stages' configurations here."""
        for cfg in cfgs:
            self._scaled(cfg).budget()

    def record(self, identity: bool = True) -> None:
        """Write config.json and (for a new run) identity.json: once, when the first stage starts — after taking
        the directory's lock and checking the directory again under it (another run may have written it since).
        A dry run writes only config.json, so it commits the directory to nothing, and takes no lock (it is
        refused while another process holds it). Under torchrun rank 0 does this; every rank raises its error."""
        error = None
        if self.lead:
            try:
                os.makedirs(self.out, exist_ok=True)
                if identity and not self._locked:
                    lock_run_directory(self.out)
                    self._locked = True
                    self._check_directory()
                elif not identity:
                    check_not_in_use(self.out)
                atomic_write(os.path.join(self.out, "config.json"), lambda f: f.write(self._resolved.encode()))
                if identity and not self._recorded:
                    write_identity(self._identity_file, {"version": IDENTITY_VERSION, **plain(self.identity)})
            except OSError as e:
                error = EngineError(f"--out {self.out}: cannot write the run directory ({e.strerror or e})")
            except EngineError as e:
                error = e
        message = dist.broadcast_object(None if error is None else str(error))   # every rank stops, not only 0
        if error is not None:
            self.release()
            raise error
        if message is not None:
            raise EngineError(message)
        self._recorded = self._recorded or identity

    def release(self) -> None:
        """Give the directory's lock back (at the end of the run; process death does it too)."""
        if self._locked:
            unlock_run_directory(self.out)
            self._locked = False

    def stage(self, arm: str, kind: str, cfg: StageConfig, net, objective, data, init=None, evaluate=None,
              grid=None, shared_by: tuple[str, ...] = ()) -> StageResult:
        """Initialise `net` from `init` (None = random, a module = copy weights), train it under `<out>/<arm>/`,
        and record it as stage `kind` ('pre' | 'mid' | 'post') of `arm` — or, for a stage several arms start
        from (the pre-trained teacher), of every arm in `shared_by`. Before anything is written: the budget, and
        a stage whose directory holds results the run's identity does not vouch for (the class docstring)."""
        cfg = self._scaled(cfg)
        cfg.budget()   # at least one step, checked before the run directory is written
        net = initialise(net, init, ignore=TEACHER_ONLY_KEYS).to(self.device)
        stage_dir = os.path.join(self.out, arm, cfg.name)
        if not self._recorded or not os.path.isfile(os.path.join(stage_dir, "identity.json")):
            check_stage_directory(stage_dir, cfg, net, objective, data)
        self.record()
        try:
            res = train_stage(cfg, net, objective, data, os.path.join(self.out, arm), self.device,
                              evaluate=evaluate, grid=grid, profile_steps=getattr(self.args, "profile_steps", 0))
        except BaseException:
            self.release()   # the run ends here (an error, or a signal's checkpoint and exit)
            raise
        for a in shared_by or (arm,):
            entry = self.results["runs"].setdefault(a, {"kimg": {}, "wall_s": 0.0, "stages": {}})
            entry["kimg"][kind] = res.pairs_seen / 1000
            entry["wall_s"] += res.wall_s
            entry["stages"][kind] = dict(name=cfg.name, kimg=res.pairs_seen / 1000, wall_s=res.wall_s,
                                         counters=res.counters, eval_history=res.eval_history)
        return res

    def record_metrics(self, arm: str, one_step: dict, two_step: dict) -> None:
        self.results["runs"][arm]["one_step"] = one_step
        self.results["runs"][arm]["two_step"] = two_step

    def finish(self, metric_keys: list[str], plot_keys: list[str]) -> dict:
        """Print the comparison table (`metric_keys` of one_step/two_step), write results.json and the plot of
        the evaluation records' `plot_keys` against kimg."""
        self.record()
        runs = self.results["runs"]
        table = format_table(runs, metric_keys)
        self.results["table"] = table
        if self.lead:
            print(table, flush=True)
            text = json.dumps(self.results, indent=1, default=_jsonable)
            atomic_write(os.path.join(self.out, "results.json"), lambda f: f.write(text.encode()))
            if plot_keys:
                plot_history(runs, plot_keys, os.path.join(self.out, "metrics_vs_kimg.png"))
        dist.barrier()
        self.release()
        return self.results


def missing_input(flag: str, path: str | None, what: str) -> str | None:
    """The line naming one missing input file — the flag (or file name), what it is and where it comes from, and
    the path tried — or None when `path` exists. Recipes collect these and pass them to `stop_if_missing`."""
    if path and os.path.exists(path):
        return None
    return f"{flag}: {what}" + (f" — not found: {path}" if path else "")


def stop_if_missing(recipe: str, lines, hint: str = "") -> None:
    """Stop before anything is written when inputs are missing: one message, one line per missing input (what it
    is, where it comes from), then `hint` and the way to a synthetic run. The one form every recipe uses."""
    lines = [line for line in lines if line]
    if lines:
        raise SystemExit(f"{recipe} needs:\n  " + "\n  ".join(lines) + (f"\n{hint}" if hint else "")
                         + "\nRun with --smoke for a synthetic end-to-end check.")


def check_fid_inputs(device) -> None:
    """Stop before training when the closing FID's detector and statistics are given but do not fit each other
    (unreadable detector, statistics without or with another preprocessing): engine.evaluate.recipe_fid_inputs."""
    from engine.evaluate import recipe_fid_inputs
    try:
        recipe_fid_inputs(device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"the closing FID cannot be computed: {e}") from None


def format_table(runs: dict, metric_keys: list[str]) -> str:
    head = ["arm", *[f"1-step {k}" for k in metric_keys], *[f"2-step {k}" for k in metric_keys],
            "kimg pre/mid/post", "wall s"]
    rows = []
    for arm, r in runs.items():
        k = r.get("kimg", {})
        rows.append([arm, *[_fmt(r.get("one_step", {}).get(m)) for m in metric_keys],
                     *[_fmt(r.get("two_step", {}).get(m)) for m in metric_keys],
                     "/".join(_fmt(k.get(s, 0.0), 4) for s in ("pre", "mid", "post")), f"{r.get('wall_s', 0):.0f}"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def plot_history(runs: dict, metric_keys: list[str], path: str) -> None:
    """Metric against cumulative kimg (pre-training excluded) for every arm, one panel per metric."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metric_keys), figsize=(5 * len(metric_keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], metric_keys):
        for arm, r in runs.items():
            offset, xs, ys = 0.0, [], []
            for kind in ("mid", "post"):
                st = r.get("stages", {}).get(kind)
                if st is None:
                    continue
                for rec in st["eval_history"]:
                    if key in rec and rec[key] is not None:
                        xs.append(offset + rec["kimg"])
                        ys.append(rec[key])
                offset += st["kimg"]
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, label=arm)
        ax.set_xlabel("kimg after pre-training (mid + post)")
        ax.set_ylabel(key)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(png.getvalue()))


def _settings(resolved: dict) -> dict:
    """The part of a resolved configuration (config.json) that the run's identity holds: recipe, configuration and
    the flags that change the result."""
    flags = resolved["flags"]
    return plain(dict(recipe=resolved["recipe"], config=resolved["config"],
                      flags=dict(seed=flags["seed"], smoke=bool(flags["smoke"]), kimg_scale=flags["kimg_scale"],
                                 device_type=torch.device(flags["device"]).type, seeds=flags.get("seeds"))))


def _fingerprint(kind: str, path: str) -> dict:
    """An input file of the run: a dataset by its index (`data`), weights by their hash (anything else)."""
    if not os.path.exists(path):
        raise EngineError(f"--{kind} {path}: not found")
    if kind == "data":
        return dataset_fingerprint(path)
    if os.path.isdir(path):
        raise EngineError(f"--{kind} {path} is a directory; expected a weights file")
    return file_fingerprint(path)


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _jsonable(o):
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return str(o)
