"""The reconstruction solver of one-shot LoSparse (losparse.methods.oneshot.reconstruction) and its compensation."""

import copy

import pytest
import torch
from test_oneshot import _config, _ids, _layer_inputs, _tiny_model

import losparse
from losparse.core.errors import LoSparseUsageError
from losparse.core.layers import LoSparseLinear, dense_weight_of
from losparse.methods.oneshot import algorithm as oneshot
from losparse.methods.oneshot import reconstruction as rec


def _problem(out=12, inp=10, tokens=40, rank=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, inp, generator=generator, dtype=torch.float64) * torch.exp(
        torch.randn(inp, generator=generator, dtype=torch.float64))
    weight = torch.randn(out, inp, generator=generator, dtype=torch.float64)
    factor = torch.linalg.cholesky(x.T @ x / tokens)
    return x, weight, rec.RowProblem("w", weight, factor, rank)


def test_for_fixed_rows_the_fit_is_the_least_squares_optimum():
    x, weight, problem = _problem()
    kept = torch.zeros(12, dtype=torch.bool)
    kept[[1, 4, 7]] = True
    tail = problem.fit_low_rank(kept)
    u, v = problem.low_rank_factors()
    sparse = weight - u @ v
    # the objective in whitened form is the calibration error (x rows are tokens): ‖X (W - UV - S_R)ᵀ‖² / tokens
    error = ((weight - u @ v - sparse * kept.unsqueeze(1).double()) @ x.T).square().sum() / x.shape[0]
    assert error == pytest.approx(tail, rel=1e-6)
    assert rec.exact_row_error(weight, problem.factor, u, v, sparse, kept) == pytest.approx(tail, rel=1e-6)
    # kept rows are exact, and no rank-3 L does better on the free rows than the whitened SVD (random tries)
    assert torch.allclose((u @ v + sparse)[kept], weight[kept])
    generator = torch.Generator().manual_seed(5)
    for _ in range(20):
        a = u + 0.05 * torch.randn(u.shape, generator=generator, dtype=torch.float64)
        b = v + 0.05 * torch.randn(v.shape, generator=generator, dtype=torch.float64)
        assert rec.exact_row_error(weight, problem.factor, a, b, weight - a @ b, kept) >= tail - 1e-9


@pytest.mark.parametrize("allocation", ["layer", "global"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_alternation_never_raises_the_objective_and_beats_the_first_selection(seed, allocation):
    problems = [_problem(out=o, inp=i, rank=r, seed=seed * 10 + n)[2]
                for n, (o, i, r) in enumerate([(12, 10, 3), (20, 10, 2), (10, 16, 4)])]
    for problem in problems:
        problem.budget_rows = int(0.3 * problem.target.shape[0])
    history = rec.alternate(problems, kept_fraction=0.3, iterations=4, allocation=allocation)
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(history, history[1:]))
    assert history[-1] < history[0]
    kept = sum(int(p.kept.sum()) * p.row_size for p in problems)
    total = sum(p.target.numel() for p in problems)
    if allocation == "global":
        assert 0.3 * total - 16 <= kept <= 0.3 * total + 0.5  # within one row of the budget
    else:
        assert [int(p.kept.sum()) for p in problems] == [p.budget_rows for p in problems]


def test_the_compensated_target_fits_the_dense_outputs_from_the_compressed_inputs():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(200, 8, generator=generator, dtype=torch.float64)
    x_tilde = x + 0.3 * torch.randn(200, 8, generator=generator, dtype=torch.float64)  # earlier blocks' error
    weight = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    target = rec.compensated_target(weight, x_tilde.T @ x, x_tilde.T @ x_tilde, damping=0.0)

    def error(matrix):
        return float((x @ weight.T - x_tilde @ matrix.T).square().sum())

    assert error(target) < error(weight)
    for _ in range(10):
        assert error(target + 0.01 * torch.randn(6, 8, generator=generator, dtype=torch.float64)) > error(target)


def test_the_compensation_ridge_pulls_towards_the_dense_weight_not_towards_zero():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(300, 8, generator=generator, dtype=torch.float64)
    x[:, 0] *= 100.0  # an outlier channel: mean(diag G) far above the others' variance
    weight = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    same = rec.compensated_target(weight, x.T @ x, x.T @ x, damping=0.01)
    assert torch.allclose(same, weight, atol=1e-10)  # equal streams: nothing to compensate
    x_tilde = x + 0.3 * torch.randn(300, 8, generator=generator, dtype=torch.float64)
    assert torch.allclose(rec.compensated_target(weight, x_tilde.T @ x, x_tilde.T @ x_tilde, damping=1e6), weight,
                          atol=1e-3)  # a huge ridge: no update


def _calibration_error(model, dense, ids):
    """Σ over LoSparse layers of ‖X (W − W_eff)ᵀ‖² / ‖X Wᵀ‖², X the layer inputs of the dense model on `ids`
    (each layer's error relative to its output energy: the solver's objective, measured from scratch)."""
    total = 0.0
    for name, layer in model.named_modules():
        if isinstance(layer, LoSparseLinear):
            x = _layer_inputs(dense, name, ids)
            weight = dense_weight_of(dense.get_submodule(name)).detach().double()
            delta = weight - layer.effective_weight().detach().double()
            total += float((x @ delta.T).square().sum() / (x @ weight.T).square().sum())
    return total


@pytest.mark.parametrize("method", ["losparse", "itp"])
def test_reconstruction_has_lower_calibration_error_than_selection_on_a_tiny_llama(method):
    dense = _tiny_model("llama")
    calibration = _ids(8, 24, seed=21)
    config = _config(method=method)
    errors = {}
    for solver in ("select", "reconstruct"):
        model = oneshot.oneshot_compress(copy.deepcopy(dense), config, calibration, solver=solver, show_progress=False)
        errors[solver] = _calibration_error(model, dense, calibration)
        if solver == "reconstruct":
            history = model.oneshot_history[0]
            assert all(b <= a * (1 + 1e-9) for a, b in zip(history, history[1:]))
            report = losparse.parameter_report(model)
            assert report["remaining_ratio"] <= 0.5 + 1e-9
            assert report["remaining_ratio"] >= 0.5 - max(r["in_features"] for r in report["layers"]) / \
                report["target_dense_params"]
    assert errors["reconstruct"] < errors["select"]


@pytest.mark.parametrize("method", ["losparse", "itp"])
def test_reconstruction_reproduces_held_out_dense_logits_better_than_selection(method):
    dense = _tiny_model("llama")
    calibration, heldout = _ids(16, 32, seed=10), _ids(16, 32, seed=11)
    with torch.no_grad():
        reference = dense(input_ids=heldout).logits
    errors = {}
    for solver in ("select", "reconstruct"):
        model = oneshot.oneshot_compress(copy.deepcopy(dense), _config(method=method), calibration, solver=solver,
                                         show_progress=False)
        with torch.no_grad():
            errors[solver] = float((model(input_ids=heldout).logits - reference).square().mean())
    assert errors["reconstruct"] < 0.9 * errors["select"]  # measured: 0.80 (losparse), 0.47 (itp)


def test_more_iterations_never_give_a_higher_objective():
    dense = _tiny_model("llama")
    calibration = _ids(8, 24, seed=22)
    finals = []
    for iterations in (0, 1, 3):
        model = oneshot.oneshot_compress(copy.deepcopy(dense), _config(), calibration, iterations=iterations,
                                         show_progress=False)
        finals.append(model.oneshot_history[0][-1])
    assert finals[0] >= finals[1] * (1 - 1e-9) >= finals[2] * (1 - 2e-9)


def test_block_scope_compensation_reproduces_the_dense_logits_better():
    dense = _tiny_model("llama")
    calibration = _ids(12, 24, seed=23)
    with torch.no_grad():
        reference = dense(input_ids=calibration).logits
    errors = {}
    for compensate in (False, True):
        model = oneshot.oneshot_compress(copy.deepcopy(dense), _config(), calibration, prune_scope="block",
                                         compensate=compensate, show_progress=False)
        assert len(model.oneshot_history) == 2  # one solve per block
        with torch.no_grad():
            errors[compensate] = float((model(input_ids=calibration).logits - reference).square().mean())
    assert errors[True] < errors[False]


def test_the_reconstructed_model_compacts_and_reloads_to_the_same_logits(tmp_path):
    model = oneshot.oneshot_compress(_tiny_model("llama"), _config(), _ids(6, 16, 6), show_progress=False)
    ids = _ids(3, 12, seed=7)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    losparse.save(losparse.compact(model), str(tmp_path / "m"))
    with torch.no_grad():
        after = losparse.load(str(tmp_path / "m"))(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-4)


def test_bad_solver_and_column_pruning_are_refused_in_one_line():
    dense = _tiny_model("llama")
    with pytest.raises(LoSparseUsageError, match="--oneshot_solver 'exact' is not known"):
        oneshot.oneshot_compress(dense, _config(), _ids(2, 8, 1), solver="exact")
    with pytest.raises(LoSparseUsageError, match="--prune_dim is 'columns'"):
        oneshot.oneshot_compress(dense, _config(prune_dim="columns"), _ids(2, 8, 1))
    assert not any(isinstance(m, LoSparseLinear) for m in dense.modules())


def _split_estimates(whitened, budget, align):
    """{(rank, rows): the first selection's error estimate} for every split on the `align` grid, by brute force."""
    out_features, in_features = whitened.shape
    u, sigma, vh = torch.linalg.svd(whitened, full_matrices=False)
    estimates = {}
    for rank in range(0, int(budget // (out_features + in_features)) + 1, align):
        residual = (whitened - (u[:, :rank] * sigma[:rank]) @ vh[:rank]).square().sum(dim=1)
        rows = min(int((budget - rank * (out_features + in_features)) // in_features) // align * align, out_features)
        estimates[(rank, rows)] = float(residual.sum() - residual.sort(descending=True).values[:rows].sum())
    return estimates


def test_best_split_is_the_brute_force_minimum_of_the_estimate():
    _, weight, problem = _problem(out=16, inp=12, tokens=60, seed=4)
    whitened = problem.whitened
    budget = 0.5 * 16 * 12
    estimates = _split_estimates(whitened, budget, align=1)
    chosen = rec.best_split(whitened, budget)
    assert chosen in estimates
    assert estimates[chosen] == pytest.approx(min(estimates.values()), rel=1e-5)
    assert chosen[0] * 28 + chosen[1] * 12 <= budget


def test_the_automatic_split_is_never_worse_than_whitened_truncation_alone():
    dense = _tiny_model("llama")
    calibration = _ids(8, 24, seed=24)
    stats = oneshot.collect_statistics(dense, _config(), calibration, show_progress=False)
    model = oneshot.oneshot_compress(copy.deepcopy(dense), _config(), statistics=stats, show_progress=False)
    for name, layer in model.named_modules():
        if not isinstance(layer, LoSparseLinear):
            continue
        weight = dense_weight_of(dense.get_submodule(name)).detach().double()
        factor = oneshot.whitening_factor(stats[name].second_moment())
        out_features, in_features = weight.shape
        rank = int(0.5 * out_features * in_features // (out_features + in_features))
        left, sigma, right = torch.linalg.svd(weight @ factor, full_matrices=False)
        truncation = float(sigma[rank:].square().sum())
        solved = float(((weight - layer.effective_weight().detach().double()) @ factor).square().sum())
        assert solved <= truncation * (1 + 1e-4) + 1e-9, name
        assert layer.current_rank * (out_features + in_features) + int(layer.sparse_mask.sum()) * in_features \
            <= 0.5 * out_features * in_features


def test_best_split_on_an_align_grid_is_the_brute_force_minimum_over_that_grid():
    _, _, problem = _problem(out=40, inp=24, tokens=80, seed=6)
    whitened = problem.whitened
    budget = 0.6 * 40 * 24
    estimates = _split_estimates(whitened, budget, align=4)
    chosen = rec.best_split(whitened, budget, align=4)
    assert chosen in estimates and chosen[0] % 4 == 0 and chosen[1] % 4 == 0
    assert estimates[chosen] == pytest.approx(min(estimates.values()), rel=1e-5)
    assert rec.aligned_count(39, 4, 40) == 36 and rec.aligned_count(40, 4, 40) == 40 and rec.aligned_count(7, 1, 40) == 7
