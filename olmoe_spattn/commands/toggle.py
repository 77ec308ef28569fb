"""Switch a config between dense and band attention: our YAML recipes and OLMo-core's own configs.

Accepted files:

* a YAML training recipe (``configs/*.yaml``): ``attention`` (and, when given,
  ``partition_len`` / ``attention_backend`` / ``name`` / ``train.save_folder``) change. The
  file is parsed and the values are replaced at the positions the YAML parser reports, so
  comments and layout are kept; the result is validated as a recipe before it is written;
* an OLMo-core config as JSON or YAML: a checkpoint's ``config.json`` (experiment config with
  ``model``, as the trainer saves it), an experiment config, or a bare ``TransformerConfig``
  (``TransformerConfig.as_config_dict()``). The model config is read with OLMo-core
  (``TransformerConfig.from_dict``), switched with :func:`olmoe_spattn.olmo.with_attention`,
  and only the attention (``sequence_mixer``) entries are written back; everything else is
  kept as it was. A JSON file stays JSON; an OLMo-core YAML file is re-emitted by the YAML
  writer, which drops its comments. A checkpoint config's ``recipe`` record is updated too.

Model parameters do not depend on the attention pattern, so checkpoints of the two
variants are interchangeable.

The toggled recipe trains into a new save folder: ``train.save_folder`` gets the new
attention as a suffix (``runs/tiny`` -> ``runs/tiny-dense``; a previous ``-<pattern>`` suffix is
replaced), so it never resumes the other variant's checkpoints. ``--save-folder`` sets it
explicitly; ``--keep-save-folder`` keeps it (training then refuses the other attention's
checkpoints unless told ``--allow-attention-change``).

Examples:
  olmoe-spattn toggle configs/olmoe-1b-7b.yaml --attention dense -o configs/my-dense.yaml
  olmoe-spattn toggle my.yaml --attention exclusive_bands          # in place
  olmoe-spattn toggle runs/x/step1000/config.json --attention spattention -o band.json
  olmoe-spattn toggle olmoe_experiment.yaml --attention spattention --partition-len 4096 -o -
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from ..api import BACKENDS
from ..bands import PATTERNS, partition_len_arg

# ----------------------------------------------------------------------------- YAML recipes


def _scalar(value: object) -> str:
    """``value`` as one YAML flow scalar (``null``, ``4096``, ``dense``, quoted when needed)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("\n...").strip()


def _line_offsets(text: str) -> list[int]:
    offsets, pos = [0], 0
    for line in text.splitlines(keepends=True):
        pos += len(line)
        offsets.append(pos)
    return offsets


def set_yaml_value(text: str, path: tuple[str, ...], value: object) -> str:
    """``text`` with the scalar at ``path`` (mapping keys from the root) set to ``value``.

    The YAML parser (``yaml.compose``) locates the value node; only its characters change, so
    comments, order and layout stay. A missing key is added as the last entry of its (block)
    mapping. Raises ``ValueError`` when a parent is missing or not a block mapping.
    """
    root = yaml.compose(text)
    if not isinstance(root, yaml.MappingNode):
        raise ValueError("not a recipe: the YAML file must be a mapping")
    node: yaml.Node = root
    for depth, key in enumerate(path):
        if not isinstance(node, yaml.MappingNode):
            raise ValueError(f"{'.'.join(path[:depth])} is not a mapping")
        found = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)
        if found is None:
            if depth < len(path) - 1:
                raise ValueError(f"the recipe has no {'.'.join(path[: depth + 1])} section")
            return _append_key(text, node, key, value)
        node = found
    if not isinstance(node, yaml.ScalarNode):
        raise ValueError(f"{'.'.join(path)} is not a single value")
    offsets = _line_offsets(text)
    start = offsets[node.start_mark.line] + node.start_mark.column
    end = offsets[node.end_mark.line] + node.end_mark.column
    return text[:start] + _scalar(value) + text[end:]


def _append_key(text: str, mapping: yaml.MappingNode, key: str, value: object) -> str:
    if mapping.flow_style or not mapping.value:
        raise ValueError(f"cannot add {key!r} to a flow-style or empty mapping")
    first_key = mapping.value[0][0]
    indent = " " * first_key.start_mark.column
    last_value = mapping.value[-1][1]
    lines = text.splitlines(keepends=True)
    at = last_value.end_mark.line + (1 if last_value.end_mark.column > 0 else 0)
    if at > 0 and not lines[at - 1].endswith("\n"):
        lines[at - 1] += "\n"
    lines.insert(at, f"{indent}{key}: {_scalar(value)}\n")
    return "".join(lines)


def toggle_recipe_text(
    text: str,
    attention: str,
    *,
    partition_len: int | str | None = None,
    backend: str | None = None,
    name: str | None = None,
    save_folder: str | None = None,
) -> str:
    """Returns the recipe ``text`` with its attention switched; validates the result."""
    _check_choices(attention, backend)
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError("not a recipe: the YAML file must be a mapping")
    out = set_yaml_value(text, ("attention",), attention)
    if partition_len is not None:
        out = set_yaml_value(out, ("partition_len",), partition_len)
    if backend is not None:
        out = set_yaml_value(out, ("attention_backend",), backend)
    if name is not None:
        out = set_yaml_value(out, ("name",), name)
    if save_folder is not None:
        out = set_yaml_value(out, ("train", "save_folder"), save_folder)
    from ..olmo.recipe import recipe_from_dict

    recipe = recipe_from_dict(yaml.safe_load(out))  # raises ValueError on a bad result
    if recipe.attention != attention:
        raise ValueError("could not rewrite the top-level 'attention:' key of this recipe")
    return out


def _check_choices(attention: str, backend: str | None) -> None:
    if attention not in PATTERNS:
        raise ValueError(f"unknown attention {attention!r}; allowed: {', '.join(PATTERNS)}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")


# ----------------------------------------------------------------------------- OLMo-core configs


def _is_transformer_config(data: object) -> bool:
    return isinstance(data, dict) and "block" in data and "d_model" in data


def is_olmo_core_config(data: object) -> bool:
    """An OLMo-core experiment config (``model`` holds a ``TransformerConfig``) or a bare one."""
    return _is_transformer_config(data) or (isinstance(data, dict) and _is_transformer_config(data.get("model")))


def _sequence_length(data: dict[str, Any]) -> int | None:
    for path in (("dataset", "sequence_length"), ("train_module", "max_sequence_length"),
                 ("recipe", "train", "sequence_length"), ("data_loader", "sequence_length")):
        node: Any = data
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, int):
            return node
    return None


def toggle_olmo_core_config(
    data: dict[str, Any],
    attention: str,
    *,
    partition_len: int | str | None = None,
    backend: str | None = None,
    save_folder: str | None = None,
) -> dict[str, Any]:
    """A copy of an OLMo-core config dict with the model's attention switched.

    Only ``sequence_mixer`` entries of the model's block configs change (plus the ``recipe``
    record of our checkpoints and, when given, ``trainer.save_folder``). A dense model switched
    to a band pattern needs ``partition_len``; it defaults to the config's training sequence
    length (``dataset.sequence_length`` or ``train_module.max_sequence_length``).
    """
    from olmo_core.nn.transformer import TransformerConfig

    from ..olmo import band_spec_of, with_attention

    _check_choices(attention, backend)
    if not is_olmo_core_config(data):
        raise ValueError("not an OLMo-core config: no TransformerConfig ('block', 'd_model') at the top or under 'model'")
    out = copy.deepcopy(data)
    experiment = _is_transformer_config(out.get("model"))
    model = out["model"] if experiment else out
    ignored = ("compile", "dp_config", "tp_config", "float8_config")
    try:
        config = TransformerConfig.from_dict({k: v for k, v in model.items() if k not in ignored})
    except Exception as err:  # noqa: BLE001 - OLMo-core raises many types here
        raise ValueError(f"cannot read the model config: {err}") from err
    if attention != "dense" and partition_len is None and band_spec_of(config) is None:
        partition_len = _sequence_length(out) if experiment else None
        if partition_len is None:
            raise ValueError(
                f"attention {attention!r} on a dense model needs --partition-len (the training sequence "
                "length): the config does not record one"
            )
    # plain JSON types (OLMo-core's dict holds str enums, which YAML's safe writer refuses)
    new = json.loads(json.dumps(with_attention(config, attention, partition_len, backend).as_config_dict()))
    for key in ("block", "block_overrides"):
        _copy_sequence_mixers(model.get(key), new.get(key))
    recipe = out.get("recipe")
    if isinstance(recipe, dict) and "attention" in recipe:
        spec = band_spec_of(TransformerConfig.from_dict({k: v for k, v in model.items() if k not in ignored}))
        recipe["attention"] = attention
        if spec is not None:
            recipe["partition_len"] = spec.partition_len
        if backend is not None:
            recipe["attention_backend"] = backend
        if save_folder is not None and isinstance(recipe.get("train"), dict):
            recipe["train"]["save_folder"] = save_folder
    if save_folder is not None and isinstance(out.get("trainer"), dict):
        out["trainer"]["save_folder"] = save_folder
    return out


def _copy_sequence_mixers(old: Any, new: Any) -> None:
    """Writes ``new``'s ``sequence_mixer`` entries into ``old`` (a block config or a dict of them)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return
    if "sequence_mixer" in old:
        old["sequence_mixer"] = new["sequence_mixer"]
        return
    for key, block in old.items():
        _copy_sequence_mixers(block, new.get(key))


# ----------------------------------------------------------------------------- command


def toggle_file_text(
    text: str,
    attention: str,
    *,
    is_json: bool,
    partition_len: int | str | None = None,
    backend: str | None = None,
    name: str | None = None,
    save_folder: str | None = None,
    keep_save_folder: bool = False,
) -> tuple[str, str | None]:
    """Toggles the contents of a recipe or OLMo-core config file: ``(new text, save folder)``.

    Without ``save_folder`` the toggled config trains into :func:`suffixed_save_folder`, unless
    ``keep_save_folder``.
    """
    if is_json:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid JSON: {err}") from err
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"not valid YAML: {err}") from err
    if save_folder is None and not keep_save_folder:
        save_folder = suffixed_save_folder(data, attention)
    if is_olmo_core_config(data):
        if name is not None:
            raise ValueError("--name applies to recipes only")
        new = toggle_olmo_core_config(data, attention, partition_len=partition_len, backend=backend,
                                      save_folder=save_folder)
        if is_json:
            return json.dumps(new, indent=2) + "\n", save_folder
        return yaml.safe_dump(new, sort_keys=False), save_folder
    if is_json:
        raise ValueError("a JSON file must be an OLMo-core config (a checkpoint's config.json or an experiment config)")
    text = toggle_recipe_text(text, attention, partition_len=partition_len, backend=backend, name=name,
                              save_folder=save_folder)
    return text, save_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "config",
        help="recipe YAML, or an OLMo-core config: a checkpoint's config.json, an experiment config "
        "(JSON or YAML; YAML comments are not kept for these), or a TransformerConfig dict",
    )
    parser.add_argument("--attention", required=True, choices=PATTERNS, help="attention to switch to")
    parser.add_argument("--partition-len", type=partition_len_arg, default=None,
                        help="also set partition_len (int >= n_heads or 'dynamic'; default: keep, or the "
                        "config's sequence length for a dense OLMo-core config)")
    parser.add_argument("--backend", choices=BACKENDS, default=None, help="also set the band attention backend")
    parser.add_argument("--name", default=None, help="also set the recipe name (recipes only)")
    parser.add_argument("--save-folder", default=None,
                        help="set train.save_folder (recipes) or trainer.save_folder (OLMo-core configs); "
                        "default: the current one with a -<attention> suffix")
    parser.add_argument("--keep-save-folder", action="store_true",
                        help="keep the save folder unchanged (the toggled run shares the old run's folder)")
    parser.add_argument("-o", "--out", default=None, help="write here instead of rewriting CONFIG in place ('-' = stdout)")


def suffixed_save_folder(data: object, attention: str) -> str | None:
    """The config's save folder with ``-<attention>`` replacing any ``-<pattern>`` suffix:
    ``train.save_folder`` of a recipe, ``trainer.save_folder`` of an OLMo-core config
    (``None`` when that config names none)."""
    if is_olmo_core_config(data):
        trainer = data.get("trainer") if isinstance(data, dict) else None
        folder = (trainer or {}).get("save_folder") if isinstance(trainer, dict) else None
        if not folder:
            return None
    else:
        train = data.get("train") if isinstance(data, dict) else None
        folder = (train or {}).get("save_folder") if isinstance(train, dict) else None
        folder = folder or "runs/olmoe"
    folder = str(folder).rstrip("/")
    for pattern in PATTERNS:
        folder = folder.removesuffix(f"-{pattern}").removesuffix(f"-{pattern.replace('_', '-')}")
    return f"{folder}-{attention.replace('_', '-')}"


def run(args: argparse.Namespace) -> int:
    src = Path(args.config)
    if not src.exists():
        raise ValueError(f"config {str(src)!r} not found")
    if src.is_dir():
        raise ValueError(f"config {str(src)!r} is a directory; give a recipe YAML or an OLMo-core config file")
    text = src.read_text(encoding="utf-8")
    if args.save_folder is not None and args.keep_save_folder:
        raise ValueError("give --save-folder or --keep-save-folder, not both")
    new, save_folder = toggle_file_text(
        text,
        args.attention,
        is_json=src.suffix.lower() == ".json",
        partition_len=args.partition_len,
        backend=args.backend,
        name=args.name,
        save_folder=args.save_folder,
        keep_save_folder=args.keep_save_folder,
    )
    if args.out == "-":
        sys.stdout.write(new)
        return 0
    dst = Path(args.out) if args.out else src
    dst.write_text(new, encoding="utf-8")
    folder = f"; train.save_folder: {save_folder}" if save_folder else ""
    print(f"wrote {dst} (attention: {args.attention}{folder})")
    return 0
