"""The course's material on top of the library: the verb corpus, the SFT and control data, the
probes, Mini-GPT pretraining and fine-tuning, the Phase 28 experiment, sweep and report."""
