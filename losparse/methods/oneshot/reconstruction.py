"""Reconstruction one-shot LoSparse: choose U·V and the kept rows of S to minimise the calibration error.

Selection alone (the default path of `algorithm`) keeps S = W − U·V and cuts whole rows by a score, so nothing
makes up for what is cut. This module solves the problem the calibration poses instead. For one matrix with
target M (out, in) (W itself, or the compensated target below), inputs with second moment G = C·Cᵀ and a rank k:

    min over U (out, k), V (k, in), R ⊂ rows, S (nonzero on rows R only) of  ‖(M − U·V − S)·C‖²_F

The error splits over rows, and a kept row's S_i is free, so for a fixed R the optimum is closed-form:
S_R = M_R − (U·V)_R zeroes those rows' error, and U·V is the rank-k truncated SVD of the whitened target
T = M·C restricted to the other rows (SVD-LLM's whitening, fitted where S does not help). Its error is the tail
energy of that SVD. Choosing R is the combinatorial part; it is solved by alternating, as OATS (ICLR 2025)
alternates a truncated SVD with a threshold, but over LoSparse's structured S (whole output neurons):

    1. L = rank-k SVD of T on the rows outside R (R = ∅ at the start);
    2. every row i scores its error reduction if kept in S: ‖(T − L·C)_i‖² (‖T_i‖² for a row already in R);
    3. one ranking over all layers (error reduction per parameter, each layer's error normalised by its
       output energy ‖T‖²_F so that layers of different scale compete fairly) keeps the best rows within the
       S budget (`keep_within_budget`, the paper's keep rule);
    4. repeat 1–3 `iterations` times; the final step 1 is the closed-form least-squares update of U·V and the
       kept rows for the final R.

Each step minimises the objective over one block of variables (step 1 exactly, steps 2–3 exactly within a
layer and greedily across layers), so the total normalised error never rises: an iteration that would raise it
(possible only through the greedy cross-layer budget) is undone and the alternation stops (`history` records
the objective after every iteration; the tests assert it falls).

Compensation (block scope): when earlier blocks are already compressed, this block's inputs are X̃, not the
dense X. Fitting the dense outputs X·Wᵀ from X̃ is min ‖X·Wᵀ − X̃·Mᵀ‖ with the closed form M* = W·Hᵀ·G̃⁻¹
(H = X̃ᵀX (in, in), G̃ = X̃ᵀX̃ damped); for any M, ‖X·Wᵀ − X̃·Mᵀ‖² = ‖(M* − M)·C̃‖² + const, so the same
alternation on target M* with C̃ from G̃ minimises the error against the dense model's outputs
(SparseGPT/SVD-LLM-style compensation of the error that earlier blocks introduced).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from losparse.core.decompose import decompose_linear
from losparse.core.layers import dense_weight_of
from losparse.core.pruner import keep_within_budget

#: --oneshot_iters default: alternations after the first SVD (docs/llm.md has the measured curve)
DEFAULT_ITERATIONS = 1


@dataclass
class RowProblem:
    """One matrix's reconstruction: target M (out, in; its own dtype), whitening C (in, in) float64, rank k, state.

    `whitened`: T = M·C (out, in) float64; `scale`: ‖T‖²_F (the layer's output energy, normaliser of its
    error); `kept`: bool (out,) rows of R; `residual`: T − L·C (out, in) for the current L; `tail`: the error
    Σ_{i∉R} ‖residual_i‖² of the current (L, R); `factors`: U (out, k) and L·C's right factor Σ^½·Qᵀ (k, in).
    """

    name: str
    target: torch.Tensor
    factor: torch.Tensor
    rank: int
    budget_rows: int = 0  # rows of S this matrix may keep ("layer" allocation)
    initial_svd: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # SVD of T, if already computed
    fitted: bool = field(init=False, default=False)
    whitened: torch.Tensor = field(init=False)
    scale: float = field(init=False)
    kept: torch.Tensor = field(init=False)
    residual: torch.Tensor = field(init=False)
    tail: float = field(init=False)
    factors: tuple[torch.Tensor, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.whitened = self.target.to(torch.float64) @ self.factor
        self.scale = max(float(self.whitened.square().sum()), 1e-300)
        self.kept = torch.zeros(self.target.shape[0], dtype=torch.bool, device=self.target.device)
        self.fit_low_rank(self.kept)
        self.initial_svd = None  # only the first fit needs it

    @property
    def row_size(self) -> int:
        return self.target.shape[1]

    def fit_low_rank(self, kept: torch.Tensor) -> float:
        """Step 1 for rows R = `kept`: L = rank-k SVD of T on the other rows; sets the state, returns the tail.

        The same R as the current one changes nothing, so no SVD is computed for it."""
        if self.fitted and torch.equal(kept, self.kept):
            return self.tail
        free = (~kept).nonzero().flatten()
        left = torch.zeros(self.target.shape[0], self.rank, dtype=torch.float64, device=self.target.device)
        right = torch.zeros(self.rank, self.target.shape[1], dtype=torch.float64, device=self.target.device)
        if self.rank and free.numel():
            if self.initial_svd is not None and free.numel() == kept.numel():
                u, sigma, vt = self.initial_svd
            else:
                u, sigma, vt = _tall_svd(self.whitened.index_select(0, free))
            k = min(self.rank, sigma.numel())
            root = sigma[:k].sqrt()
            left[free, :k] = (u[:, :k] * root).to(torch.float64)
            right[:k] = (root.unsqueeze(1) * vt[:k]).to(torch.float64)
        self.kept, self.factors = kept.clone(), (left, right)
        self.residual = self.whitened - left @ right
        self.tail = float(self.residual[~kept].square().sum())
        self.fitted = True
        return self.tail

    def row_gains(self) -> torch.Tensor:
        """Step 2: (out,) error reduction of keeping each row in S, normalised by the layer's output energy."""
        return self.residual.square().sum(dim=1) / self.scale

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """U (out, k), V (k, in) float64 with U·V = L: V = (Σ^½·Qᵀ)·C⁻¹ by a triangular solve."""
        left, right = self.factors
        v = torch.linalg.solve_triangular(self.factor.T, right.T, upper=True).T
        return left, v


def _tall_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD computed on the tall orientation (LAPACK is several times faster there), in float32 for speed:
    the truncation needs the leading singular triplets, which float32 gives to ~1e-6 relative."""
    work = matrix.to(torch.float32)
    if work.shape[0] >= work.shape[1]:
        u, s, vt = torch.linalg.svd(work, full_matrices=False)
    else:
        v, s, ut = torch.linalg.svd(work.T, full_matrices=False)
        u, vt = ut.T, v.T
    return u, s, vt


def total_error(problems: list[RowProblem]) -> float:
    """The alternation's objective: Σ over layers of their normalised calibration error."""
    return sum(p.tail / p.scale for p in problems)


#: how the S budget is shared: "layer" every matrix keeps its own `budget_rows` (its share of the ratio),
#: "global" one ranking of all rows by error reduction / output energy per parameter (measured worse on SmolLM2:
#: docs/llm.md)
ALLOCATIONS = ("layer", "global")


def select_rows(problems: list[RowProblem], kept_fraction: float, allocation: str = "layer") -> list[torch.Tensor]:
    """Steps 2–3: each problem's new kept mask (out,): its `budget_rows` best rows by error reduction ("layer"),
    or one ranking of all rows by normalised error reduction per parameter within `kept_fraction` of all rows'
    parameters ("global")."""
    if allocation == "layer":
        masks = []
        for p in problems:
            keep = torch.zeros(p.target.shape[0], dtype=torch.bool, device=p.target.device)
            if p.budget_rows:
                keep[p.row_gains().topk(min(p.budget_rows, keep.numel())).indices] = True
            masks.append(keep)
        return masks
    if not problems:
        return []
    gains = torch.cat([p.row_gains() for p in problems])
    sizes = torch.cat([torch.full((p.target.shape[0],), float(p.row_size), dtype=torch.float64,
                                  device=gains.device) for p in problems])
    keep = keep_within_budget(gains / sizes, sizes, kept_fraction)
    return list(torch.split(keep, [p.target.shape[0] for p in problems]))


def best_split(whitened: torch.Tensor, budget: float,
               svd: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
               align: int = 1) -> tuple[int, int]:
    """(rank k, rows n) with k·(out + in) + n·in ≤ `budget` that minimise the first selection's error estimate;
    `align` N > 1 (`--align`): k and n multiples of N (n may also be every row).

    From one SVD T = Σ_j σ_j u_j v_jᵀ: after rank k, row i keeps the energy r_i(k) = ‖T_i‖² − Σ_{j≤k} (σ_j u_ij)²;
    keeping the n rows of largest r_i(k) in S leaves Σ r_i(k) minus their sum. Every k from 0 to the whole budget
    in rank is scanned at once (one sort per k); k at the whole budget and n = 0 is plain whitened truncation,
    so the chosen split is never worse than low rank alone on this estimate.
    """
    out_features, in_features = whitened.shape
    u, sigma, _ = svd if svd is not None else _tall_svd(whitened)
    max_rank = min(int(budget // (out_features + in_features)), sigma.numel())
    energy = (u[:, :max_rank] * sigma[:max_rank]).square().to(torch.float64)
    residual = whitened.square().sum(dim=1, keepdim=True) - torch.cat(
        [torch.zeros_like(energy[:, :1]), torch.cumsum(energy, dim=1)], dim=1)  # (out, max_rank + 1)
    ranks = torch.arange(0, max_rank + 1, max(align, 1), device=whitened.device)
    residual = residual[:, ranks]
    rows = ((budget - ranks * (out_features + in_features)) // in_features).long()
    rows = aligned_count(rows, align, out_features)
    ordered = torch.cumsum(residual.sort(dim=0, descending=True).values, dim=0)
    kept = torch.where(rows > 0, ordered.gather(0, (rows - 1).clamp_min(0).unsqueeze(0)).squeeze(0),
                       torch.zeros_like(ordered[0]))
    error = residual.sum(dim=0) - kept
    best = int(error.argmin())
    return int(ranks[best]), int(rows[best])


def aligned_count(rows: Any, align: int, out_features: int) -> Any:
    """Row counts (int or long tensor) rounded down to multiples of `align`, capped at `out_features`."""
    if isinstance(rows, torch.Tensor):
        rows = rows.clamp(0, out_features)
        return rows if align <= 1 else torch.where(rows == out_features, rows, rows // align * align)
    rows = min(max(int(rows), 0), out_features)
    return rows if align <= 1 or rows == out_features else rows // align * align


def alternate(problems: list[RowProblem], kept_fraction: float, iterations: int,
              allocation: str = "layer") -> list[float]:
    """Run the alternation on `problems` (modified in place); returns the objective after the initial SVD and
    after every kept iteration. An iteration that raises the objective is undone and ends the loop."""
    history = [total_error(problems)]
    for _ in range(max(iterations, 0) + 1):  # +1: the first selection is not an iteration of refinement
        previous = [p.kept for p in problems]
        for problem, kept in zip(problems, select_rows(problems, kept_fraction, allocation)):
            problem.fit_low_rank(kept)
        error = total_error(problems)
        if error > history[-1] * (1 + 1e-9) and len(history) > 1:
            for problem, kept in zip(problems, previous):
                problem.fit_low_rank(kept)
            break
        history.append(error)
    return history


def compensated_target(weight: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor,
                       damping: float = 0.01) -> torch.Tensor:
    """M* = W·(Hᵀ + μI)·(G̃ + μI)⁻¹, μ = λ·mean(diag G̃) (out, in) float64: the matrix that, fed the compressed
    inputs X̃, best reproduces the dense outputs X·Wᵀ, with a ridge μ‖M − W‖² towards W. `cross` H = X̃ᵀX, `gram`
    G̃ = X̃ᵀX̃ (in, in), same token count.

    Why towards W and not towards 0 (plain W·Hᵀ·(G̃ + μI)⁻¹): with outlier input channels mean(diag G̃) is far
    above most channels' variance, and a ridge towards 0 shrinks W in all of them, even in the first block where
    the streams are equal (X̃ = X) and there is nothing to compensate. Towards W, equal streams give M* = W
    exactly, and a large λ means no update rather than a zero matrix (docs/llm.md, the `svd_llm` row)."""
    gram = gram.to(torch.float64)
    scale = float(gram.diagonal().mean())
    if not scale > 0.0:
        return weight.to(torch.float64)
    ridge = max(damping, 1e-8) * scale * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    # M*·(G̃ + μI) = W·(Hᵀ + μI)  <=>  (G̃ + μI)·M*ᵀ = (H + μI)·Wᵀ (G̃ symmetric)
    return torch.linalg.solve(gram + ridge, (cross.to(torch.float64) + ridge) @ weight.to(torch.float64).T).T


def exact_row_error(target: torch.Tensor, factor: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                    sparse: Optional[torch.Tensor], kept: torch.Tensor) -> float:
    """‖(M − U·V − S_R)·C‖²_F of a finished layer (S restricted to the kept rows): for tests and reports."""
    approx = u.to(torch.float64) @ v.to(torch.float64)
    if sparse is not None:
        approx = approx + sparse.to(torch.float64) * kept.to(torch.float64).unsqueeze(1)
    return float(((target.to(torch.float64) - approx) @ factor).square().sum())


def layer_from_problem(linear: torch.nn.Module, problem: RowProblem, has_sparse: bool,
                       prune_dim: str = "rows") -> torch.nn.Module:
    """The `LoSparseLinear` of a solved problem: U·V from the final fit, S = M − U·V with the kept rows' mask
    (the kept rows are then exact: U·V + S_R = M_R), bias as the dense layer's."""
    weight = dense_weight_of(linear)
    u, v = problem.low_rank_factors()
    factors = (u.to(weight.device, weight.dtype), v.to(weight.device, weight.dtype)) if problem.rank else None
    layer = decompose_linear(linear, None, prune_dim, has_sparse=has_sparse, rank=problem.rank, factors=factors)
    if has_sparse:
        with torch.no_grad():
            remainder = problem.target.to(torch.float64) - u @ v
            layer.sparse.copy_(remainder.to(weight.device, weight.dtype))
            layer.set_sparse_mask(problem.kept.to(layer.sparse_mask.device))
    return layer


#: --oneshot_split: "auto" chooses rank and rows per matrix (`best_split`) within its share of the ratio,
#: "fixed" takes the rank from --low_rank_ratio and gives S the rest (p_T of each matrix's rows)
SPLITS = ("auto", "fixed")


def _problem(name: str, target: torch.Tensor, factor: torch.Tensor, rank: int, kept_fraction: float,
             split: str, remaining_ratio: Optional[float], align: int = 1) -> RowProblem:
    """One matrix's problem with its rank and row budget per `split` (the ratio's share of this matrix), the row
    count on the `align` grid (the rank of a fixed split already is: `plan_ranks`)."""
    out_features, in_features = target.shape
    if split == "auto" and remaining_ratio is not None:
        whitened = target.to(torch.float64) @ factor
        svd = _tall_svd(whitened)
        rank, rows = best_split(whitened, remaining_ratio * out_features * in_features, svd, align)
        del whitened  # RowProblem computes its own; one copy alive at a time
        return RowProblem(name, target, factor, rank, rows, initial_svd=svd)
    return RowProblem(name, target, factor, rank, aligned_count(int(kept_fraction * out_features + 1e-9), align,
                                                                out_features))


def _summed(histories: list[list[float]]) -> list[float]:
    """Elementwise sum of per-matrix objective histories, each padded with its last value (it stopped there)."""
    length = max((len(h) for h in histories), default=0)
    return [sum(h[min(i, len(h) - 1)] for h in histories if h) for i in range(length)]


def solve_layers(linears: dict[str, torch.nn.Module], target_of: Callable[[str], torch.Tensor],
                 factor_of: Callable[[str], Optional[torch.Tensor]], place: Callable[[str, torch.nn.Module], None],
                 rank_of: dict[str, int], kept_fraction: float, iterations: int, has_sparse: bool,
                 split: str = "auto", remaining_ratio: Optional[float] = None, allocation: str = "layer",
                 align_of: Optional[dict[str, int]] = None) -> list[float]:
    """Solve the problems of `linears` and `place(name, layer)` each finished LoSparseLinear; returns the objective
    history (summed over the matrices). `target_of(name)` / `factor_of(name)` give a matrix's target M (out, in) and
    whitening C (in, in; None: the identity, a layer that saw no calibration input) when its turn comes, so with
    the per-matrix ("layer") allocation only one problem's float64 buffers are alive at a time; "global" needs
    them all at once. `split` "auto" (with `remaining_ratio`) picks each matrix's rank and rows; "fixed" uses
    `rank_of` and `kept_fraction` of each matrix's rows (or, "global", of all rows' parameters together).
    `align_of[name]` (per-matrix allocation): ranks and row counts on that matrix's `--align` grid."""
    def problem(name: str) -> RowProblem:
        target = target_of(name).detach()  # kept in its dtype: the float64 work copies are the problem's own
        factor = factor_of(name)
        if factor is None:
            factor = torch.eye(target.shape[1], dtype=torch.float64, device=target.device)
        return _problem(name, target, factor.to(target.device), rank_of[name], kept_fraction,
                        split if has_sparse else "fixed", remaining_ratio, (align_of or {}).get(name, 1))

    if has_sparse and allocation == "global":
        problems = [problem(name) for name in linears]
        history = alternate(problems, kept_fraction, iterations, allocation)
        for p in problems:
            place(p.name, layer_from_problem(linears[p.name], p, has_sparse))
        return history
    histories = []
    for name, linear in linears.items():
        solved = problem(name)
        histories.append(alternate([solved], kept_fraction, iterations) if has_sparse else [total_error([solved])])
        place(name, layer_from_problem(linear, solved, has_sparse))
    return _summed(histories)
