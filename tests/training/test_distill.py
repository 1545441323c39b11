"""Knowledge distillation (losparse/training/distill.py): loss terms by hand, validation, and tiny training runs."""

import copy
import math

import pytest
import torch
from conftest import tiny_bert_config
from transformers import (
    AutoModelForSequenceClassification,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

import losparse
from losparse import CompactLoSparseLinear, LoSparseConfig, LoSparseUsageError, compose_trainer
from losparse.cli.tasks.squad import QuestionAnsweringTrainer
from losparse.training.distill import (
    DistillationArguments,
    default_layer_map,
    distillation_loss,
    hidden_state_groups,
    hidden_state_masks,
    load_teacher,
    logits_of,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster than two fighting for shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# Hand-computed references: plain Python floats, no torch functions.


def softmax(row, temperature):
    exps = [math.exp(x / temperature) for x in row]
    return [e / sum(exps) for e in exps]


def kd_by_hand(student_rows, teacher_rows, temperature):
    """Mean over rows of sum_c p_t (log p_t - log p_s), times T^2."""
    total = 0.0
    for s_row, t_row in zip(student_rows, teacher_rows):
        p_s, p_t = softmax(s_row, temperature), softmax(t_row, temperature)
        total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    return total / len(student_rows) * temperature ** 2


def mse_by_hand(a, b, mask=None):
    """a, b: [batch][seq][hidden] lists; mean of squared differences over kept tokens and the hidden dim."""
    total, count = 0.0, 0
    for i, (seq_a, seq_b) in enumerate(zip(a, b)):
        for j, (tok_a, tok_b) in enumerate(zip(seq_a, seq_b)):
            if mask is not None and not mask[i][j]:
                continue
            total += sum((x - y) ** 2 for x, y in zip(tok_a, tok_b))
            count += len(tok_a)
    return total / count


S_LOGITS = [[1.0, 2.0, 3.0], [0.0, 0.5, -1.0]]
T_LOGITS = [[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]]
H_S = [[[1.0, 2.0], [0.0, -1.0], [50.0, 50.0]]]          # (batch 1, seq 3, hidden 2); token 2 is padding
H_T = [[[0.5, 2.5], [1.0, -1.0], [-50.0, 0.0]]]
H_S2 = [[[0.0, 0.0], [2.0, 1.0], [9.0, 9.0]]]
H_T2 = [[[1.0, 0.0], [2.0, 3.0], [0.0, 0.0]]]


def t(x):
    return torch.tensor(x)


def test_output_term_is_kl_times_t_squared_batchmean():
    out = distillation_loss(t(S_LOGITS), t(T_LOGITS), None, None, alpha_output=0.7, alpha_layer=0.0,
                            temperature=2.0, layer_map=None)
    expected = kd_by_hand(S_LOGITS, T_LOGITS, 2.0)
    assert out["output"].item() == pytest.approx(expected, rel=1e-5)
    assert out["layer"].item() == 0.0
    assert out["total"].item() == pytest.approx(0.7 * expected, rel=1e-5)


def test_layer_term_sums_mse_over_mapped_layers_and_total_combines():
    student, teacher = (t(H_S), t(H_S2)), (t(H_T), t(H_T2))
    out = distillation_loss(t(S_LOGITS), t(T_LOGITS), student, teacher, alpha_output=2.0, alpha_layer=3.0,
                            temperature=1.0, layer_map=[(0, 0), (1, 1)])
    layer = mse_by_hand(H_S, H_T) + mse_by_hand(H_S2, H_T2)
    output = kd_by_hand(S_LOGITS, T_LOGITS, 1.0)
    assert out["layer"].item() == pytest.approx(layer, rel=1e-5)
    assert out["total"].item() == pytest.approx(2.0 * output + 3.0 * layer, rel=1e-5)
    # A crossed map compares student layer 1 with teacher layer 0.
    crossed = distillation_loss(None, None, student, teacher, 0.0, 1.0, 1.0, layer_map=[(1, 0)])
    assert crossed["layer"].item() == pytest.approx(mse_by_hand(H_S2, H_T), rel=1e-5)


def test_attention_mask_ignores_padding_tokens():
    mask = [[1, 1, 0]]
    out = distillation_loss(None, None, (t(H_S),), (t(H_T),), 0.0, 1.0, 1.0, layer_map=[(0, 0)],
                            attention_mask=torch.tensor(mask))
    assert out["layer"].item() == pytest.approx(mse_by_hand(H_S, H_T, mask), rel=1e-5)
    assert mse_by_hand(H_S, H_T, mask) == pytest.approx((0.25 + 0.25 + 1.0 + 0.0) / 4)
    unmasked = distillation_loss(None, None, (t(H_S),), (t(H_T),), 0.0, 1.0, 1.0, layer_map=[(0, 0)])
    assert unmasked["layer"].item() > 100 * out["layer"].item()


def test_identical_student_and_teacher_give_zero():
    hidden = (t(H_S), t(H_S2))
    out = distillation_loss(t(S_LOGITS), t(S_LOGITS), hidden, tuple(h.clone() for h in hidden), 5.0, 5.0, 3.0,
                            layer_map=None, attention_mask=torch.tensor([[1, 1, 0]]))
    assert out["output"].item() == pytest.approx(0.0, abs=1e-7)
    assert out["layer"].item() == 0.0 and out["total"].item() == pytest.approx(0.0, abs=1e-6)


def test_tuple_logits_average_the_kl_of_each_member():
    start_s, start_t = [[0.0, 1.0, 2.0, 0.5]], [[2.0, 0.0, 0.0, 1.0]]
    end_s, end_t = [[1.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 3.0, 0.0]]
    out = distillation_loss((t(start_s), t(end_s)), (t(start_t), t(end_t)), None, None, 1.0, 0.0, 2.0, None)
    expected = (kd_by_hand(start_s, start_t, 2.0) + kd_by_hand(end_s, end_t, 2.0)) / 2
    assert out["output"].item() == pytest.approx(expected, rel=1e-5)


def test_token_level_logits_skip_positions_labelled_minus_100():
    s = [[[1.0, 0.0], [9.0, -9.0], [0.0, 2.0]]]             # (batch 1, seq 3, classes 2)
    te = [[[0.0, 1.0], [-9.0, 9.0], [1.0, 1.0]]]
    labels = torch.tensor([[0, -100, 1]])
    out = distillation_loss(t(s), t(te), None, None, 1.0, 0.0, 2.0, None, labels=labels)
    assert out["output"].item() == pytest.approx(kd_by_hand([s[0][0], s[0][2]], [te[0][0], te[0][2]], 2.0), rel=1e-5)
    # Without labels the attention mask (same leading shape) decides; without either, all positions count.
    by_mask = distillation_loss(t(s), t(te), None, None, 1.0, 0.0, 2.0, None, attention_mask=torch.tensor([[1, 0, 1]]))
    assert by_mask["output"].item() == pytest.approx(out["output"].item(), rel=1e-6)
    everything = distillation_loss(t(s), t(te), None, None, 1.0, 0.0, 2.0, None)
    assert everything["output"].item() == pytest.approx(kd_by_hand(s[0], te[0], 2.0), rel=1e-5)


def test_regression_logits_use_mse():
    out = distillation_loss(t([[0.5], [2.0]]), t([[1.5], [1.0]]), None, None, 1.0, 0.0, 2.0, None)
    assert out["output"].item() == pytest.approx((1.0 + 1.0) / 2)


def test_different_hidden_sizes_and_bad_maps_are_clear_errors():
    with pytest.raises(LoSparseUsageError, match="no learned projection"):
        distillation_loss(None, None, (torch.zeros(1, 3, 4),), (torch.zeros(1, 3, 8),), 0.0, 1.0, 1.0, None)
    with pytest.raises(LoSparseUsageError, match="out of range"):
        distillation_loss(None, None, (torch.zeros(1, 3, 4),), (torch.zeros(1, 3, 4),), 0.0, 1.0, 1.0, [(0, 2)])
    with pytest.raises(LoSparseUsageError, match="same task"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), None, None, 1.0, 0.0, 1.0, None)


def test_default_layer_map():
    assert default_layer_map(2, 2) == [(0, 0), (1, 1), (2, 2)]
    assert default_layer_map(2, 4) == [(0, 0), (1, 2), (2, 4)]
    assert default_layer_map(4, 2) == [(0, 0), (1, 1), (2, 1), (3, 2), (4, 2)]   # halves round up
    assert default_layer_map(6, 12) == [(i, 2 * i) for i in range(7)]
    assert default_layer_map(12, 2)[1] == (1, 1)                                # never a layer -> embeddings


# ------------------------------------------------------------------------------------------------
# Arguments

@pytest.mark.parametrize("kwargs,match", [
    (dict(teacher_model_name_or_path="x", alpha_output=-1.0), "--alpha_output -1.0"),
    (dict(teacher_model_name_or_path="x", alpha_layer=float("nan")), "--alpha_layer nan"),
    (dict(teacher_model_name_or_path="x", alpha_layer=1.0, distill_temperature=0.0), "--distill_temperature 0.0"),
    (dict(teacher_model_name_or_path="x", alpha_layer=1.0, layer_map=["1-2"]), "entry '1-2'"),
    (dict(teacher_model_name_or_path="x", alpha_layer=1.0, layer_map=["124"]), "base-60"),
    (dict(teacher_model_name_or_path="x", alpha_layer=1.0, distill_stage="before"), "--distill_stage 'before'"),
    (dict(alpha_layer=15.0), "need a teacher"),
    (dict(teacher_model_name_or_path="x"), "both 0"),
    (dict(teacher_model_name_or_path="x", alpha_output=1.0, layer_map=["0:0"]), "--alpha_layer is 0"),
    (dict(distill_stage="after"), "--distill_stage after"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(LoSparseUsageError, match=match):
        DistillationArguments(**kwargs)


def test_arguments_parse_from_the_command_line():
    (parsed,) = HfArgumentParser(DistillationArguments).parse_args_into_dataclasses(
        ["--teacher_model_name_or_path", "teacher", "--alpha_output", "5", "--alpha_layer", "5", "--layer_map", "0:0",
         "2:4", "--distill_stage", "after"])
    assert parsed.enabled and parsed.alpha_output == 5.0 and parsed.distill_stage == "after"
    assert parsed.parsed_layer_map() == [(0, 0), (2, 4)]
    assert not DistillationArguments().enabled
    assert DistillationArguments(teacher_model_name_or_path="x", alpha_layer=1, layer_map=[(1, 2)]).layer_map == ["1:2"]


# ------------------------------------------------------------------------------------------------
# Trainer

class ToyDataset(torch.utils.data.Dataset):
    """Label 1 iff the first token id is above the middle of the range; a trailing padding token."""

    def __init__(self, n=64, length=8, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 30, (n, length), generator=generator)
        self.labels = (self.ids[:, 0] > 17).long()
        self.mask = torch.ones_like(self.ids)
        self.mask[:, -1] = 0

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _args(output_dir, **overrides):
    values = dict(output_dir=str(output_dir), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=1e-3,
                  report_to="none", save_strategy="no", logging_steps=4, seed=0, disable_tqdm=True, use_cpu=True,
                  dataloader_num_workers=0)
    values.update(overrides)
    return TrainingArguments(**values)


def _bert(seed, cls=BertForSequenceClassification, **config):
    torch.manual_seed(seed)
    return cls(tiny_bert_config(**config))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("teacher"))
    _bert(1).save_pretrained(directory)
    return directory


def _batch(n=4):
    data = ToyDataset(n=n)
    return {k: torch.stack([data[i][k] for i in range(n)]) for k in ("input_ids", "attention_mask", "labels")}


PruningDistillTrainer = compose_trainer(Trainer, prune=True, distill=True)      # distill_stage="during"
DistillationTrainer = compose_trainer(Trainer, distill=True)                      # distill_stage="after"


def _student(config_kwargs=None, **bert_config):
    student = _bert(0, **bert_config)
    losparse.apply(student, LoSparseConfig(remaining_ratio=0.3, low_rank_ratio=0.1, **(config_kwargs or {})))
    return student


def test_training_with_a_teacher_adds_the_distillation_term_and_still_prunes(tmp_path, teacher_dir, monkeypatch):
    teacher = load_teacher(teacher_dir, AutoModelForSequenceClassification)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    distill = DistillationArguments(teacher_model_name_or_path=teacher_dir, alpha_layer=1000.0, alpha_output=1.0)
    trainer = PruningDistillTrainer(model=_student(), args=_args(tmp_path / "kd"), train_dataset=ToyDataset(),
                                    teacher_model=teacher, distill_args=distill)
    logged, original_log = [], Trainer.log
    # What reaches Trainer.log, after both mixins added their keys.
    monkeypatch.setattr(Trainer, "log", lambda self, logs, *a, **k: (logged.append(dict(logs)),
                                                                     original_log(self, logs, *a, **k))[1])
    trainer.train()

    assert trainer.state.global_step == 8 and trainer.pruner.last_step == 8          # the pruner still ran
    assert trainer.pruner.kept_fraction == pytest.approx(trainer.pruner.final_kept_fraction)
    last = trainer.last_distill_losses
    assert last["total"].item() == pytest.approx(1000.0 * last["layer"].item() + last["output"].item(), rel=1e-5)
    step_logs = [logs for logs in logged if "loss" in logs]
    assert len(step_logs) == 2
    for logs in step_logs:
        assert {"distill_layer_loss", "distill_output_loss", "task_loss", "sparse_kept_fraction"} <= set(logs)
        # The logged training loss is the task loss plus the weighted distillation terms (means over 4 steps).
        expected = logs["task_loss"] + 1000.0 * logs["distill_layer_loss"] + logs["distill_output_loss"]
        assert logs["loss"] == pytest.approx(expected, rel=1e-3)
        assert logs["loss"] > 100 * logs["task_loss"]
    assert trainer.teacher_model is teacher and not teacher.training
    assert "teacher" not in "".join(trainer.model.state_dict())      # the teacher is not part of the student


NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_compute_loss_is_the_task_loss_plus_distillation_loss(tmp_path, teacher_dir):
    teacher = load_teacher(teacher_dir, AutoModelForSequenceClassification)
    distill = DistillationArguments(teacher_model_name_or_path=teacher_dir, alpha_layer=2.0, alpha_output=3.0)
    trainer = PruningDistillTrainer(model=_student(**NO_DROPOUT), args=_args(tmp_path, gradient_accumulation_steps=2),
                                    train_dataset=ToyDataset(), teacher_model=teacher, distill_args=distill)
    # The loss declares its own scaling: a per-micro-batch mean, which training_step divides by the steps.
    assert trainer.loss_is_scaled_for_ga is False
    model, batch = trainer.model, _batch()
    model.train()
    loss = trainer.compute_loss(model, batch, num_items_in_batch=8)
    parts = trainer.last_distill_losses
    assert parts["output"] > 0 and parts["layer"] > 0
    assert loss.item() == pytest.approx(parts["task"].item() + parts["total"].item(), rel=1e-5)
    # The terms are exactly distillation_loss on the two models' outputs (the function the tests above pin).
    with torch.no_grad():
        student_out = model(**batch, output_hidden_states=True)
        teacher_out = teacher(**batch, output_hidden_states=True)
    student_hidden, teacher_hidden = dict(hidden_state_groups(student_out)), dict(hidden_state_groups(teacher_out))
    expected = distillation_loss(logits_of(student_out), logits_of(teacher_out), student_hidden, teacher_hidden,
                                 3.0, 2.0, 2.0, attention_mask=batch["attention_mask"], labels=batch["labels"],
                                 hidden_masks=hidden_state_masks(student_hidden, batch))
    for key in ("output", "layer", "total"):
        assert parts[key].item() == pytest.approx(expected[key].item(), rel=1e-6), key
    assert parts["task"].item() == pytest.approx(student_out.loss.item(), rel=1e-6)
    # Evaluation is the plain task loss.
    model.eval()
    with torch.no_grad():
        plain = Trainer.compute_loss(trainer, model, batch)
        assert trainer.compute_loss(model, batch).item() == pytest.approx(plain.item())


def test_a_base_class_that_declares_its_loss_scaled_keeps_num_items_and_gets_the_term_divided(tmp_path, teacher_dir):
    class ScaledTrainer(Trainer):
        loss_is_scaled_for_ga = True          # its task loss is already normalised over the accumulated batch

    teacher = load_teacher(teacher_dir, AutoModelForSequenceClassification)
    distill = DistillationArguments(teacher_model_name_or_path=teacher_dir, alpha_layer=2.0, alpha_output=3.0)
    trainer = compose_trainer(ScaledTrainer, prune=True, distill=True)(
        model=_student(**NO_DROPOUT), args=_args(tmp_path, gradient_accumulation_steps=2), train_dataset=ToyDataset(),
        teacher_model=teacher, distill_args=distill)
    assert trainer.loss_is_scaled_for_ga is True
    trainer.current_gradient_accumulation_steps = 2          # what the training loop sets
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, _batch(), num_items_in_batch=8)
    parts = trainer.last_distill_losses
    assert loss.item() == pytest.approx(parts["task"].item() + parts["total"].item() / 2, rel=1e-5)


@pytest.mark.parametrize("accepts_loss_kwargs", [False, True], ids=["per-batch-loss", "model-claims-num-items"])
def test_gradient_accumulation_weighs_the_loss_like_one_big_batch(tmp_path, teacher_dir, accepts_loss_kwargs):
    """2 accumulated micro-batches of 4 give the loss and the update of 1 batch of 8, whatever the model
    says about `num_items_in_batch` (the Trainer's own guess would skip the division when it claims it)."""
    teacher = load_teacher(teacher_dir, AutoModelForSequenceClassification)
    distill = DistillationArguments(teacher_model_name_or_path=teacher_dir, alpha_output=3.0, alpha_layer=50.0,
                                    distill_stage="after")

    def one_step(batch_size, accumulation):
        student = _bert(0, **NO_DROPOUT)
        student.accepts_loss_kwargs = accepts_loss_kwargs
        args = _args(tmp_path / f"b{batch_size}", per_device_train_batch_size=batch_size, max_steps=1,
                     gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0, weight_decay=0.0,
                     lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1)
        trainer = DistillationTrainer(model=student, args=args, train_dataset=ToyDataset(n=8), teacher_model=teacher,
                                      distill_args=distill)
        before = {name: p.detach().clone() for name, p in student.named_parameters()}
        trainer.train()
        (loss,) = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return loss, {name: before[name] - p.detach() for name, p in student.named_parameters()}   # = lr·grad

    big_loss, big_update = one_step(8, 1)
    accumulated_loss, accumulated_update = one_step(4, 2)
    assert accumulated_loss == pytest.approx(big_loss, rel=1e-5)
    assert max(u.abs().max().item() for u in big_update.values()) > 1e-3      # the step did move the weights
    for name, update in big_update.items():
        torch.testing.assert_close(accumulated_update[name], update, rtol=1e-4, atol=1e-6, msg=name)


def test_a_copy_of_the_student_as_teacher_adds_nothing(tmp_path, teacher_dir):
    student = _bert(0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    distill = DistillationArguments(teacher_model_name_or_path=teacher_dir, alpha_layer=10.0, alpha_output=10.0)
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), train_dataset=ToyDataset(),
                                  teacher_model=copy.deepcopy(student), distill_args=distill)
    student.train()
    trainer.compute_loss(student, _batch())
    parts = trainer.last_distill_losses
    assert parts["output"].item() == pytest.approx(0.0, abs=1e-6)
    assert parts["layer"].item() == pytest.approx(0.0, abs=1e-10)


def test_question_answering_trainer_composes_with_tuple_logits(tmp_path):
    teacher = _bert(1, BertForQuestionAnswering)
    student = _bert(0, BertForQuestionAnswering)
    losparse.apply(student, LoSparseConfig(remaining_ratio=0.3, low_rank_ratio=0.1))
    distill = DistillationArguments(teacher_model_name_or_path="qa-teacher", alpha_output=1.0, alpha_layer=1.0)
    trainer_class = compose_trainer(QuestionAnsweringTrainer, prune=True, distill=True)
    assert trainer_class.__name__ == "LoSparseDistillationQuestionAnsweringTrainer"
    trainer = trainer_class(model=student, args=_args(tmp_path), teacher_model=teacher, distill_args=distill,
                            eval_examples=None, n_best_size=5)
    assert trainer.n_best_size == 5 and trainer.losparse_callback is not None
    batch = _batch()
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
             "start_positions": torch.tensor([1, 2, 3, 4]), "end_positions": torch.tensor([2, 3, 4, 5])}
    student.train()
    loss = trainer.compute_loss(student, batch)
    parts = trainer.last_distill_losses
    assert parts["output"] > 0 and parts["layer"] > 0
    assert loss.item() == pytest.approx((parts["task"] + parts["total"]).item(), rel=1e-5)


def test_seq2seq_models_distil_encoder_and_decoder_hidden_states(tmp_path):
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    torch.manual_seed(0)
    student = BartForConditionalGeneration(config)
    torch.manual_seed(1)
    teacher = BartForConditionalGeneration(config)
    distill = DistillationArguments(teacher_model_name_or_path="t", alpha_output=1.0, alpha_layer=1.0)
    batch = {"input_ids": torch.randint(4, 40, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long),
             "labels": torch.tensor([[5, 6, 7, 2, -100], [8, 9, 2, -100, -100]])}
    for other, positive in ((teacher, True), (copy.deepcopy(student), False)):
        trainer = DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=other, distill_args=distill)
        student.train()
        trainer.compute_loss(student, batch)
        parts = trainer.last_distill_losses
        assert (parts["layer"].item() > 0) is positive and (parts["output"].item() > 1e-6) is positive


def test_after_stage_trains_a_compact_checkpoint(tmp_path, teacher_dir):
    student = _student()
    for _, layer in losparse.core.decompose.losparse_layers(student):      # prune half of S's neurons, then compact
        mask = torch.zeros_like(layer.sparse_mask)
        mask[::2] = True
        layer.set_sparse_mask(mask)
    losparse.save(student, str(tmp_path / "compact"))
    compact = losparse.load(str(tmp_path / "compact"))
    teacher = load_teacher(teacher_dir, AutoModelForSequenceClassification)
    distill = DistillationArguments(teacher_model_name_or_path=teacher_dir, alpha_output=1.0, alpha_layer=1.0,
                                    distill_stage="after")
    layers = [m for m in compact.modules() if isinstance(m, CompactLoSparseLinear)]
    before = [layer.fused_weight.detach().clone() for layer in layers]
    shapes = [tuple(layer.fused_weight.shape) for layer in layers]
    trainer = DistillationTrainer(model=compact, args=_args(tmp_path / "run"), train_dataset=ToyDataset(),
                                  teacher_model=teacher, distill_args=distill)
    trainer.train()
    assert trainer.last_distill_losses["layer"] > 0
    assert all(not torch.equal(layer.fused_weight, b) for layer, b in zip(layers, before))
    assert [tuple(layer.fused_weight.shape) for layer in layers] == shapes       # still compact

    # A compact checkpoint also works as a teacher.
    compact_teacher = load_teacher(str(tmp_path / "compact"), AutoModelForSequenceClassification)
    assert any(isinstance(m, CompactLoSparseLinear) for m in compact_teacher.modules())
    assert not any(p.requires_grad for p in compact_teacher.parameters())


def test_after_stage_refuses_a_pruning_trainer_or_a_training_form_model(tmp_path, teacher_dir):
    distill = DistillationArguments(teacher_model_name_or_path=teacher_dir, alpha_layer=1.0, distill_stage="after")
    teacher = _bert(1)
    with pytest.raises(LoSparseUsageError, match="without pruning"):
        PruningDistillTrainer(model=_student(), args=_args(tmp_path), teacher_model=teacher, distill_args=distill)
    with pytest.raises(LoSparseUsageError, match="losparse.compact"):
        DistillationTrainer(model=_student(), args=_args(tmp_path), teacher_model=teacher, distill_args=distill)


def test_teacher_and_arguments_must_go_together(tmp_path, teacher_dir):
    distill = DistillationArguments(teacher_model_name_or_path=teacher_dir, alpha_layer=1.0)
    with pytest.raises(LoSparseUsageError, match="no teacher_model"):
        PruningDistillTrainer(model=_student(), args=_args(tmp_path), distill_args=distill)
    with pytest.raises(LoSparseUsageError, match="no alpha"):
        PruningDistillTrainer(model=_student(), args=_args(tmp_path), teacher_model=_bert(1))
    with pytest.raises(LoSparseUsageError, match="could not be loaded"):
        load_teacher(str(tmp_path / "missing"), AutoModelForSequenceClassification)
