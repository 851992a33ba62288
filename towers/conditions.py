"""The condition of a run: what makes runs poolable, defined once.

A condition is **every setting that can change the network, its data, its training or the
measurement**, that is every key of the run's resolved config (``config.yaml``, as
``towers.runs.SaveRunConfig`` writes it: ``model.*``, ``data.*``, ``trainer.*``, flattened) except
the few listed in :data:`NOT_CONDITION`, each with the reason it cannot change the result. Runs pool (are seeds of one condition) only when
all of it is equal, so a switch added later splits conditions by itself until someone argues, here,
that it does not matter. A key a run's config lacks (a Lightning log dir with only ``hparams.yaml``)
is "not recorded", never a wildcard.

Who uses it: the report's pooling and its labels (``analysis/compare_stats.py``), the offline sweep's
W&B job type (:func:`towers.sweep_state.condition`: the swept settings that are part of a condition)
and the run's W&B config (``condition``: :func:`condition_id`, which the dashboard groups by).
"""

import hashlib
import json

# Settings that cannot change what a run learns or how it is judged, by config key (a prefix ends in
# "."), each with its reason. Everything else is part of the condition.
NOT_CONDITION = {
    "seed_everything": "the seed: what varies between the seeds of a condition",
    "condition": "the condition's own id (the W&B config holds it)",
    "model.condition": "the same id, as a logger's hparams.yaml gives it",
    "data.seed": "a seed (derived from seed_everything when None)",
    "ckpt_path": "where a run resumes from, not what it trains",
    "config": "the config files' paths; their contents are the other keys",
    "trainer.default_root_dir": "where the run's files go",
    "trainer.logger": "where the metrics go",
    "trainer.callbacks": "checkpointing and logging; the measurement's own settings are in the record",
    "trainer.enable_progress_bar": "display",
    "trainer.enable_model_summary": "display",
    "trainer.enable_checkpointing": "files",
    "trainer.log_every_n_steps": "logging",
    "trainer.accelerator": "where it runs (the precision it runs in is a setting of its own)",
    "data.num_workers": "loader processes: the same batches",
    "data.pin_memory": "host memory: the same batches",
    "data.download": "whether missing data may be fetched",
    "data.cache_dir": "where the store is kept",
    "data.eval_batch_size": "evaluation only: the same numbers",
}
# Names a reader understands, for the report (other keys are shown as their config key).
LABELS = {
    "model.num_towers": "towers",
    "model.width_policy": "width policy",
    "model.width_multiplier": "width ×",
    "model.color_blind_towers": "colour-blind towers (positive control)",
    "model.lr": "learning rate",
    "model.lr_schedule": "LR schedule",
    "model.lr_milestones": "LR drops at epochs",
    "model.max_lr_drops": "LR drops at most",
    "model.conv1_lrn_before_relu": "conv1 LRN before ReLU (2012 code)",
    "model.lrn_across_towers": "LRN across towers (Caffe)",
    "model.lrn_k": "LRN k",
    "model.init_std_overrides": "initial std overrides",
    "model.positive_bias": "positive bias",
    "model.bias_weight_decay": "bias weight decay",
    "model.weight_decay": "weight decay",
    "model.momentum": "momentum",
    "trainer.precision": "precision",
    "trainer.max_epochs": "epochs",
    "trainer.devices": "devices",
    "data.source": "data",
    "data.class_path": "data module",
    "data.root": "data folder",
    "data.batch_size": "batch",
}
TOWERS, COLOUR_BLIND = "model.num_towers", "model.color_blind_towers"
NOT_RECORDED = "not recorded"


def in_condition(key: str) -> bool:
    """Whether a (flattened) config key is part of a run's condition."""
    return not any(
        key == k or (k.endswith(".") and key.startswith(k)) or key.startswith(k + ".") for k in NOT_CONDITION
    )


def _plain(value):
    """A value as JSON would hold it, so that a tuple from hparams.yaml equals the list of a config.yaml."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested config -> dotted keys; jsonargparse's ``init_args`` level is dropped
    (``data.init_args.batch_size`` -> ``data.batch_size``)."""
    out = {}
    for name, value in config.items():
        name = f"{prefix}{name}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return {k.replace(".init_args.", ".").removeprefix("init_args."): v for k, v in out.items()}


def condition(config: dict) -> dict:
    """The condition of a run: its config's settings (:func:`in_condition`; nested or flattened), sorted
    by key, values as JSON holds them. The verdict's rule is not in it: a record judged by another
    rule carries another version (towers.records.VERSION) and is never pooled with this one's."""
    out = {}
    for name, value in flatten(config).items():
        if not in_condition(name):
            continue
        section, _, rest = name.partition(".")
        setting, _, leaf = rest.partition(".")
        if leaf:  # a dict-valued setting (model.init_std_overrides.conv3): kept whole, as one setting
            nested = out.setdefault(f"{section}.{setting}", {})
            nested[leaf] = _plain(value) if isinstance(nested, dict) else nested
        else:
            out[name] = _plain(value)
    return dict(sorted(out.items()))


def key(cond: dict) -> str:
    """A condition as one hashable, canonical string (for grouping)."""
    return json.dumps(cond, sort_keys=True)


def condition_id(cond: dict) -> str:
    """A short stable name of a condition, e.g. ``T2-3fa2b1c0`` (tower count and a hash of the rest): the
    W&B config's ``condition``, the report's column, the dashboard's grouping."""
    towers = cond.get(TOWERS)
    digest = hashlib.sha256(key(cond).encode()).hexdigest()[:8]
    return f"T{towers if towers is not None else '?'}-{digest}"


def control_of(cond: dict) -> dict:
    """The one-tower control of a condition: the same settings with one tower and no colour-blind tower
    (the positive control is compared with the same one-tower control)."""
    out = dict(cond, **{TOWERS: 1})
    if COLOUR_BLIND in out:
        out[COLOUR_BLIND] = _no_colour_blind(out[COLOUR_BLIND])
    return out


def _no_colour_blind(value):
    return [] if isinstance(value, list) else None


def is_control(cond: dict) -> bool:
    return cond.get(TOWERS) == 1


def same_setup(a: dict, b: dict) -> bool:
    """Whether two conditions differ at most in tower count and colour-blind towers (a control's match);
    a colour-blind list and an absent one compare as "none"."""

    def rest(c):
        out = {k: v for k, v in c.items() if k != TOWERS}
        if out.get(COLOUR_BLIND) in ([], None):
            out.pop(COLOUR_BLIND, None)
        return out

    return rest(a) == rest(b)


def label(name: str) -> str:
    return LABELS.get(name, name)


def show(name: str, value) -> str:
    """One setting as the report prints it: ``LR schedule: step``, ``colour-blind towers: none``."""
    if value is NOT_RECORDED:
        text = NOT_RECORDED
    elif value is None:
        text = "none"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, list):
        text = ", ".join(map(str, value)) or "none"
    elif isinstance(value, dict):
        text = ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return f"{label(name)}: {text}"


def differences(conditions: list[dict]) -> list[str]:
    """The settings that differ between the given conditions (a key one of them lacks included), in order."""
    names = sorted({k for c in conditions for k in c})
    return [n for n in names if len({json.dumps(c.get(n, NOT_RECORDED)) for c in conditions}) > 1]


def describe(cond: dict, names: list[str]) -> str:
    """The settings ``names`` of a condition as the report prints them, tower count first."""
    order = [TOWERS] + [n for n in names if n != TOWERS]
    return "; ".join(show(n, cond.get(n, NOT_RECORDED)) for n in order)
