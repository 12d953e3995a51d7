"""Fine-tuning a trained or imported model: LoRA adapters (lora.py), applied from outside the
model and kept in PEFT's format, and the DPO loss (dpo.py)."""
