"""Building blocks of LPAF, Low-Rank Prune-And-Factorize (Ren & Zhu, 2023) -- pure torch functions.

LPAF's argument: a fine-tuned matrix W (out, in) is close to full rank, so a truncated SVD of W loses
much at high compression; first-order (movement-style) unstructured pruning leaves a sparsity pattern
that is friendlier to a low-rank factorisation; so prune first, then factorise W_pruned ≈ U·V with
(a) a *sparsity-aware* SVD and (b) *mixed-rank* fine-tuning. This module holds the algorithmic
pieces only, each independent of the Trainer, the pruner and the layers (wiring them into the method
table, the pruner, the trainer and the run scripts is a separate step):

1. Entry scores and unstructured masks: `first_order_scores` (accumulated −w·∂L/∂w, as movement
   pruning), `magnitude_scores` (|w|), `sensitivity_scores` (|w·∂L/∂w|), and `unstructured_keep_mask`,
   the entry-level counterpart of the pruner's neuron keep rule, global over a list of matrices.
2. `sparsity_aware_factorize`: an importance-weighted low-rank approximation
   min_{U,V} Σ_ij a_ij (W_ij − (U·V)_ij)², the entries' weights a_ij ≥ 0 coming from the keep mask
   and/or the entries' importance (`factorization_weights`), solved by the EM / weighted-SVD
   iteration of Srebro & Jaakkola (2003) or by alternating weighted least squares, initialised from
   the plain truncated SVD; `weighted_reconstruction_error` is the objective.
3. Effective rank: `effective_rank` (how many singular values hold a share of the squared spectrum)
   and `entropy_effective_rank` (Roy & Vetterli, 2007).
4. Mixed rank: `mixed_rank_bound` / `sample_mixed_rank` (a seeded per-step, per-layer rank in [r, R],
   annealed to exactly r for the final phase) and `truncate_factors` / `low_rank_product` (the first
   k columns of U and rows of V).

Conventions as in the rest of the project: a weight is (out, in); factors are U (out, k), V (k, in) with
√σ on both sides (U = u·√σ, V = √σ·vᵀ, like `decompose.svd_split`), ordered by decreasing σ, so that
any leading k columns/rows are themselves the best rank-k part of the product (see `truncate_factors`).
Everything works in float32 (float64 stays float64) and returns the input's dtype and device.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

__all__ = [
    "first_order_scores", "magnitude_scores", "sensitivity_scores", "unstructured_keep_mask",
    "factorization_weights", "weighted_reconstruction_error", "sparsity_aware_factorize",
    "svd_factors", "effective_rank", "entropy_effective_rank", "mixed_rank_bound", "sample_mixed_rank",
    "truncate_factors", "low_rank_product",
]

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# 1. Entry scores and unstructured masks
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def first_order_scores(weight: torch.Tensor, grad: torch.Tensor,
                       accumulated: Optional[torch.Tensor] = None) -> torch.Tensor:
    """First-order (movement) entry scores: Q ← Q + (−w ⊙ ∂L/∂w), one call per optimizer step.

    weight, grad: (out, in) (any shape, the same); accumulated: the running Q of that shape, or None
    (Q = 0) -- it is updated in place and returned when given (float32, or float64 for float64 input).
    No absolute value and no decay, as movement pruning (Sanh et al., 2020): under gradient descent
    −g ≈ Δw/η, so Q ≈ Σ_t w_t·Δw_t/η ≈ (w_T² − w_0²)/(2η): entries that move *away* from zero gain
    importance, entries shrinking towards zero lose it (a first-order Taylor estimate of the loss change
    of removing the entry, accumulated over the trajectory). A step whose −w·g is not finite (an fp16
    overflow step) is skipped, as in `importance.NeuronImportance`.
    """
    if weight.shape != grad.shape:
        raise ValueError(f"first_order_scores: weight {tuple(weight.shape)} and grad {tuple(grad.shape)} differ")
    current = -(weight.to(_work_dtype(weight)) * grad.to(_work_dtype(weight)))
    if not torch.isfinite(current).all():
        current = torch.zeros_like(current)
    if accumulated is None:
        return current
    if accumulated.shape != weight.shape:
        raise ValueError(f"first_order_scores: accumulated {tuple(accumulated.shape)} is not {tuple(weight.shape)}")
    return accumulated.add_(current.to(accumulated.dtype))


@torch.no_grad()
def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """Zeroth-order entry scores |w_ij| (shape of `weight`, float32/float64)."""
    return weight.to(_work_dtype(weight)).abs()


@torch.no_grad()
def sensitivity_scores(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Sensitivity entry scores |w_ij · ∂L/∂w_ij| (the paper's eq. 2, per entry; shape of `weight`).

    Smooth it over steps with the caller's EMA (as `importance.NeuronImportance` does for neurons).
    """
    if weight.shape != grad.shape:
        raise ValueError(f"sensitivity_scores: weight {tuple(weight.shape)} and grad {tuple(grad.shape)} differ")
    return (weight.to(_work_dtype(weight)) * grad.to(_work_dtype(weight))).abs()


@torch.no_grad()
def unstructured_keep_mask(scores: TensorOrList, kept_fraction: float) -> Union[torch.Tensor, list[torch.Tensor]]:
    """Entry-level keep mask: the k = round(p·N) highest-scoring entries survive, the rest are pruned.

    scores: one tensor (one matrix) or a list of tensors (any shapes, one device): with a list the
    ranking is *global* -- all entries of all matrices compete under one threshold, as the pruner ranks
    neurons globally. Each entry is one parameter, so N = Σ numel is the parameter count and the kept
    share of parameters is k/N (within one entry of p), the unstructured form of the pruner's
    "highest scores whose parameters fit in p_t of all S parameters" (`pruner.LoSparsePruner`).
    Returns a bool tensor per input (same shapes; a single tensor for a single tensor).
    Ties are broken deterministically (stable sort: the earlier entry in flattened, layer order wins);
    NaN scores rank lowest. p ≤ 0 prunes everything, p ≥ 1 keeps everything.
    """
    single = isinstance(scores, torch.Tensor)
    tensors = [scores] if single else list(scores)
    if not tensors:
        return []
    if not math.isfinite(float(kept_fraction)):
        raise ValueError(f"unstructured_keep_mask: kept_fraction {kept_fraction!r} is not a number")
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    flat = torch.nan_to_num(flat, nan=-math.inf)
    total = flat.numel()
    kept = min(total, max(0, int(round(float(kept_fraction) * total))))
    keep = torch.zeros(total, dtype=torch.bool, device=flat.device)
    if kept:
        order = torch.argsort(flat, descending=True, stable=True)
        keep[order[:kept]] = True
    masks = [m.reshape(t.shape) for m, t in zip(torch.split(keep, [t.numel() for t in tensors]), tensors)]
    return masks[0] if single else masks


# --------------------------------------------------------------------------------------------------
# 2. Sparsity-aware SVD
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def factorization_weights(mask: torch.Tensor, importance: Optional[torch.Tensor] = None,
                          pruned_weight: float = 0.0, normalize: bool = True) -> torch.Tensor:
    """Entry weights a_ij for `sparsity_aware_factorize`, from a keep mask and optionally importance.

    a_ij = mask_ij · (imp_ij⁺ / mean_kept(imp⁺) if importance is given else 1) + (1 − mask_ij)·pruned_weight,
    imp⁺ = max(imp, 0) (an accumulated first-order score can be negative; a kept entry with a negative
    score gets weight 0). With `normalize` the result is divided by its maximum, so a ∈ [0, 1] (the EM
    iteration needs weights ≤ 1; the minimiser is unchanged by scaling). mask: bool/0-1, (out, in);
    importance: same shape. `pruned_weight` > 0 asks U·V to also stay near 0 at the pruned entries
    (pruned_weight = 1 with no importance is the plain SVD of W_pruned again).
    """
    kept = mask.to(torch.float64)
    if importance is None:
        weights = kept.clone()
    else:
        if importance.shape != mask.shape:
            raise ValueError(f"factorization_weights: importance {tuple(importance.shape)} is not {tuple(mask.shape)}")
        positive = importance.to(torch.float64).clamp_min(0) * kept
        scale = positive.sum() / kept.sum().clamp_min(1)
        weights = positive / scale if float(scale) > 0 else kept.clone()
    weights = weights + (1 - kept) * float(pruned_weight)
    if normalize and float(weights.max()) > 0:
        weights = weights / weights.max()
    return weights.to(_work_dtype(mask) if mask.is_floating_point() else torch.float32)


def weighted_reconstruction_error(weight: torch.Tensor, weights: torch.Tensor, u: torch.Tensor,
                                  v: torch.Tensor) -> float:
    """The sparsity-aware objective E(U, V) = Σ_ij a_ij (W_ij − (U·V)_ij)² (a Python float, float64 sums).

    weight, weights: (out, in); u: (out, k); v: (k, in).
    """
    residual = weight.to(torch.float64) - u.to(torch.float64) @ v.to(torch.float64)
    return float((weights.to(torch.float64) * residual.square()).sum())


def svd_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD with √σ on both sides: U = u_k·√σ_k (out, k), V = √σ_k·v_kᵀ (k, in), σ decreasing.

    The same split as `decompose.svd_split` (exact solver), computed in the working dtype.
    """
    left, sigma, right_t = torch.linalg.svd(matrix, full_matrices=False)
    root = sigma[:rank].clamp_min(0).sqrt()
    return left[:, :rank] * root, root.unsqueeze(1) * right_t[:rank]


def _balanced_factors(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-split a product U·V (out, k)(k, in) into SVD-ordered √σ factors (same product, σ decreasing).

    U = Q₁R₁, Vᵀ = Q₂R₂ (thin QR), R₁R₂ᵀ = a·s·bᵀ (a k×k SVD): U·V = (Q₁a)·s·(Q₂b)ᵀ.
    """
    q1, r1 = torch.linalg.qr(u)
    q2, r2 = torch.linalg.qr(v.T)
    a, s, b_t = torch.linalg.svd(r1 @ r2.T)
    root = s.clamp_min(0).sqrt()
    return (q1 @ a) * root, root.unsqueeze(1) * (q2 @ b_t.T).T


@torch.no_grad()
def sparsity_aware_factorize(weight_pruned: torch.Tensor, mask_or_weights: torch.Tensor, rank: int,
                             iterations: int = 50, method: str = "em", ridge: float = 1e-6,
                             seed: int = 0, return_history: bool = False):
    """Sparsity-aware SVD: rank-k factors minimising E(U, V) = Σ_ij a_ij (W_ij − (U·V)_ij)².

    weight_pruned: W (out, in), the pruned matrix (its pruned entries are 0).
    mask_or_weights: (out, in); a bool mask (a = 1 on kept entries, 0 on pruned ones) or float weights
    a_ij ≥ 0 (e.g. from `factorization_weights`: the mask times the entries' first-order importance).
    rank: k. Returns U (out, k), V (k, in) with √σ on both sides and σ decreasing (so nested truncation
    works, see `truncate_factors`), in W's dtype and device; with `return_history` also the list of
    E after the init and after every iteration (the returned factors are those of the smallest E, so
    the result is never worse than the init).

    Why this is the "sparsity-aware" SVD. A plain truncated SVD of W_pruned minimises Σ_ij (W − UV)²
    over *all* entries, so it spends rank on reproducing the zeros that pruning put in -- which are
    not information: once the matrix is replaced by U·V, nothing requires those entries to stay 0.
    With a = mask the pruned entries are free and all the rank goes to the kept (important) entries; with
    importance weights the most important kept entries are matched first. Interpretation choices (the
    abstract names the technique without details): the target at kept entries is W_pruned itself; the
    weights are per entry (not per row as in Fisher-weighted SVD); the init is the plain SVD of W_pruned.

    Solvers (both start from the plain SVD of W_pruned; E is tracked every iteration):
      "em"  (Srebro & Jaakkola, 2003; the default). With a scaled to [0, 1] (a / max a, which does not
            change the minimiser): fill X = a⊙W + (1 − a)⊙(U·V), then U·V ← best rank-k of X (SVD).
            Each step minimises a majoriser of E that touches E at the current U·V, so E never increases.
      "als" alternating weighted least squares, exact row-wise solves: for each row i,
            U_i = W_i diag(a_i) Vᵀ (V diag(a_i) Vᵀ + λI)⁻¹, then the same for each column of V
            (batched k×k solves, λ = `ridge` × mean diagonal, so rows with no kept entry stay defined).
            Converges in far fewer iterations; each half-step is an exact minimisation of E + λ-terms.
    `seed` is accepted for a uniform API with randomized variants; both solvers here are deterministic
    given the (exact) SVD init, so it changes nothing. The history's E uses the weights scaled to max 1.
    """
    _check_factorize_arguments(weight_pruned, mask_or_weights, rank, method)
    del seed  # both solvers are deterministic given the SVD init (see the docstring)
    dtype = _work_dtype(weight_pruned)
    target = weight_pruned.to(dtype)
    weights = _unit_scaled_weights(mask_or_weights.to(dtype))
    best, history = _minimise_weighted_error(target, weights, rank, iterations, method, ridge)
    u, v = _balanced_factors(best[1], best[2])
    u, v = u.to(weight_pruned.device, weight_pruned.dtype), v.to(weight_pruned.device, weight_pruned.dtype)
    return (u, v, history) if return_history else (u, v)


def _check_factorize_arguments(weight_pruned: torch.Tensor, mask_or_weights: torch.Tensor, rank: int,
                               method: str) -> None:
    """`sparsity_aware_factorize`'s argument errors: W 2-D (out, in), a of W's shape, 1 ≤ k ≤ min(out, in),
    a known solver; raised before any SVD is computed."""
    if weight_pruned.dim() != 2:
        raise ValueError(f"sparsity_aware_factorize: weight must be 2-D (out, in), got {tuple(weight_pruned.shape)}")
    if mask_or_weights.shape != weight_pruned.shape:
        raise ValueError(f"sparsity_aware_factorize: weights {tuple(mask_or_weights.shape)} are not "
                         f"{tuple(weight_pruned.shape)}")
    out_features, in_features = weight_pruned.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"sparsity_aware_factorize: rank {rank} is not in [1, {min(out_features, in_features)}]")
    if method not in ("em", "als"):
        raise ValueError(f"sparsity_aware_factorize: method {method!r} is not 'em' or 'als'")


def _unit_scaled_weights(weights: torch.Tensor) -> torch.Tensor:
    """a / max(a) (out, in), so a ∈ [0, 1] as the EM iteration needs (the minimiser is unchanged by scaling);
    all-zero weights stay zero. Negative or non-finite weights are an error."""
    if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
        raise ValueError("sparsity_aware_factorize: weights must be finite and >= 0")
    top = float(weights.max())
    return weights / top if top > 0 else weights


def _minimise_weighted_error(target: torch.Tensor, weights: torch.Tensor, rank: int, iterations: int, method: str,
                             ridge: float) -> tuple[tuple[float, torch.Tensor, torch.Tensor], list[float]]:
    """Run `iterations` steps of the "em" or "als" solver from the plain rank-k SVD of `target` (out, in).

    weights: a (out, in) scaled to max 1. Returns ((E, U (out, k), V (k, in)) of the smallest E seen, init
    included, so the result is never worse than the plain SVD) and E after the init and after every step.
    """
    u, v = svd_factors(target, rank)
    best = (weighted_reconstruction_error(target, weights, u, v), u, v)
    history = [best[0]]
    for _ in range(max(0, int(iterations))):
        if method == "em":
            filled = weights * target + (1 - weights) * (u @ v)
            u, v = svd_factors(filled, rank)
        else:
            u, v = _als_sweep(target, weights, u, v, ridge)
        error = weighted_reconstruction_error(target, weights, u, v)
        history.append(error)
        if error < best[0]:
            best = (error, u, v)
    return best, history


def _als_sweep(target: torch.Tensor, weights: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
               ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One ALS sweep: exact weighted least squares for every row of U, then every column of V."""
    rank = u.shape[1]
    eye = torch.eye(rank, dtype=u.dtype, device=u.device)

    def solve_rows(t: torch.Tensor, a: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        # rows x_i = argmin Σ_j a_ij (t_ij − x_i·basis_j)², basis (n, k): (Bᵀ diag(a_i) B) x_i = Bᵀ diag(a_i) t_i
        outer = (basis.unsqueeze(2) * basis.unsqueeze(1)).reshape(basis.shape[0], rank * rank)  # (n, k²)
        gram = (a @ outer).reshape(a.shape[0], rank, rank)  # (m, k, k), no (m, n, k) intermediate
        lam = ridge * gram.diagonal(dim1=1, dim2=2).mean().clamp_min(1e-12)
        rhs = (a * t) @ basis
        return torch.linalg.solve(gram + lam * eye, rhs.unsqueeze(-1)).squeeze(-1)

    u = solve_rows(target, weights, v.T)
    v = solve_rows(target.T, weights.T, u).T
    return u, v


# --------------------------------------------------------------------------------------------------
# 3. Effective rank
# --------------------------------------------------------------------------------------------------

def _singular_values(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.detach().to(torch.float64))


def effective_rank(matrix: torch.Tensor, energy: float = 0.9) -> int:
    """The number of leading singular values holding `energy` of the squared spectrum.

    matrix: (m, n). With σ₁ ≥ σ₂ ≥ ...: the smallest k with Σ_{i≤k} σ_i² ≥ energy · Σ_i σ_i² (= ‖W‖_F²),
    i.e. the smallest rank whose truncated SVD leaves at most (1 − energy) of ‖W‖_F² as error.
    0 for an all-zero matrix. energy in (0, 1].
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"effective_rank: energy {energy!r} is not in (0, 1]")
    squares = _singular_values(matrix).square()
    total = float(squares.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(squares, 0) / total
    reached = cumulative >= energy - 1e-12
    return int(torch.nonzero(reached)[0]) + 1 if bool(reached.any()) else squares.numel()


def entropy_effective_rank(matrix: torch.Tensor) -> float:
    """Roy & Vetterli's (2007) effective rank exp(H(p)), p_i = σ_i / Σ_j σ_j, H(p) = −Σ p_i log p_i.

    matrix: (m, n). A real number in [1, min(m, n)] (1 for rank one, min(m, n) for equal singular
    values); 0 for an all-zero matrix.
    """
    sigma = _singular_values(matrix)
    total = float(sigma.sum())
    if total == 0.0:
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


# --------------------------------------------------------------------------------------------------
# 4. Mixed-rank fine-tuning
# --------------------------------------------------------------------------------------------------

def mixed_rank_bound(step: int, target_rank: int, max_rank: int, total_steps: int, final_steps: int,
                     warmup_steps: int = 0) -> int:
    """The largest rank allowed at optimizer step t: R before t_i, r from T − t_f on, cubic in between.

    R_t = r + ceil((R − r) · (1 − (t − t_i)/(T − t_f − t_i))³) for t_i ≤ t < T − t_f (the same cubic
    shape as the pruning schedule, `schedule.CubicSchedule`), R_t = R for t < t_i, R_t = r for
    t ≥ T − t_f. Non-increasing in t; exactly r during the final phase. Steps are 1-based like the
    pruner's; t_i = warmup_steps, t_f = final_steps.
    """
    if not 1 <= target_rank <= max_rank:
        raise ValueError(f"mixed rank: need 1 <= target_rank ({target_rank}) <= max_rank ({max_rank})")
    if final_steps < 0 or warmup_steps < 0 or warmup_steps + final_steps > total_steps:
        raise ValueError(f"mixed rank: warm-up ({warmup_steps}) + final phase ({final_steps}) must fit in "
                         f"{total_steps} steps")
    decay_end = total_steps - final_steps
    if step >= decay_end:
        return target_rank
    if step < warmup_steps:
        return max_rank
    progress = (step - warmup_steps) / max(1, decay_end - warmup_steps)
    return target_rank + math.ceil((max_rank - target_rank) * (1.0 - progress) ** 3 - 1e-12)


def sample_mixed_rank(step: int, target_rank: int, max_rank: int, total_steps: int, final_steps: int,
                      warmup_steps: int = 0, seed: int = 0, layer: int = 0, concentration: float = 1.0) -> int:
    """The rank a layer uses at step t in mixed-rank fine-tuning: a seeded draw from [r, R_t].

    k = r + floor(u^{1 + γ·progress} · (R_t − r + 1)), u ~ U[0, 1) from a generator seeded by
    (seed, step, layer), R_t = `mixed_rank_bound`, γ = `concentration`, progress = the fraction of the
    run done (t/T): the range [r, R_t] shrinks to r, and within it the draw leans more and more
    towards r (u^{>1} piles up near 0). Deterministic in (seed, step, layer), independent of call order
    (so every process and a resumed run draw the same ranks); exactly r from T − t_f on.
    """
    bound = mixed_rank_bound(step, target_rank, max_rank, total_steps, final_steps, warmup_steps)
    if bound == target_rank:
        return target_rank
    generator = torch.Generator().manual_seed(((int(seed) * 1_000_003 + int(step)) * 10_007 + int(layer)) % 2**63)
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    exponent = 1.0 + max(0.0, float(concentration)) * min(1.0, max(0.0, step / max(1, total_steps)))
    return min(bound, target_rank + int(math.floor(u ** exponent * (bound - target_rank + 1))))


def truncate_factors(u: torch.Tensor, v: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The nested rank-k part of ordered factors: U[:, :k] (out, k), V[:k] (k, in) (views, no copy).

    U·V = Σ_i U[:, i]·V[i] is a sum of rank-one terms; with factors ordered by decreasing singular value
    (`svd_factors`, `sparsity_aware_factorize`) and orthogonal directions, the first k terms are the best
    rank-k approximation of U·V (Eckart–Young), so one set of R-rank factors serves every rank ≤ R:
    mixed-rank fine-tuning trains all the nested ranks at once and the final truncation to r keeps the
    part that matters most. With unordered factors the first k columns would be an arbitrary subset.
    """
    if not 0 <= rank <= u.shape[1] or u.shape[1] != v.shape[0]:
        raise ValueError(f"truncate_factors: rank {rank} with factors {tuple(u.shape)}, {tuple(v.shape)}")
    return u[:, :rank], v[:rank]


def low_rank_product(u: torch.Tensor, v: torch.Tensor, rank: Optional[int] = None) -> torch.Tensor:
    """U[:, :k] · V[:k] (out, in): the weight a layer computes with at rank k (all of U·V if k is None)."""
    if rank is not None:
        u, v = truncate_factors(u, v, rank)
    return u @ v
