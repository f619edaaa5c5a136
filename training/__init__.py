"""Training: base models, SFT, reward model, PPO-ptx and retraining rounds."""
