"""Training stages: `sft` (TRL SFTTrainer on the target) and `dpo` (TRL DPOTrainer from the SFT model), in one
process or relaunched under `accelerate launch` for many processes and machines."""
