"""`--method finetune`: plain full fine-tuning, the dense reference rows."""

from losparse.methods.finetune.method import FinetuneMethod
