"""`LoSparseConfig`: the one source of truth for how a model is compressed.

The same dataclass is filled from Python, from a YAML table (`--config`) and from CLI flags
(`HfArgumentParser`), so every check of a user's value lives here, in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from losparse.core.errors import LoSparseUsageError
from losparse.core.methods import METHOD_SPECS, METHODS

PRUNE_DIMS = ("rows", "columns")
IMPORTANCE_METRICS = ("sensitivity", "magnitude")
SVD_SOLVERS = ("auto", "exact", "randomized")
PRUNING_VARIANTS = ("paper", "reference")
LPAF_IMPORTANCE = ("first_order", "magnitude", "sensitivity")
LPAF_FACTORIZATIONS = ("em", "als", "plain")
#: CoFi's gate units (`--cofi_units`; losparse.methods.cofi.units)
COFI_UNITS = ("hidden", "mha_layer", "head", "ffn_layer", "neuron")
#: The methods whose S is neuron-pruned by `LoSparsePruner`, so it can shrink to its kept neurons (`losparse.core.shrink`).
SHRINK_METHODS = tuple(name for name, spec in METHOD_SPECS.items()
                       if spec.decomposes and spec.has_sparse and not spec.prune_then_factorize)
#: `align` of configs recorded before the option existed (checkpoints, saved models): no alignment
LEGACY_ALIGN = "1"


@dataclass
class LoSparseConfig:
    """How to decompose and prune.  Paper symbols in brackets.

    Ratios are fractions of the parameters of the *targeted* weight matrices (biases, embeddings,
    LayerNorm and the task head are never counted, as in the paper's "Ratio" column).
    """

    method: str = field(
        default="losparse",
        metadata={"help": ("Compression method: " + "; ".join(f"{s.name}: {s.description}" for s in METHOD_SPECS.values()))
                  .replace("%", "%%")},  # argparse formats help strings with %
    )
    remaining_ratio: float = field(
        default=0.2,
        metadata={"help": "Fraction of the targeted matrices' parameters that remain (paper: Ratio)."},
    )
    low_rank_ratio: float = field(
        default=0.05,
        metadata={
            "help": "Share of the parameters spent on the low-rank part U·V (paper: r). Rank per layer is "
            "k = ceil(r·out·in/(out+in)); the sparse part keeps remaining_ratio minus the achieved low-rank share."
        },
    )
    prune_dim: str = field(
        default="rows",
        metadata={
            "help": "Which neurons of S are pruned: 'rows' = output neurons (rows of nn.Linear.weight, the "
            "reference code's choice), 'columns' = input neurons."
        },
    )
    importance: str = field(
        default="sensitivity",
        metadata={"help": "Entry importance: 'sensitivity' |s·dL/ds| (eq. 2) or 'magnitude' |s|."},
    )
    beta1: float = field(
        default=0.85,
        metadata={"help": "EMA factor of the sensitivity (paper: β, eq. 3). 0 disables smoothing."},
    )
    beta2: float = field(
        default=0.0,
        metadata={"help": "EMA factor of PLATON's uncertainty term; 0 (default) leaves it out."},
    )
    pruning_warmup_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Optimizer steps before pruning starts (paper: t_i). Overrides pruning_warmup_ratio."},
    )
    pruning_warmup_ratio: float = field(
        default=0.1,
        metadata={"help": "t_i as a fraction of the total optimizer steps, used when pruning_warmup_steps is unset."},
    )
    pruning_final_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Final optimizer steps at the target ratio (paper: t_f). Overrides pruning_final_ratio."},
    )
    pruning_final_ratio: float = field(
        default=0.3,
        metadata={"help": "t_f as a fraction of the total optimizer steps, used when pruning_final_steps is unset."},
    )
    pruning_interval: int = field(
        default=10,
        metadata={"help": "Masks are recomputed every this many optimizer steps while the ratio decays (ΔT)."},
    )
    pruning_variant: str = field(
        default="paper",
        metadata={
            "help": "Pruning arithmetic. 'paper': Algorithm 1 as printed -- the sensitivity EMA (eq. 3) is updated "
            "every optimizer step, masks are recomputed every ΔT steps and re-applied after every step, and the kept "
            "neurons are the best ones whose parameters fit in p_t. 'reference': the public reference code "
            "(yxli2123/LoSparse): the sensitivity is averaged over each ΔT-step window and folded into the EMA once "
            "per window, masks are applied only at mask steps (pruned neurons may regrow in between), the schedule "
            "and mask steps run one step behind, and every neuron scoring at least the k-th smallest entry score "
            "is kept. See the README's 'Notes, deviations and limits'."
        },
    )
    lpaf_importance: str = field(
        default="first_order",
        metadata={"help": "LPAF only: entry scores for its unstructured pruning. 'first_order' = accumulated -w·dL/dw "
                          "(movement; the paper's choice), 'magnitude' = |w|, 'sensitivity' = EMA of |w·dL/dw| "
                          "(the comparison of the paper's 'only first-order pruning' claim)."},
    )
    lpaf_prune_fraction: float = field(
        default=0.5,
        metadata={"help": "LPAF only: share of the optimizer steps spent pruning; at the end of it S is factorised "
                          "into U·V and the rest of the run is mixed-rank fine-tuning."},
    )
    lpaf_max_rank_factor: float = field(
        default=2.0,
        metadata={"help": "LPAF only: S is factorised at rank R = ceil(factor·r) (r: the target rank the ratio allows); "
                          "mixed-rank fine-tuning draws ranks in [r, R] and ends at r."},
    )
    lpaf_factorization: str = field(
        default="em",
        metadata={"help": "LPAF only: 'em' / 'als' = sparsity-aware SVD (mask-weighted low-rank fit: EM weighted-SVD "
                          "iteration or alternating least squares), 'plain' = truncated SVD of the pruned matrix."},
    )
    lpaf_pruned_weight: float = field(
        default=0.1,
        metadata={"help": "LPAF only: weight of the pruned entries in the sparsity-aware fit (kept entries weigh 1). "
                          "0 leaves them free, which lets U·V put large values there once R·(out+in) nears the kept "
                          "entries; 1 is the plain SVD objective."},
    )
    lpaf_factorization_iterations: int = field(
        default=10,
        metadata={"help": "LPAF only: iterations of the sparsity-aware SVD (from the plain SVD; never worse than it)."},
    )
    structured_ratio: float = field(
        default=0.5,
        metadata={"help": "structured_losparse / cofi_losparse: the share of the targeted weights the structured part "
                          "keeps (whole heads and FFN neurons / CoFi's gates); LoSparse then keeps remaining_ratio / structured_ratio of the "
                          "survivors, so the product is remaining_ratio. Must lie in [remaining_ratio, 1]."},
    )
    structured_steps_fraction: float = field(
        default=0.5,
        metadata={"help": "structured_losparse only: the share of the run's optimizer steps given to the structured "
                          "stage; the LoSparse stage gets the rest (the budget is the run's, never more)."},
    )
    cofi_units: Optional[str] = field(
        default=None,
        metadata={"help": "CoFi only: which gates to learn, a comma list of hidden,mha_layer,head,ffn_layer,neuron "
                          "(hidden dims shared by all layers, whole MHA / FFN sub-layers, heads, FFN neurons). "
                          "Default: all of them."},
    )
    lagrangian_warmup_epochs: float = field(
        default=2.0,
        metadata={"help": "CoFi only: epochs over which the Lagrangian's target sparsity rises linearly from 0 to "
                          "1 - remaining_ratio, counted from the start of pruning (the reference's default 2)."},
    )
    lagrangian_warmup_steps: Optional[int] = field(
        default=None,
        metadata={"help": "CoFi only: the target's warmup in optimizer steps; overrides lagrangian_warmup_epochs."},
    )
    reg_learning_rate: float = field(
        default=0.01,
        metadata={"help": "CoFi only: learning rate of the separate AdamW of the gates' log alpha and the Lagrange "
                          "multipliers (no weight decay; the multipliers ascend)."},
    )
    cofi_prefinetune_epochs: float = field(
        default=0.0,
        metadata={"help": "CoFi only: epochs of plain fine-tuning (no gates, no penalty) before pruning starts."},
    )
    cofi_finetune_epochs: float = field(
        default=0.0,
        metadata={"help": "CoFi only: epochs at the end of the run that fine-tune the final structure (gates fixed, "
                          "no penalty); pruning gets num_train_epochs minus both stages."},
    )
    shrink_sparse: bool = field(
        default=False,
        metadata={"help": "Drop pruned neurons for good: masks become monotone (a neuron pruned at a mask update is "
                          "never kept again) and at each mask update S, its gradient and its optimizer moments "
                          "physically shrink to the kept neurons, so training memory falls as pruning proceeds "
                          "(losparse.core.shrink). Single process only (no DDP/FSDP); methods: " + ", ".join(SHRINK_METHODS)
                          + "."},
    )
    svd_solver: str = field(
        default="auto",
        metadata={
            "help": "SVD for the initial U, V: 'exact' (torch.linalg.svd), 'randomized' (seeded range finder with "
            "power iterations; seconds instead of minutes for 4096x11008), or 'auto' = randomized for matrices whose "
            "smaller side is >= 2048, exact otherwise. S = W - U·V keeps the model unchanged either way."
        },
    )
    svd_device: str = field(
        default="auto",
        metadata={"help": "Device for the SVD ('cpu', 'cuda', 'cuda:1', ...); 'auto' = the GPU if one is visible, "
                          "else the weight's device. The factors go back to the weight's device."},
    )
    align: str = field(
        default="auto",
        metadata={
            "help": "Hardware-friendly shapes: ranks of U·V and kept-neuron counts of S are multiples of N, the "
            "parameter budget still met (the global ranking keeps whole groups of N neurons). 'auto' = 16 when "
            "the decomposition runs on a CUDA GPU (see --svd_device), else 8, applied only to matrices whose "
            "smaller side is >= 16·N (small layers keep exact counts); an integer N aligns every matrix; 1 = off. "
            "LPAF and the structured method ignore it."
        },
    )
    target_modules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Regular expressions matched (fully) against module names, e.g. "
            "'.*\\.layer\\.\\d+\\.(attention|intermediate|output)\\..*'. Default: the built-in list for the model type."
        },
    )
    target_module_types: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Class names of modules to target (e.g. Linear); combined with exclude_modules."},
    )
    exclude_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Regular expressions of module names never to target (applied after the targets)."},
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `LoSparseUsageError` naming the bad value and what is allowed.

        The checks run in a fixed order (method and budget, scores, schedule, SVD, alignment, LPAF, the
        method-dependent options), so a config with several bad values always names the same one first.
        """
        self._validate_budget()
        self._validate_scores()
        self._validate_schedule()
        self._validate_svd()
        if self.pruning_interval < 1:
            raise LoSparseUsageError(f"--pruning_interval {self.pruning_interval!r} must be >= 1")
        self._validate_align()
        self._validate_lpaf()
        self._validate_cofi()
        self._validate_hybrid()
        self._validate_method_options()

    def _validate_budget(self) -> None:
        """The method, and the two ratios (fractions of the targeted parameters) the parts are sized from."""
        if self.method not in METHODS:
            raise LoSparseUsageError(f"--method {self.method!r} is not known; choose one of: {', '.join(METHODS)}")
        for name in ("remaining_ratio", "low_rank_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 < value <= 1.0:
                raise LoSparseUsageError(f"--{name} {value!r} is out of range; it must be in (0, 1]")
        if (self.method_spec.uses_low_rank_ratio and not self.method_spec.splits_ratio
                and self.low_rank_ratio >= self.remaining_ratio):
            raise LoSparseUsageError(
                f"--low_rank_ratio {self.low_rank_ratio} must be below --remaining_ratio {self.remaining_ratio} "
                "(the sparse part gets the difference)"
            )

    def _validate_scores(self) -> None:
        """Which neurons are scored, by which entry importance, smoothed by which EMA factors."""
        if self.prune_dim not in PRUNE_DIMS:
            raise LoSparseUsageError(f"--prune_dim {self.prune_dim!r} is not known; choose one of: {', '.join(PRUNE_DIMS)}")
        if self.importance not in IMPORTANCE_METRICS:
            raise LoSparseUsageError(
                f"--importance {self.importance!r} is not known; choose one of: {', '.join(IMPORTANCE_METRICS)}"
            )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise LoSparseUsageError(f"--{name} {value!r} is out of range; it must be in [0, 1)")

    def _validate_schedule(self) -> None:
        """The cubic schedule's warmup t_i and final t_f, as ratios of the run or as step counts."""
        for name in ("pruning_warmup_ratio", "pruning_final_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise LoSparseUsageError(f"--{name} {value!r} is out of range; it must be in [0, 1)")
        if self.pruning_warmup_ratio + self.pruning_final_ratio >= 1.0:
            raise LoSparseUsageError(
                f"--pruning_warmup_ratio {self.pruning_warmup_ratio} + --pruning_final_ratio "
                f"{self.pruning_final_ratio} must be below 1 (leave room for the decay)"
            )
        for name in ("pruning_warmup_steps", "pruning_final_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise LoSparseUsageError(f"--{name} {value!r} must be >= 0")

    def _validate_svd(self) -> None:
        """The solver and device of the initial SVD; the device string must parse as a CPU or CUDA device."""
        if self.svd_solver not in SVD_SOLVERS:
            raise LoSparseUsageError(
                f"--svd_solver {self.svd_solver!r} is not known; choose one of: {', '.join(SVD_SOLVERS)}"
            )
        if self.svd_device != "auto":
            try:
                device = torch.device(self.svd_device)
            except (RuntimeError, TypeError):
                raise LoSparseUsageError(
                    f"--svd_device {self.svd_device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
                ) from None
            if device.type not in ("cpu", "cuda"):
                raise LoSparseUsageError(f"--svd_device {self.svd_device!r}: only 'auto', 'cpu' and 'cuda[:N]' are supported")

    def _validate_method_options(self) -> None:
        """Options that only some methods have: shrinking needs a neuron-pruned S; the pruning arithmetic."""
        if self.shrink_sparse and self.method not in SHRINK_METHODS:
            raise LoSparseUsageError(
                f"--shrink_sparse is not available with --method {self.method}: only a neuron-pruned S can shrink "
                f"({', '.join(SHRINK_METHODS)}); drop --shrink_sparse"
            )
        if self.pruning_variant not in PRUNING_VARIANTS:
            raise LoSparseUsageError(
                f"--pruning_variant {self.pruning_variant!r} is not known; choose one of: {', '.join(PRUNING_VARIANTS)}"
            )

    def _validate_align(self) -> None:
        # Python callers and YAML tables may give an int; the CLI gives a string. Stored as text either way.
        value = self.align
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and value.strip() == "auto":
            self.align = "auto"
            return
        if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and int(value) >= 1:
            self.align = str(int(value))
            return
        raise LoSparseUsageError(f"--align {self.align!r} is not allowed; use 'auto' or a positive integer N "
                                 "(ranks and kept-neuron counts become multiples of N; 1 = off)")

    def _validate_lpaf(self) -> None:
        if self.lpaf_importance not in LPAF_IMPORTANCE:
            raise LoSparseUsageError(
                f"--lpaf_importance {self.lpaf_importance!r} is not known; choose one of: {', '.join(LPAF_IMPORTANCE)}"
            )
        if self.lpaf_factorization not in LPAF_FACTORIZATIONS:
            raise LoSparseUsageError(f"--lpaf_factorization {self.lpaf_factorization!r} is not known; choose one of: "
                                     f"{', '.join(LPAF_FACTORIZATIONS)}")
        if not 0.0 < self.lpaf_prune_fraction < 1.0:
            raise LoSparseUsageError(f"--lpaf_prune_fraction {self.lpaf_prune_fraction!r} is out of range; it must be "
                                     "in (0, 1) (the rest of the run fine-tunes the factorised model)")
        if not (isinstance(self.lpaf_max_rank_factor, (int, float)) and self.lpaf_max_rank_factor >= 1.0):
            raise LoSparseUsageError(f"--lpaf_max_rank_factor {self.lpaf_max_rank_factor!r} must be >= 1 "
                                     "(1 = no mixed ranks: factorise and train at the target rank)")
        if not 0.0 <= self.lpaf_pruned_weight <= 1.0:
            raise LoSparseUsageError(f"--lpaf_pruned_weight {self.lpaf_pruned_weight!r} is out of range; it must be in [0, 1]")
        if self.lpaf_factorization_iterations < 0:
            raise LoSparseUsageError(f"--lpaf_factorization_iterations {self.lpaf_factorization_iterations!r} must be >= 0")
        if self.method == "lpaf" and self.pruning_variant != "paper":
            raise LoSparseUsageError(f"--pruning_variant {self.pruning_variant!r} is not available with --method lpaf; "
                                     "LPAF prunes with the 'paper' arithmetic")

    def _validate_cofi(self) -> None:
        """CoFi's units, Lagrangian warmup, gate learning rate and stage lengths (checked for every method)."""
        if self.cofi_units is not None:
            parts = [part.strip() for part in str(self.cofi_units).split(",")]
            bad = [part for part in parts if part not in COFI_UNITS]
            if bad or len(set(parts)) != len(parts):
                raise LoSparseUsageError(
                    f"--cofi_units {self.cofi_units!r}: " + (f"unknown unit {bad[0]!r}" if bad else "a unit repeats")
                    + f"; give a comma list of {','.join(COFI_UNITS)} (default: all)")
        for name in ("lagrangian_warmup_epochs", "cofi_prefinetune_epochs", "cofi_finetune_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise LoSparseUsageError(f"--{name} {value!r} is not allowed; it must be a finite number of epochs >= 0")
        steps = self.lagrangian_warmup_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise LoSparseUsageError(f"--lagrangian_warmup_steps {steps!r} is not allowed; it must be an integer >= 0")
        rate = self.reg_learning_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            raise LoSparseUsageError(f"--reg_learning_rate {rate!r} is not allowed; it must be a finite float > 0")

    def _validate_hybrid(self) -> None:
        """structured_losparse: the structured share must leave LoSparse a ratio in (low_rank_ratio, 1]."""
        if not (isinstance(self.structured_ratio, (int, float)) and 0.0 < self.structured_ratio <= 1.0):
            raise LoSparseUsageError(f"--structured_ratio {self.structured_ratio!r} is out of range; it must be in (0, 1]")
        if not 0.0 < self.structured_steps_fraction < 1.0:
            raise LoSparseUsageError(f"--structured_steps_fraction {self.structured_steps_fraction!r} is out of range; "
                                     "it must be in (0, 1) (both stages need steps)")
        if not self.method_spec.splits_ratio:
            return
        if self.structured_ratio < self.remaining_ratio:
            raise LoSparseUsageError(f"--structured_ratio {self.structured_ratio} is below --remaining_ratio "
                                     f"{self.remaining_ratio}: LoSparse would have to keep more than all of the survivors")
        if self.low_rank_ratio >= self.remaining_ratio / self.structured_ratio:
            raise LoSparseUsageError(
                f"--low_rank_ratio {self.low_rank_ratio} must be below the LoSparse stage's ratio remaining_ratio / "
                f"structured_ratio = {self.remaining_ratio / self.structured_ratio:.4f}")

    @property
    def method_spec(self):
        """What the method decomposes and prunes (see `losparse.core.methods`)."""
        return METHOD_SPECS[self.method]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LoSparseConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        present = {k: v for k, v in values.items() if k in known}
        present.setdefault("align", LEGACY_ALIGN)  # recorded before --align existed: shapes were never aligned
        return cls(**present)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
