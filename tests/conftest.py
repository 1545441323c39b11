"""Tiny, local, random models and data for fast tests: nothing here touches the network."""

from __future__ import annotations

import csv
import functools
import importlib.util
import os
import random
import sys
from types import ModuleType

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Without a GPU, triton kernels can only run through its interpreter, and triton reads the switch when it is
# first imported (any test module may import it first, e.g. through losparse.deploy.dispatch): set it for the session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@functools.lru_cache(maxsize=None)
def load_script(path: str) -> ModuleType:
    """An entry script of the repository (e.g. "run_glue.py", "scripts/reproduce.py") as a module, loaded
    from its file once per session: the scripts are not a package, so they are never imported via sys.path.
    The module is registered under its file name (run_glue, ...) so dataclasses and pickling find it."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


WORDS = ("good great fine nice happy love best fun bad awful poor sad hate worst dull boring movie film plot "
         "actor scene story the a is was very not quite").split()


def write_vocab(path: str) -> str:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(WORDS)
    with open(path, "w") as f:
        f.write("\n".join(tokens) + "\n")
    return path


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    values = dict(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64, num_labels=2)
    values.update(overrides)
    return BertConfig(**values)


def make_tiny_bert_dir(directory: str, seed: int = 0) -> str:
    """A local model directory (config, weights, WordPiece tokenizer) like a hub checkpoint."""
    from transformers import BertForSequenceClassification, BertTokenizerFast

    os.makedirs(directory, exist_ok=True)
    torch.manual_seed(seed)
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(directory)
    vocab = write_vocab(os.path.join(directory, "vocab.txt"))
    with open(vocab) as f:
        token_ids = {token: i for i, token in enumerate(f.read().split())}
    BertTokenizerFast(vocab=token_ids, do_lower_case=True).save_pretrained(directory)
    return directory


def write_sentiment_csv(path: str, n: int, seed: int = 0) -> str:
    """Learnable toy sentiment: label 1 iff the sentence holds more positive than negative words."""
    rng = random.Random(seed)
    positive, negative, filler = WORDS[:8], WORDS[8:16], WORDS[16:]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        for _ in range(n):
            label = rng.random() < 0.5
            main = positive if label else negative
            words = rng.sample(main, 3) + rng.sample(filler, 3)
            rng.shuffle(words)
            writer.writerow([" ".join(words), int(label)])
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    return make_tiny_bert_dir(str(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory) -> tuple[str, str]:
    directory = tmp_path_factory.mktemp("sentiment")
    return (write_sentiment_csv(str(directory / "train.csv"), 96, seed=1),
            write_sentiment_csv(str(directory / "validation.csv"), 32, seed=2))


class ToyDataset(torch.utils.data.Dataset):
    """64 random token sequences; label 1 iff the first token id is above 17 (learnable, no tokenizer)."""

    def __init__(self, n=64, length=8, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 30, (n, length), generator=generator)
        self.labels = (self.ids[:, 0] > 17).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def tiny_bert_classifier(seed: int = 0):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config())


def trainer_args(output_dir, **overrides):
    """CPU TrainingArguments for the tiny trainer tests (batch 8, 2 epochs, no saving unless asked)."""
    from transformers import TrainingArguments

    values = dict(output_dir=str(output_dir), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=1e-3,
                  weight_decay=0.1, report_to="none", save_strategy="no", logging_steps=1000, seed=0,
                  disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    values.update(overrides)
    return TrainingArguments(**values)


def assert_same_training_state(actual: dict, expected: dict) -> None:
    """Masks bit-identical, every other tensor equal up to float noise (two runs of one trajectory)."""
    for name, tensor in expected.items():
        if name.endswith("sparse_mask"):
            assert torch.equal(actual[name], tensor), name
        else:
            torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


#: random-weight tiny architectures for the deploy tests (the benchmarks have their own, bigger, `ARCHS`)
TINY_ARCHS = {
    "tiny-bert": ("BertForSequenceClassification", dict(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=512, num_labels=2)),
    "tiny-bart": ("BartForConditionalGeneration", dict(
        vocab_size=1000, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=512,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)),
    "tiny-llama": ("LlamaForCausalLM", dict(
        vocab_size=1000, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)),
}


def random_tiny_model(arch: str, seed: int = 0, num_layers=None):
    """A TINY_ARCHS model with random weights, fp32, eval mode (`num_layers`: of a decoder-only model)."""
    import transformers

    class_name, values = TINY_ARCHS[arch]
    if num_layers is not None:
        values = {**values, "num_hidden_layers": num_layers}
    model_class = getattr(transformers, class_name)
    torch.manual_seed(seed)
    return model_class(model_class.config_class(**values)).float().eval()


def compress_randomly(model, remaining_ratio: float, low_rank_ratio: float, seed: int = 0, **config_values):
    """`apply` → S masked to its exact final kept fraction by random neuron scores (a stand-in for training,
    through the pruner's public `update_masks`) → `compact`, in place; returns the model."""
    import losparse

    config = losparse.LoSparseConfig(remaining_ratio=remaining_ratio, low_rank_ratio=low_rank_ratio,
                                     svd_solver="randomized", **config_values)
    torch.manual_seed(seed)
    losparse.apply(model, config)
    pruner = losparse.LoSparsePruner(model, total_steps=10)
    scores = torch.rand(pruner.neuron_sizes.shape, generator=torch.Generator().manual_seed(seed))
    pruner.update_masks(pruner.final_kept_fraction, scores=scores)
    return losparse.compact(model)
