"""`CofiPruner`: the gates, the Lagrangian, their optimizer and the three stages of one CoFi run.

Stages, in optimizer steps of one run of T steps over E = num_train_epochs (with --max_steps too: the
stages keep their share epochs / E of T):
    pre-fine-tune   P = round(T·cofi_prefinetune_epochs / E)   no gates, no penalty
    pruning         T − P − F                                   sampled gates + L_c; log α and λ trained
    fine-tune       F = round(T·cofi_finetune_epochs / E)       the final gates, fixed; no penalty
The Lagrangian's target warms up over W = --lagrangian_warmup_steps, else round(T·lagrangian_warmup_epochs / E)
pruning steps. At the end of pruning the deterministic gates are made to meet the ratio (`budget`) and fixed.

Initialisation: log α ~ N(10, 0.01) for hidden, head and layer gates, N(0, 0.01) for FFN neurons. The
reference code means the neurons' 0 to come from its droprate_init 0.5 (ln(1 − 0.5) − ln 0.5 = 0) and gives
the other gates 10; its issue tracker calls the mismatch a likely typo, but its results were obtained with it,
so it is kept. log α and λ have their own AdamW (lr --reg_learning_rate, no weight decay, λ with
`maximize=True`: gradient ascent), stepped after the main optimizer, then log α is clamped to [ln 0.01, ln 100].
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from losparse.core.config import LoSparseConfig
from losparse.core.errors import LoSparseUsageError
from losparse.core.pruner import BasePruner
from losparse.methods.cofi.budget import meet_budget
from losparse.methods.cofi.hooks import GateState, install_gates, remove_gates
from losparse.methods.cofi.lagrangian import Lagrangian
from losparse.methods.cofi.masks import HardConcreteMask
from losparse.methods.cofi.size import counted_size, expected_sparsity
from losparse.methods.cofi.units import check_cofi_config, hidden_readers, model_shape

logger = logging.getLogger(__name__)

INIT_MEAN = {"hidden": 10.0, "mha_layer": 10.0, "head": 10.0, "ffn_layer": 10.0, "neuron": 0.0}
STAGES = ("prefinetune", "prune", "finetune")


class CofiPruner(BasePruner):
    """The gates of `model` (hooked into its forward), λ, the reg optimizer, the stage bounds and the final gates.

    `adam` holds the main optimizer's (beta1, beta2, eps) for the reg AdamW, as the reference uses them.
    `extra_modules` (e.g. the distillation projection) are saved and restored with the pruner state.
    """

    #: whether the gated matrices may be decomposed (`LoSparseLinear`: the CoFi + LoSparse combination)
    decomposed_ok = False

    def __init__(self, model: nn.Module, config: LoSparseConfig, adam: tuple[float, float, float] = (0.9, 0.999, 1e-8),
                 extra_modules: Optional[dict[str, nn.Module]] = None, target_ratio: Optional[float] = None) -> None:
        self.model, self.config = model, config
        #: the share of the targeted weights the gates keep (--remaining_ratio; a combination's structured share)
        self.target_ratio = config.remaining_ratio if target_ratio is None else target_ratio
        self.units = self.units_of(config)
        self.shape = model_shape(model, decomposed_ok=self.decomposed_ok)
        if "hidden" in self.units:
            hidden_readers(model)
        device = next(model.parameters()).device
        self.masks = nn.ModuleDict({unit: HardConcreteMask(*self.shape.unit_shape(unit), INIT_MEAN[unit], device)
                                    for unit in self.units})
        self.lagrangian = Lagrangian(1.0 - self.target_ratio, device=device)
        self.optimizer = torch.optim.AdamW(
            [{"params": list(self.masks.parameters()), "weight_decay": 0.0},
             {"params": list(self.lagrangian.parameters()), "weight_decay": 0.0, "maximize": True}],
            lr=config.reg_learning_rate, betas=adam[:2], eps=adam[2])
        self.extra_modules = dict(extra_modules or {})
        self.prefinetune_steps, self.prune_steps, self.total_steps = 0, 1, 1
        self.last_step, self.kept_fraction = 0, 1.0
        self.final_gates: Optional[dict[str, Optional[torch.Tensor]]] = None
        self.forced: dict[str, int] = {}
        self.last_terms: dict[str, float] = {}
        self._eval_gates: Optional[dict[str, torch.Tensor]] = None
        self.state = GateState(self.gates_for, self.shape.head_size, self.shape.layers)
        self.handles = install_gates(model, self.state)

    def units_of(self, config: LoSparseConfig) -> tuple[str, ...]:
        """The gated units of this run (`--cofi_units`; default all)."""
        return check_cofi_config(config)

    def plan(self, total_steps: int, num_train_epochs: float) -> None:
        """Split `total_steps` into the stages (module docstring); a usage error if no pruning step is left."""
        c, epochs = self.config, float(num_train_epochs) if num_train_epochs and num_train_epochs > 0 else 1.0
        self.total_steps = total_steps
        self.prefinetune_steps = round(total_steps * c.cofi_prefinetune_epochs / epochs)
        finetune = round(total_steps * c.cofi_finetune_epochs / epochs)
        self.prune_steps = total_steps - self.prefinetune_steps - finetune
        if self.prune_steps < 1:
            raise LoSparseUsageError(
                f"--cofi_prefinetune_epochs {c.cofi_prefinetune_epochs:g} + --cofi_finetune_epochs "
                f"{c.cofi_finetune_epochs:g} leave no pruning step of the {total_steps} (num_train_epochs {epochs:g})")
        warmup = c.lagrangian_warmup_steps
        self.lagrangian.warmup_steps = warmup if warmup is not None else round(
            total_steps * c.lagrangian_warmup_epochs / epochs)

    @property
    def prune_end(self) -> int:
        return self.prefinetune_steps + self.prune_steps

    def stage(self) -> str:
        """The stage of the next optimizer step."""
        if self.final_gates is not None:
            return "finetune"
        return "prefinetune" if self.last_step < self.prefinetune_steps else "prune"

    def probabilities(self) -> dict[str, torch.Tensor]:
        return {unit: mask.prob_nonzero() for unit, mask in self.masks.items()}

    def invalidate(self) -> None:
        """log α was changed outside `step` (by hand, a loaded state): recompute the evaluation gates."""
        self._eval_gates = None

    def deterministic_gates(self) -> dict[str, torch.Tensor]:
        if self._eval_gates is None:
            self._eval_gates = {unit: mask.deterministic() for unit, mask in self.masks.items()}
        return self._eval_gates

    def gates_for(self, training: bool) -> Optional[dict[str, Optional[torch.Tensor]]]:
        """The gates of one forward: none before pruning, samples while training, the deterministic ones in eval."""
        stage = self.stage()
        if stage == "prefinetune":
            return None
        if stage == "finetune":
            return self.final_gates
        if training:
            return {unit: mask.sample() for unit, mask in self.masks.items()}
        return self.deterministic_gates()

    def lagrangian_loss(self) -> torch.Tensor:
        """() L_c of this pruning step (differentiable in log α and λ); records its terms for the logs."""
        expected = expected_sparsity(self.probabilities(), self.shape)
        pruned = self.last_step - self.prefinetune_steps
        loss = self.lagrangian(expected, pruned)
        self.last_terms = {"cofi_expected_sparsity": float(expected.detach()), "cofi_target_sparsity":
                           self.lagrangian.target(pruned), "cofi_lagrangian_loss": float(loss.detach()),
                           "cofi_lambda_1": float(self.lagrangian.lambda_1.detach()), "cofi_lambda_2":
                           float(self.lagrangian.lambda_2.detach())}
        return loss

    def _reg_parameters(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, step: int) -> None:
        """After optimizer step `step` (1-based): step log α and λ while pruning, clamp, finalise at the end."""
        pruning = self.stage() == "prune"
        if pruning:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                for p in self._reg_parameters():  # the gates live outside the DDP module: average by hand
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad.div_(dist.get_world_size())
            self.optimizer.step()
            for mask in self.masks.values():
                mask.clamp_()
            self._eval_gates = None
        self.optimizer.zero_grad(set_to_none=True)
        self.last_step = step
        if pruning and step >= self.prune_end:
            self.finalize()
        self.kept_fraction = self.achieved_kept_fraction()

    def finalize(self) -> None:
        """Fix the final gates: the deterministic ones, made to meet the ratio (`budget.meet_budget`)."""
        if self.final_gates is not None:
            return
        probs = {unit: p.detach() for unit, p in self.probabilities().items()}
        gates, removed = meet_budget(self.deterministic_gates(), probs, self.shape, self.target_ratio, self.units)
        if any(removed.values()):
            logger.warning("cofi: the Lagrangian had not reached the target at the end of pruning (expected kept "
                           "%.4f, deterministic gates keep %.4f > the target %g): removed %s of lowest P(z != 0) to "
                           "meet it", 1 - float(expected_sparsity(probs, self.shape)),
                           self._ratio(self.deterministic_gates()), self.target_ratio,
                           ", ".join(f"{count} {unit}" for unit, count in removed.items() if count))
        self.final_gates = {unit: gates[unit] for unit in self.units}
        self.forced = removed
        logger.info("cofi: final structure keeps %.4f of the targeted weights", self._ratio(self.final_gates))

    def _ratio(self, gates: dict) -> float:
        return counted_size(gates, self.shape) / self.shape.dense_params

    def achieved_kept_fraction(self) -> float:
        """Kept weights of the targeted matrices / their dense count, for the final (else the current eval) gates."""
        if self.stage() == "prefinetune":
            return 1.0
        return self._ratio(self.final_gates if self.final_gates is not None else self.deterministic_gates())

    def detach(self) -> None:
        """Remove the hooks from the model (before folding and removal)."""
        remove_gates(self.handles)
        self.handles = []

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"log_alpha.{unit}": mask.log_alpha.detach() for unit, mask in self.masks.items()}
        tensors.update(lambda_1=self.lagrangian.lambda_1.detach(), lambda_2=self.lagrangian.lambda_2.detach())
        for index, values in self.optimizer.state_dict()["state"].items():
            tensors.update({f"reg_optimizer.{index}.{key}": torch.as_tensor(v) for key, v in values.items()})
        for name, module in self.extra_modules.items():
            tensors.update({f"{name}.{key}": v.detach() for key, v in module.state_dict().items()})
        for unit, gate in (self.final_gates or {}).items():
            tensors[f"final.{unit}"] = gate
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], path: str) -> None:
        mine = {f"log_alpha.{unit}": mask.log_alpha for unit, mask in self.masks.items()}
        mine.update(lambda_1=self.lagrangian.lambda_1, lambda_2=self.lagrangian.lambda_2)
        if any(name not in tensors or tensors[name].shape != p.shape for name, p in mine.items()):
            raise LoSparseUsageError(f"{path} is not the cofi pruner state of this model (units "
                                     f"{','.join(self.units)})")
        with torch.no_grad():
            for name, parameter in mine.items():
                parameter.copy_(tensors[name])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("reg_optimizer."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value.to(self.masks[self.units[0]].log_alpha.device)
        self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})
        for name, module in self.extra_modules.items():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        final = {unit: tensors[f"final.{unit}"] for unit in self.units if f"final.{unit}" in tensors}
        device = self.masks[self.units[0]].log_alpha.device
        self.final_gates = {unit: gate.to(device) for unit, gate in final.items()} if final else None
        self._eval_gates = None

    def extra_state(self) -> dict[str, Any]:
        return {"kind": "cofi", "units": list(self.units), "forced": self.forced}

    def restore_extra_state(self, meta: dict) -> None:
        self.forced = dict(meta.get("forced") or {})
        self.kept_fraction = self.achieved_kept_fraction()
