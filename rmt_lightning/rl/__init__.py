"""The RL step's pieces: the trajectory a step collects, its losses, reusing a rollout over several steps, and what a
step logs. ``RMTModule.training_step`` puts them together."""
