"""Training: data pipelines (``data``), the shared loop (``loop``), ``pretrain``, ``sft``, LoRA, torchrun set-up, reports."""
