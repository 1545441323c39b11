"""Tiny random BERT-family models and gate settings shared by the CoFi tests (no network, no real weights)."""

import pytest
import torch

from losparse import LoSparseConfig
from losparse.methods.cofi.pruner import CofiPruner

FAMILIES = {
    "bert": ("BertConfig", "Bert"),
    "roberta": ("RobertaConfig", "Roberta"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRoberta"),
    "electra": ("ElectraConfig", "Electra"),
}


def tiny(model_type: str = "bert", head: str = "ForSequenceClassification", seed: int = 0, std: float = 0.2):
    """A 2-layer encoder: hidden 32, 4 heads of 8, FFN 48 (larger init than BERT's, so differences show)."""
    import transformers

    config_name, prefix = FAMILIES[model_type]
    extra = {"embedding_size": 32} if model_type == "electra" else {}
    config = getattr(transformers, config_name)(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=48,
                                                max_position_embeddings=40, pad_token_id=1, initializer_range=std,
                                                num_labels=2 if head == "ForQuestionAnswering" else 3, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, prefix + head)(config).eval()


def batch(n: int = 3, length: int = 9) -> dict:
    ids = torch.randint(5, 60, (n, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def config(**values) -> LoSparseConfig:
    return LoSparseConfig(method="cofi", **{"remaining_ratio": 0.3, **values})


def gated_pruner(model, seed: int = 0, **values) -> CofiPruner:
    """A pruner whose log α are random, with MHA sub-layer 0 and FFN sub-layer 1 removed and some hidden dims off."""
    pruner = CofiPruner(model, config(**values))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mask in pruner.masks.values():
            mask.log_alpha.copy_(torch.randn(mask.log_alpha.shape, generator=generator) * 3)
        if "mha_layer" in pruner.masks:
            pruner.masks["mha_layer"].log_alpha[0] = -5.0
            pruner.masks["mha_layer"].log_alpha[1] = 4.0
        if "ffn_layer" in pruner.masks:
            pruner.masks["ffn_layer"].log_alpha[0] = 4.0
            pruner.masks["ffn_layer"].log_alpha[1] = -5.0
    pruner.invalidate()
    return pruner


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from threads, and a busy machine makes them much slower: one thread, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
