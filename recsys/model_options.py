"""The model's settings checked in one place: the constructor of ``MatryoshkaRecommender`` runs
:func:`check_options` on its own arguments, and the training CLI on the parsed ``--model`` settings
before it reads any data. Errors are :class:`OptionError` with settings named ``{name}``, which the
CLI renders as flags (``--model.name``).
"""

from __future__ import annotations

import math
from typing import Any

from recsys.nn.encoders import ENCODERS, OptionError, options_of
from recsys.nn.grid import GRIDS, Triple, build_grid
from recsys.nn.loss import TEACHERS
from recsys.nn.nested import NESTINGS, check_sizes

__all__ = [
    "LOSSES", "MODEL_TEACHERS", "NEGATIVE_SAMPLING", "NUMBER_RULES", "OptionError", "check_numbers", "check_options", "grid_of",
    "recipe_of",
]


#: the training losses: the full softmax over the catalogue, or a sampled softmax (docs/method.md §4)
LOSSES = ("full", "sampled")
#: how the sampled softmax draws its shared negatives: uniformly over the training items, or in
#: proportion to their training counts with the log-Q correction
NEGATIVE_SAMPLING = ("uniform", "popularity")
#: the distillation's teachers: the loss's own, or the largest size scored with a moving average of the weights
MODEL_TEACHERS = (*TEACHERS, "average")


def _probability(v) -> bool:
    return 0 <= v < 1


#: every numeric setting's type and range: name -> (integer only, test, what it must be)
NUMBER_RULES: dict[str, tuple[bool, Any, str]] = {
    "n_blocks": (True, lambda v: v >= 1, "a positive integer"),
    "negatives": (True, lambda v: v >= 1, "a positive integer"),
    "warmup_steps": (True, lambda v: v >= 0, "a non-negative integer"),
    "loss_block_rows": (True, lambda v: v >= 1, "a positive integer"),
    "dropout": (False, _probability, "a probability in [0, 1)"),
    "input_dropout": (False, _probability, "a probability in [0, 1)"),
    "id_dropout": (False, _probability, "a probability in [0, 1)"),
    "lr": (False, lambda v: v > 0, "a finite positive number"),
    "weight_decay": (False, lambda v: v >= 0, "a finite non-negative number"),
    "distill": (False, lambda v: v >= 0, "a finite non-negative number"),
    "prefix_gradient": (False, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "teacher_decay": (False, lambda v: 0 < v < 1, "a number in (0, 1)"),
    "init_std": (False, lambda v: v > 0, "a finite positive number (or null: each layer's own initialisation)"),
}


def recipe_of(
    *, sizes: Any = (), encoder: Any = "lru", nesting: Any = None, prefix_gradient: Any = None, distill: Any = None,
    monitor_size: Any = None, loss: Any = "full", learned_temperature: Any = False, depths: Any = None, pairs: Any = None,
    triples: Any = None, **other: Any,
) -> dict[str, Any]:
    """The values of ``nesting``, ``prefix_gradient``, ``distill`` and ``monitor_size``, each left
    unset (None) filled in by the measured recipe (docs/results.md, "Where the promise stands"):
    ``slices`` with the LRU encoder and no elastic grid, else ``blocks``; with slices the prefix
    gradient at 0 and distillation at 0.5 (0 where the loss is sampled, the temperature learned or
    the size single: nothing distils there), with blocks 1 and 0 (the plain nested model); each
    size its own best checkpoint (``each``; a grid monitors the mean of its triples). A value given
    is kept as it is, to be checked by :func:`check_options`."""
    grid = any(v is not None for v in (depths, pairs, triples))
    if nesting is None:
        nesting = "slices" if encoder == "lru" and not grid else "blocks"
    sliced = nesting == "slices"
    if prefix_gradient is None:
        prefix_gradient = 0.0 if sliced else 1.0
    if distill is None:
        several = not isinstance(sizes, (list, tuple)) or len(sizes) > 1
        distill = 0.5 if sliced and loss == "full" and learned_temperature is not True and several else 0.0
    if monitor_size is None:
        monitor_size = "mean" if grid else "each"
    return {"nesting": nesting, "prefix_gradient": prefix_gradient, "distill": distill, "monitor_size": monitor_size}


def check_numbers(**values: Any) -> None:
    """Each named setting against its rule in ``NUMBER_RULES``; raises :class:`OptionError`."""
    for name, value in values.items():
        integer, test, what = NUMBER_RULES[name]
        kinds = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or not test(value):
            raise OptionError(f"{{{name}}} must be {what}, got {value!r}")


def check_options(
    *,
    sizes: Any,
    encoder: str,
    monitor_size: Any = None,
    loss_weights: Any = None,
    lru: Any = None,
    mamba: Any = None,
    sasrec: Any = None,
    loss: str = "full",
    negatives: Any = 1024,
    negative_sampling: str = "popularity",
    distill: Any = None,
    distill_teacher: str = "largest",
    teacher_decay: Any = 0.99,
    n_blocks: Any = 2,
    depths: Any = None,
    pairs: Any = None,
    grid: str = "diagonal",
    triples: Any = None,
    use_id_embedding: bool = False,
    id_dropout: Any = 0.0,
    learned_temperature: Any = False,
    separate_item_vectors: Any = False,
    prefix_gradient: Any = None,
    nesting: Any = None,
    init_std: Any = None,
    output_item_norm: Any = True,
    output_bias: Any = False,
    **other: Any,
) -> tuple[tuple[int, ...], int | str, dict[str, Any], tuple[Triple, ...] | None]:
    """The model's checks of its settings, given by name (the constructor's arguments, or the parsed
    ``--model`` settings; settings without a check here are passed over). Returns the sizes, the
    monitored size, each encoder's typed options and the trained triples (None without a grid);
    raises :class:`OptionError` (settings named ``{name}``). :func:`grid_of` checks the elastic
    options (``depths``, ``pairs``, ``grid``, ``triples``); the numeric settings (``lr``,
    ``dropout``, ...) are checked by ``NUMBER_RULES``; settings left unset take :func:`recipe_of`'s values."""
    recipe = recipe_of(sizes=sizes, encoder=encoder, nesting=nesting, prefix_gradient=prefix_gradient, distill=distill,
                       monitor_size=monitor_size, loss=loss, learned_temperature=learned_temperature, depths=depths,
                       pairs=pairs, triples=triples)
    nesting, prefix_gradient, distill, monitor_size = (recipe[k] for k in ("nesting", "prefix_gradient", "distill", "monitor_size"))
    numbers = {name: value for name, value in other.items() if name in NUMBER_RULES}
    check_numbers(n_blocks=n_blocks, negatives=negatives, distill=distill, id_dropout=id_dropout,
                  prefix_gradient=prefix_gradient, teacher_decay=teacher_decay, **numbers)
    try:
        sizes = check_sizes(sizes)
    except ValueError as exc:
        raise OptionError("{sizes}: " + str(exc)) from None
    if encoder not in ENCODERS:
        raise OptionError(f"{{encoder}}: unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    if monitor_size not in ("mean", "each", *sizes):
        raise OptionError(f"{{monitor_size}} {monitor_size} is neither one of {{sizes}} {list(sizes)} nor 'mean' or 'each'")
    if loss_weights is not None and len(loss_weights) != len(sizes):
        raise OptionError(f"{{loss_weights}} has {len(loss_weights)} entries for {len(sizes)} sizes {list(sizes)}")
    if loss_weights is not None and (
        any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0 for w in loss_weights)
        or not any(w > 0 for w in loss_weights)
    ):
        raise OptionError(f"{{loss_weights}} must be finite non-negative numbers, not all 0, got {list(loss_weights)}")
    if loss not in LOSSES:
        raise OptionError(f"{{loss}}: unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if negative_sampling not in NEGATIVE_SAMPLING:
        raise OptionError(
            f"{{negative_sampling}}: unknown sampling {negative_sampling!r}; choose one of {', '.join(NEGATIVE_SAMPLING)}"
        )
    if distill_teacher not in MODEL_TEACHERS:
        raise OptionError(f"{{distill_teacher}}: unknown teacher {distill_teacher!r}; choose one of {', '.join(MODEL_TEACHERS)}")
    if distill > 0 and loss != "full":
        raise OptionError(f"{{distill}} works with the full softmax only; {{loss}} is {loss!r}")
    if id_dropout > 0 and not use_id_embedding:
        raise OptionError(f"{{id_dropout}} {id_dropout} drops item-ID vectors, but {{use_id_embedding}} is false")
    if not isinstance(learned_temperature, bool):
        raise OptionError(f"{{learned_temperature}} must be true or false, got {learned_temperature!r}")
    if learned_temperature and distill > 0:
        raise OptionError("{learned_temperature} and {distill} do not combine: the distillation's teacher is unscaled")
    if not isinstance(separate_item_vectors, bool) and separate_item_vectors != "all":
        raise OptionError(f"{{separate_item_vectors}} must be true, false or 'all', got {separate_item_vectors!r}")
    if nesting not in NESTINGS:
        raise OptionError(f"{{nesting}}: unknown nesting {nesting!r}; choose one of {', '.join(NESTINGS)}")
    if nesting == "slices" and encoder != "lru":
        raise OptionError(f"{{nesting}} 'slices' is built for the lru encoder, not {encoder!r}")
    if prefix_gradient < 1 and not separate_item_vectors and nesting == "blocks":
        raise OptionError("{prefix_gradient} below 1 needs {separate_item_vectors} true or 'all': "
                          "with tied item vectors every size's softmax reads the smaller sizes' item chunks")
    if prefix_gradient < 1 and encoder == "sasrec":
        raise OptionError("{prefix_gradient} below 1 needs a nested encoder (lru or mamba): SASRec's layers are shared whole")
    if init_std is not None:
        check_numbers(init_std=init_std)
    if not isinstance(output_item_norm, bool):
        raise OptionError(f"{{output_item_norm}} must be true or false, got {output_item_norm!r}")
    if not output_item_norm and not separate_item_vectors:
        raise OptionError("{output_item_norm} false needs {separate_item_vectors} true or 'all': "
                          "tied item vectors are read through the same tower that scores them")
    if not isinstance(output_bias, bool):
        raise OptionError(f"{{output_bias}} must be true or false, got {output_bias!r}")
    if output_bias and separate_item_vectors != "all":
        raise OptionError("{output_bias} true needs {separate_item_vectors} 'all': "
                          "each size's bias is a column of its own output item vectors")
    options = {name: options_of(name, value) for name, value in (("lru", lru), ("mamba", mamba), ("sasrec", sasrec))}
    trained = grid_of(sizes, encoder, n_blocks, depths, pairs, grid, triples)
    if trained is not None and (learned_temperature or separate_item_vectors or nesting == "slices"):
        name = "learned_temperature" if learned_temperature else "separate_item_vectors" if separate_item_vectors else "nesting"
        raise OptionError(f"{{{name}}} is per size; it is not available with a grid of triples")
    if trained is not None:
        if monitor_size != "mean":
            raise OptionError(f"{{monitor_size}} {monitor_size}: with a grid of triples the monitor is their mean NDCG@10 "
                              "(one checkpoint for every triple)")
        if loss_weights is not None:
            raise OptionError("{loss_weights} are per size; with a grid of triples every triple has weight 1")
        if distill > 0 and distill_teacher == "average":
            raise OptionError("{distill_teacher} 'average' scores the largest size alone; it is not available with a grid of triples")
    if encoder == "sasrec":
        try:
            options["sasrec"].check_width(sizes[-1])
        except OptionError as exc:
            raise exc.within("sasrec") from None
    return sizes, monitor_size, options, trained


def grid_of(
    sizes: tuple[int, ...], encoder: str, n_blocks: Any, depths: Any, pairs: Any, grid: str, triples: Any
) -> tuple[Triple, ...] | None:
    """The trained (depth, width, size) triples (``recsys/nn/grid.py``), None without the options;
    raises :class:`OptionError` naming the option."""
    if grid not in GRIDS:
        raise OptionError(f"{{grid}}: unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    try:
        trained = build_grid(sizes, n_blocks, depths, pairs, grid, triples)
    except ValueError as exc:
        name = next((n for n in ("triples", "pairs", "depths") if str(exc).startswith(n)), "triples" if triples else "pairs")
        raise OptionError(f"{{{name}}}: {exc}") from None
    if trained is not None and encoder == "sasrec":
        narrow = [t.label for t in trained if t.width != sizes[-1]]
        if narrow:
            raise OptionError(f"{{pairs}}: SASRec is not nested, its width is {sizes[-1]} only; got {', '.join(narrow)}")
    return trained
