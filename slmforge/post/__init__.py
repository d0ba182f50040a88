"""Post-training: chat SFT, ORPO and DPO on top of a trained run (the lead fills in the API)."""
