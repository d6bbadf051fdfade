"""Recipes: ``hyprune run recipe.yaml`` runs prune -> distill -> kv -> eval -> report in one run folder.

A recipe is YAML checked against the typed schema below (`Recipe`) before anything runs: unknown
keys, wrong types and missing values are errors that name the key (``distill.lr: ...``), and the
files it names are checked next (`check_inputs`). Relative paths are taken from the current
directory, like paths on the command line.

The run folder (``output``) holds one sub-folder per stage and ``hyprune_run.json``, the record of
the run: the recipe, and per stage its fingerprint, status and result. The record is rewritten
atomically at every stage boundary, so a rerun of the same recipe skips the finished stages (and a
distillation that was cut short resumes from its last checkpoint). A stage's fingerprint hashes its
own settings, the model and load settings, the size and modification time of every input file, and
the fingerprint of the stage before it, so changing any of them invalidates that stage and every
later one. A rerun with a changed recipe is refused, naming what changed, unless ``restart`` is
given: then the changed stage and the stages after it run again and the earlier ones are kept.

    output/
      hyprune_run.json   the run record
      pruned/            the pruned checkpoint (+ its report: parameters.png, importance.png)
      distill/           the distillation run: final/ (the student), log.jsonl, report, curves
      kv/                with a `kv` section: the KV-cache retrofit of the student (`hyprune kv-compress`)
      eval/              <model>.json per evaluated model (+ reports), bench.json
      report.md/.json    the whole pipeline: a table of every model, links to the stage reports, pareto.png
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.console import Console

from hyprune import api
from hyprune.config import BenchConfig, DataConfig, EvalConfig, LoadConfig, PruneConfig, TrainData
from hyprune.data import check_source
from hyprune.distill import run_distill
from hyprune.distill.checkpoints import check_checkpoint, list_checkpoints
from hyprune.distill.train import DistillConfig
from hyprune.errors import HypruneError, validation_message
from hyprune.evaluate import bench, evaluate
from hyprune.io import atomic_write_json, check_output
from hyprune.models import load_config
from hyprune.plan import resolve_target
from hyprune.report import Report, checkpoint_parameters, plots

RUN_FILE = "hyprune_run.json"
RUN_FORMAT = "hyprune-run/1"
STAGES = ("prune", "distill", "kv", "eval", "report")
EVAL_MODELS = ("teacher", "pruned", "distilled", "compressed")


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoadSettings(LoadConfig):
    """How every model of the run is loaded (`LoadConfig`; the models are the recipe's ``model`` and its outputs)."""

    @model_validator(mode="after")
    def _no_model(self):
        if self.model is not None:
            raise ValueError("the model is the recipe's top-level `model`, not `load.model`")
        return self


class PruneStage(DataConfig, PruneConfig):
    """``hyprune prune``: every `PruneConfig` and `DataConfig` field (a width ``target`` and/or
    ``drop_blocks``, scored on ``data``). The method settings may also be given as a mapping
    ``options: {sparsity: 0.5}``, as recipes did before they were fields."""

    @model_validator(mode="before")
    @classmethod
    def _options_mapping(cls, data):
        if isinstance(data, dict) and isinstance(data.get("options"), dict):
            data = {**{k: v for k, v in data.items() if k != "options"}, **data["options"]}
        return data

    @model_validator(mode="after")
    def _something_to_cut(self):
        if not self.target and not self.drop_blocks and self.method in ("activation", "group-blind"):
            raise ValueError("nothing to prune: give a width `target` and/or `drop_blocks`")
        return self


class DistillStage(TrainData, DistillConfig):
    """``hyprune distill`` of the pruned student from the recipe's model: every `DistillConfig` field,
    plus where the text comes from (`TrainData`). ``plan`` defaults to the pruning plan when ``hidden_loss`` is set."""


class KVStage(TrainData, DistillConfig):
    """``hyprune kv-compress`` of the student (the distilled model, or the pruned one without ``distill``):
    DMC / DMS retrofitted by distillation from the student itself; every `DistillConfig` field too."""

    method: Literal["dms", "dmc"] = "dms"
    ratio: float = Field(4.0, ge=1.0, description="KV-cache compression target")
    window: int = Field(16, ge=0, description="DMS: recent tokens always kept")
    offset: float = Field(3.0, description="decision offset in units of each head's spread of k_0")
    ratio_weight: float = Field(10.0, ge=0.0)
    ramp: float = Field(0.5, gt=0.0, le=1.0)
    decisions_only: bool = False
    calibration: int = Field(8, ge=1, description="windows of `data` that standardize the decisions")


class BenchSettings(BenchConfig):
    """``hyprune bench`` of the teacher and the final student, measured in the same process (`BenchConfig`)."""

    context_lengths: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [128], min_length=1)


class EvalStage(EvalConfig):
    """``hyprune eval`` of the teacher, the pruned and the distilled model, on the same text and windows."""

    seq_len: int = Field(256, ge=2)
    num_windows: int | None = Field(128, ge=1)
    stride: int | None = Field(None, ge=1)
    shots: int | None = Field(None, ge=0)
    limit: float | None = Field(None, gt=0)
    models: list[Literal["teacher", "pruned", "distilled", "compressed"]] = Field(
        default_factory=lambda: list(EVAL_MODELS), min_length=1)
    bench: BenchSettings | None = None

    @model_validator(mode="after")
    def _something_to_measure(self):
        if self.data is None and not self.tasks:
            raise ValueError("nothing to evaluate: give `data` (perplexity) and/or `tasks`")
        return self


class Recipe(_Section):
    """A whole run: the model to compress, where the run goes, and the settings of each stage."""

    name: str
    description: str = ""
    model: str = Field(description="the teacher: a local HF folder or a hub id")
    output: str = Field(description="the run folder")
    load: LoadSettings = Field(default_factory=LoadSettings)
    prune: PruneStage
    distill: DistillStage | None = None
    kv: KVStage | None = None
    eval: EvalStage | None = None

    @model_validator(mode="after")
    def _distilled_needs_distill(self):
        if self.eval is not None:
            absent = {"distilled": self.distill is None, "compressed": self.kv is None}
            self.eval.models = [m for m in self.eval.models if not absent.get(m)]
        return self

    def stages(self) -> list[str]:
        return [s for s in STAGES if s in ("prune", "report") or getattr(self, s) is not None]


# ---------------------------------------------------------------------------------------------
# Loading and checking
# ---------------------------------------------------------------------------------------------
def _allowed_keys(loc: tuple) -> list[str]:
    """The keys the schema accepts at the section ``loc`` points into (for 'unknown key' messages)."""
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model else None
        annotation = getattr(field, "annotation", None)
        args = getattr(annotation, "__args__", (annotation,))
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return sorted(model.model_fields)


def _format_errors(source: str, error: ValidationError) -> str:
    return validation_message(f"Invalid recipe {source}", error, allowed=_allowed_keys)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """A `Recipe` from already-parsed YAML/JSON; every schema problem becomes one `HypruneError`."""
    if not isinstance(data, dict):
        raise HypruneError(f"Invalid recipe {source}: the top level must be a mapping of keys "
                           f"(name, model, output, prune, ...), got {type(data).__name__}.")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise HypruneError(_format_errors(source, e)) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (YAML or JSON). Does not look at the files it names."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise HypruneError(f"No recipe at {path}.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise HypruneError(f"{path} is not valid YAML: {e}") from None
    return parse_recipe(data, str(path))


def check_inputs(recipe: Recipe) -> None:
    """Check the model (its config loads, the target fits it) and every data file the recipe names."""
    def checked(key: str, call, *args):
        try:
            return call(*args)
        except HypruneError as e:
            raise HypruneError(f"Recipe {recipe.name}: {key}: {e}") from None

    config, family = checked("model", load_config, recipe.model, recipe.load.trust_remote_code)
    if recipe.prune.target:
        checked("prune.target", resolve_target, family, config, dict(recipe.prune.target))
    files = {"prune.data": recipe.prune.data}
    if recipe.distill is not None:
        files.update({"distill.data": recipe.distill.data, "distill.eval_data": recipe.distill.eval_data})
    if recipe.kv is not None:
        files.update({"kv.data": recipe.kv.data, "kv.eval_data": recipe.kv.eval_data})
    if recipe.eval is not None:
        files["eval.data"] = recipe.eval.data
    for key, value in files.items():
        if value is not None:
            checked(key, check_source, value)
    if (recipe.prune.target or recipe.prune.drop_blocks) and recipe.prune.data is None:
        raise HypruneError(f"Recipe {recipe.name}: prune.data: scoring needs calibration text; give a file.")
    out = Path(recipe.output).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RUN_FILE).is_file())):
        raise HypruneError(f"Recipe {recipe.name}: output: {out} exists and is not a hyprune run folder; "
                           "pick a new output folder.")
    try:
        check_output(out, "dir", inputs=(recipe.model, *files.values()), reuse=True, flag="output:")
    except HypruneError as e:
        raise HypruneError(f"Recipe {recipe.name}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Fingerprints and the run record
# ---------------------------------------------------------------------------------------------
def _file_signature(path: str | None) -> Any:
    """Size and modification time of a local file, or of every file in a local folder; None otherwise."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_file():
        return [p.stat().st_size, p.stat().st_mtime_ns]
    if p.is_dir():
        return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in p.iterdir() if f.is_file())
    return None


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# fields the stages gained when they became the workflow configs: hashed only when set, so that a run
# folder made before keeps its fingerprints
_NEW_FIELDS = {"load": ("model", "gguf_file"),
               "prune": ("scores", "plan_file", "drop_block_list", "split", "sparsity", "nm", "targets", "ratio"),
               "distill": ("split",), "eval": ("text_field", "split", "task_paths"), "bench": ("warmup", "seed")}
_METHOD_OPTIONS = ("sparsity", "nm", "targets", "ratio")


def _settings_dump(section: BaseModel, kind: str) -> dict:
    """``section.model_dump()`` without the new fields left at their defaults (see `_NEW_FIELDS`)."""
    data = section.model_dump()
    for name in _NEW_FIELDS[kind]:
        field = type(section).model_fields[name]
        if data[name] == field.get_default(call_default_factory=True):
            del data[name]
    if kind == "prune":  # the method settings were the mapping `options`
        data["options"] = {k: data.pop(k) for k in _METHOD_OPTIONS if k in data}
    if kind == "eval" and section.bench is not None:
        data["bench"] = _settings_dump(section.bench, "bench")
    return data


def _stage_settings(recipe: Recipe, stage: str) -> dict:
    """What a stage's result depends on, apart from the stage before it."""
    if stage == "prune":
        return {"model": recipe.model, "model_files": _file_signature(recipe.model),
                "load": _settings_dump(recipe.load, "load"), "prune": _settings_dump(recipe.prune, "prune"),
                "data_files": _file_signature(recipe.prune.data)}
    if stage == "distill":
        return {"distill": _settings_dump(recipe.distill, "distill"),
                "data_files": [_file_signature(recipe.distill.data), _file_signature(recipe.distill.eval_data)]}
    if stage == "kv":
        return {"kv": recipe.kv.model_dump(),
                "data_files": [_file_signature(recipe.kv.data), _file_signature(recipe.kv.eval_data)]}
    if stage == "eval":
        return {"eval": _settings_dump(recipe.eval, "eval"), "data_files": _file_signature(recipe.eval.data)}
    return {"name": recipe.name, "description": recipe.description}


def fingerprints(recipe: Recipe) -> dict[str, str]:
    """Per stage, a hash of its settings, its input files and the fingerprint of the stage before it."""
    result, previous = {}, None
    for stage in recipe.stages():
        previous = result[stage] = _hash({"previous": previous, **_stage_settings(recipe, stage)})
    return result


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


class RunRecord:
    """``hyprune_run.json``: the recipe and, per stage, fingerprint, status, seconds and result."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / RUN_FILE
        self.data = {"format": RUN_FORMAT, "recipe": None, "stages": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as e:
                raise HypruneError(f"{self.path} is damaged ({e}); delete the run folder to start over.") from None

    @property
    def stages(self) -> dict[str, dict]:
        return self.data["stages"]

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def run_status(recipe: Recipe) -> dict[str, str]:
    """Per stage, what a run of ``recipe`` would do now: ``skip`` (done and unchanged), ``resume``
    (started, unchanged), ``changed`` (done or started with other settings or inputs) or ``run``."""
    folder = Path(recipe.output).expanduser()
    stages = RunRecord(folder).stages if (folder / RUN_FILE).is_file() else {}
    prints, status, invalid = fingerprints(recipe), {}, False
    for stage in recipe.stages():
        entry = stages.get(stage)
        invalid = invalid or (entry is not None and entry["fingerprint"] != prints[stage])
        status[stage] = ("changed" if invalid and entry else "run" if entry is None or invalid else
                         "skip" if entry["status"] == "done" else "resume")
    return status


def _reconcile(record: RunRecord, recipe: Recipe, prints: dict[str, str], restart: bool) -> list[str]:
    """Drop the records of stages whose fingerprint changed (with ``restart``), else refuse; return them."""
    stale = [s for s in STAGES if s in record.stages and record.stages[s]["fingerprint"] != prints.get(s)]
    if not stale:
        return []
    first = stale[0]
    invalid = [s for s in STAGES if STAGES.index(s) >= STAGES.index(first) and s in record.stages]
    if not restart:
        old = record.data.get("recipe") or {}
        changed = _changed_keys(old, recipe.model_dump(mode="json"))
        what = (f"these settings changed: {', '.join(changed)}" if changed
                else "an input file or model changed on disk (size or modification time)")
        raise HypruneError(
            f"The run folder {record.path.parent} was made by a different recipe: {what}. Stage '{first}' and "
            f"the stages after it ({', '.join(invalid)}) no longer match. Pass --restart to run them again "
            "(finished earlier stages are kept), or pick a new output folder.")
    for stage in invalid:
        del record.stages[stage]
    return invalid


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
def run_recipe(recipe: Recipe | str | Path, restart: bool = False, progress: bool = True,
               console=None) -> "RunRecord":
    """Run (or continue) a recipe; returns the run record (also in ``output/hyprune_run.json``)."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    console = console or Console(stderr=True)
    check_inputs(recipe)
    out = Path(recipe.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    record = RunRecord(out)
    prints = fingerprints(recipe)
    for stage in _reconcile(record, recipe, prints, restart):
        console.print(f"recipe changed: stage {stage} runs again")
    record.data["recipe"] = recipe.model_dump(mode="json")
    record.save()
    runners = {"prune": _prune, "distill": _distill, "kv": _kv, "eval": _eval, "report": _report}
    for stage in recipe.stages():
        entry = record.stages.get(stage)
        if entry and entry["status"] == "done":
            console.print(f"stage {stage}: already done ({entry['seconds']:.0f} s): skipped")
            continue
        resuming = bool(entry) and entry["status"] == "running"
        console.print(f"stage {stage}: {'resuming' if resuming else 'running'}")
        record.stages[stage] = {"fingerprint": prints[stage], "status": "running", "seconds": 0.0}
        record.save()
        start = time.perf_counter()
        result = runners[stage](recipe, out, record, progress=progress, resuming=resuming)
        record.stages[stage] = {"fingerprint": prints[stage], "status": "done",
                                "seconds": round(time.perf_counter() - start, 1), "result": result}
        record.save()
    console.print(f"report: {out / 'report.md'}")
    return record


def _student(out: Path, recipe: Recipe) -> Path:
    """The student's architecture and weights before KV compression: the distilled model, or the pruned
    one when the recipe does not distill."""
    return out / "distill" / "final" if recipe.distill is not None else out / "pruned"


def _prune(recipe: Recipe, out: Path, record: RunRecord, progress: bool, resuming: bool) -> dict:
    p = recipe.prune
    return api.prune(recipe.model, str(out / "pruned"), PruneConfig(**p.model_dump(include=set(PruneConfig.model_fields))),
                     calibration=DataConfig(**p.model_dump(include=set(DataConfig.model_fields))),
                     load=recipe.load.model_copy(update={"model": recipe.model}), overwrite=True, progress=progress)


def _training_kwargs(recipe: Recipe, section: DistillStage | KVStage, folder: Path, progress: bool,
                     resuming: bool) -> dict:
    """What a training stage (`run_distill`, `kv.compress`) takes besides its data, budget and output: the
    section's settings, its text fields, the load settings, and whether to resume."""
    # resume only onto a complete checkpoint: `distill --resume` refuses a folder without one
    resume = resuming and any(check_checkpoint(p, deep=False) is None
                              for _, p in list_checkpoints(folder / "checkpoints"))
    settings = section.model_dump(exclude={"data", "eval_data", "text_field", "split", "tokens", "seq_len", "batch",
                                           "progress"})
    return {"resume": resume, "eval_data": section.eval_data, "text_field": section.text_field,
            "split": section.split, "overwrite": not resume, "progress": progress,
            **recipe.load.load_kwargs(exclude=("device_map", "gguf_file")), **settings}


def _distill(recipe: Recipe, out: Path, record: RunRecord, progress: bool, resuming: bool) -> dict:
    d = recipe.distill
    kwargs = _training_kwargs(recipe, d, out / "distill", progress, resuming)
    if d.hidden_loss and d.plan is None and d.block_map is None:
        kwargs["plan"] = str(out / "pruned" / "plan.json")
    return run_distill(recipe.model, str(out / "pruned"), d.data, d.tokens, d.seq_len, d.batch, str(out / "distill"),
                       **kwargs)


def _kv(recipe: Recipe, out: Path, record: RunRecord, progress: bool, resuming: bool) -> dict:
    from hyprune.kv.compress import compress

    k = recipe.kv
    return compress(str(_student(out, recipe)), k.data, str(out / "kv"), tokens=k.tokens, seq_len=k.seq_len,
                    batch=k.batch, **_training_kwargs(recipe, k, out / "kv", progress, resuming))


def _model_folders(recipe: Recipe, out: Path) -> dict[str, Path]:
    """Where each model of the run lives (the teacher is the recipe's ``model``)."""
    return {"teacher": Path(recipe.model), "pruned": out / "pruned", "distilled": out / "distill" / "final",
            "compressed": out / "kv" / "final"}


def _eval(recipe: Recipe, out: Path, record: RunRecord, progress: bool, resuming: bool) -> dict:
    e = recipe.eval
    paths = {name: str(folder) for name, folder in _model_folders(recipe, out).items()}
    paths["teacher"] = recipe.model  # as given: a hub id is not a path
    results = {}
    for name in e.models:
        config = EvalConfig(**e.model_dump(include=set(EvalConfig.model_fields)))
        if not e.data:
            config = config.model_copy(update={"seq_len": None, "num_windows": None})
        if name == "compressed":
            config = config.model_copy(update={"kv": True})  # perplexity with the hard decisions
        results[name] = evaluate(paths[name], config, out=str(out / "eval" / f"{name}.json"),
                                 load=recipe.load.model_copy(update={"model": paths[name]}), overwrite=True,
                                 progress=progress)
    speed = None
    if e.bench is not None:
        speed = bench([recipe.model, str(_student(out, recipe))],
                      BenchConfig(**e.bench.model_dump()), out=str(out / "eval" / "bench.json"),
                      load=recipe.load.model_copy(update={"device_map": None}), overwrite=True, progress=progress)
    keep = ("model", "parameters", "perplexity", "tokens", "windows", "tasks")
    return {"models": {k: {key: v.get(key) for key in keep} for k, v in results.items()},
            "bench": None if speed is None else _speeds(speed)}


def _speeds(result: dict) -> dict:
    """Decode and prefill tokens/s of the teacher and the student at the first (batch, context) measured."""
    teacher, student = (m["runs"][0] for m in result["models"])
    return {"batch_size": teacher["batch_size"], "context": teacher["context"], "device": result["device_name"],
            "threads": result["threads"],
            "teacher": {k: teacher[k] for k in ("decode_tokens_per_s", "prefill_tokens_per_s")},
            "student": {k: student[k] for k in ("decode_tokens_per_s", "prefill_tokens_per_s")}}


def _report(recipe: Recipe, out: Path, record: RunRecord, progress: bool, resuming: bool) -> dict:
    report = pipeline_report(recipe, out, record)
    report.write(out)
    return {"report": str(out / "report.md"), "points": report.points}


def model_rows(recipe: Recipe, out: Path, record: RunRecord) -> list[dict]:
    """One row per model of the run: parameters, held-out perplexity, task accuracy, speed."""
    evals = (record.stages.get("eval", {}).get("result") or {})
    measured, speed = evals.get("models", {}), evals.get("bench")
    folders = _model_folders(recipe, out)
    names = (["teacher", "pruned"] + (["distilled"] if recipe.distill is not None else [])
             + (["compressed"] if recipe.kv is not None else []))
    rows = []
    for name in names:
        m = measured.get(name, {})
        params = m.get("parameters") or (checkpoint_parameters(folders[name]) if folders[name].is_dir() else None)
        # the pruned and the distilled model share one architecture: the student's speed is theirs
        role_speed = (speed["teacher" if name == "teacher" else "student"] if speed else {})
        accs = [t["acc"] for t in (m.get("tasks") or {}).values() if t.get("acc") is not None]
        evaluation = ({"data": recipe.eval.data, "seq_len": recipe.eval.seq_len, "windows": m.get("windows"),
                       "stride": recipe.eval.stride} if recipe.eval is not None and recipe.eval.data else None)
        rows.append({"label": name, "model": str(folders[name]), "parameters": params, "evaluation": evaluation,
                     "perplexity": m.get("perplexity"), "accuracy": sum(accs) / len(accs) if accs else None,
                     "tokens_per_s": role_speed.get("decode_tokens_per_s"),
                     "prefill_tokens_per_s": role_speed.get("prefill_tokens_per_s")})
    return rows


def pipeline_report(recipe: Recipe, out: Path, record: RunRecord) -> Report:
    """The run's front page: every model in one table, the stages, links to their reports, Pareto plot."""
    rows = model_rows(recipe, out, record)
    teacher_params = rows[0]["parameters"]
    report = Report("pipeline", f"Recipe {recipe.name}: {' -> '.join(s for s in recipe.stages() if s != 'report')}")
    if recipe.description:
        report.paragraph(recipe.description.strip())
    report.paragraph(f"Teacher `{recipe.model}`; run folder `{out}`; the run record is `{RUN_FILE}`.")
    report.heading("Models")
    e = recipe.eval
    speed = (record.stages.get("eval", {}).get("result") or {}).get("bench")
    report.table(["model", "parameters", "share of teacher", "held-out perplexity", "mean task accuracy",
                  "decode tokens/s", "prefill tokens/s"],
                 [[r["label"], r["parameters"],
                   f"{100 * r['parameters'] / teacher_params:.1f}%" if r["parameters"] and teacher_params else None,
                   r["perplexity"], r["accuracy"], r["tokens_per_s"], r["prefill_tokens_per_s"]] for r in rows])
    notes = []
    if e is not None and e.data:
        notes.append(f"Perplexity: {e.num_windows or 'all'} windows of {e.seq_len} tokens of `{e.data}`"
                     + (f", stride {e.stride}" if e.stride else "") + ".")
    if speed:
        notes.append(f"Speed: one process, batch {speed['batch_size']}, context {speed['context']}, "
                     f"{speed['device']} with {speed['threads']} threads; pruned and distilled models share one "
                     "architecture, so one student measurement stands for both (`eval/bench.json`)"
                     + (", measured without the compressed KV cache (`hyprune bench --kv` measures with it)."
                        if recipe.kv is not None else "."))
    if recipe.kv is not None:
        notes.append(f"compressed: {recipe.kv.method.upper()} at {recipe.kv.ratio:g}x on the student; its perplexity "
                     "with the hard decisions the compressed cache makes.")
    if notes:
        report.paragraph(" ".join(notes))
    report.heading("Stages")
    links = {"prune": "pruned/report.md", "distill": "distill/report.md", "kv": "kv/report.md", "eval": "eval/"}
    report.table(["stage", "status", "seconds", "details"],
                 [[s, record.stages.get(s, {}).get("status", "pending"), record.stages.get(s, {}).get("seconds"),
                   f"[{links[s]}]({links[s]})"] for s in recipe.stages() if s != "report"])
    for png, caption in (("pruned/parameters.png", "Parameters per component, before and after pruning"),
                         ("pruned/importance.png", "Importance per layer and axis"),
                         ("pruned/block_scores.png", "Depth ranking of the blocks"),
                         ("distill/training_curves.png", "Distillation: loss and held-out perplexity"),
                         ("kv/training_curves.png", "KV-cache retrofit: loss and held-out perplexity")):
        if (out / png).is_file():
            report.link_image(png, caption)
    if sum(r["perplexity"] is not None for r in rows) >= 2:
        report.heading("Quality against size")
        report.plot("pareto", "pareto.png", plots.pareto_plot, rows, "perplexity",
                    caption="Held-out perplexity against parameters; colour = decode tokens/s")
    for r in rows:
        report.point(**r)
    stages = {s: {k: v for k, v in entry.items() if k != "result"} for s, entry in record.stages.items()}
    report.data = {"recipe": recipe.model_dump(mode="json"), "stages": stages,
                   "eval": record.stages.get("eval", {}).get("result")}
    return report
