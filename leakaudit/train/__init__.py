"""Fine-tuning and training-time defenses."""
